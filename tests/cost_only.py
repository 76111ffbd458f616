"""A user-defined geometry that implements only its cost (the minimal seam)."""

from entrokit.geometry import Geometry


class CostOnly(Geometry):
    """``C = U Vᵀ`` from its factors: :meth:`cost_matrix` is the only method; every other
    primitive is the base class's dense default."""

    def __init__(self, U, V):
        self.U, self.V = U, V

    def cost_matrix(self):
        return self.U @ self.V.transpose(-1, -2)
