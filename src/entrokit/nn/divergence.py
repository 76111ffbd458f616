r"""``SinkhornLoss``: the Sinkhorn divergence as a module, with GeomLoss's parameters.

GeomLoss's ``SamplesLoss("sinkhorn", p, blur, scaling, debias)`` uses the cost
:math:`c(x,y) = \tfrac1p\|x-y\|^p` and :math:`\varepsilon = \text{blur}^p`, and stops after
a fixed ε-schedule whose length is set by ``scaling``. entrokit's costs are
:math:`\|x-y\|^2` (``"sqeuclidean"``) and :math:`\|x-y\|` (``"euclidean"``), and its
solver stops on a marginal tolerance. The mapping is explicit:

* ``p=2``: :math:`c = \tfrac12 C` with :math:`C = \|x-y\|^2`; since
  :math:`\mathrm{OT}_{C/2,\,\varepsilon} = \tfrac12\,\mathrm{OT}_{C,\,2\varepsilon}`, the loss is
  ``0.5 * sinkhorn_divergence(x, y, eps=2 * blur**2, cost="sqeuclidean")``;
* ``p=1``: :math:`c = \|x-y\|`, ``sinkhorn_divergence(x, y, eps=blur, cost="euclidean")``;
* ``scaling`` sets the ratio between ε-scaling stages (entrokit's ``scaling_decay``), a
  speed knob only: every solve runs to ``tol``. The value therefore agrees with GeomLoss
  as far as GeomLoss's fixed schedule has converged (closely at ``scaling`` near 1).
"""

from __future__ import annotations

import torch
from torch import nn

from entrokit._errors import InputError
from entrokit._validation import check_positive, check_solver_options, reject_meta
from entrokit.losses.divergence import divergence
from entrokit.solvers.sinkhorn import SinkhornOptions

__all__ = ["SinkhornLoss"]


class SinkhornLoss(nn.Module):
    r"""Debiased Sinkhorn divergence between point clouds, as a loss module.

    Args:
        p: exponent of the GeomLoss-style cost :math:`\tfrac1p\|x-y\|^p`, 1 or 2.
        blur: GeomLoss's blur; :math:`\varepsilon = \text{blur}^p` on that cost.
        scaling: GeomLoss's ε-scaling ratio in (0, 1); a speed knob here (see module).
        debias: subtract the self-terms (default) or return :math:`\mathrm{OT}_\varepsilon`.
        reach: unbalanced OT is not supported; only ``None`` is accepted.
        tol: L1 marginal tolerance of every solve.
        max_iter: iteration budget per solve.
        chunk_size: tile size for clouds too large to materialise the cost.

    Call as ``loss(x, y)`` or ``loss(a, x, b, y)`` (GeomLoss's two signatures); points
    ``(..., n, d)``, weights ``(..., n)``. Returns the batch shape (0-d for one pair).

    Example:
        >>> import torch
        >>> from entrokit.nn import SinkhornLoss
        >>> x = torch.randn(40, 2, dtype=torch.float64)
        >>> float(SinkhornLoss(blur=0.1)(x, x).abs()) < 1e-6
        True
    """

    def __init__(self, p: int = 2, blur: float = 0.05, scaling: float = 0.5, debias: bool = True, *,
                 reach=None, tol: float = 1e-6, max_iter: int | None = None, chunk_size: int | None = None):
        super().__init__()
        if p not in (1, 2) or isinstance(p, bool):
            raise InputError(f"p must be 1 or 2 (the costs |x-y| and |x-y|^2/2), got {p!r}.")
        if reach is not None:
            raise InputError(
                f"reach={reach!r}: unbalanced OT is not supported; pass reach=None and weights of equal mass."
            )
        check_positive(blur, "blur")
        if not (0.0 < float(scaling) < 1.0):
            raise InputError(f"scaling must lie in (0, 1), got {scaling!r}; GeomLoss's default is 0.5.")
        if not isinstance(debias, bool):
            raise TypeError(f"debias must be True or False, got {type(debias).__name__}.")
        # checked once here; every forward calls the divergence with checked options
        o = check_solver_options("sinkhorn_divergence", tol=tol, max_iter=max_iter)
        self.p, self.blur, self.scaling, self.debias = p, float(blur), float(scaling), debias
        self.tol, self.max_iter, self.chunk_size = o["tol"], o["max_iter"], chunk_size

    @property
    def eps(self) -> float:
        """ε in entrokit's convention for the cost it uses."""
        return 2.0 * self.blur**2 if self.p == 2 else self.blur

    def extra_repr(self) -> str:
        return f"p={self.p}, blur={self.blur:g}, scaling={self.scaling:g}, debias={self.debias}, tol={self.tol:g}"

    @reject_meta
    def forward(self, *args) -> torch.Tensor:
        if len(args) == 2:
            (x, y), a, b = args, None, None
        elif len(args) == 4:
            a, x, b, y = args
        else:
            raise TypeError(f"call as loss(x, y) or loss(a, x, b, y); got {len(args)} arguments.")
        value = divergence(
            x, y, a, b, eps=self.eps, cost="sqeuclidean" if self.p == 2 else "euclidean", chunk_size=self.chunk_size,
            normalize=False, check_inputs=True, debias=self.debias, tol=self.tol,
            max_iter=self.max_iter or SinkhornOptions.max_iter, eps_scaling="auto", scaling_decay=self.scaling,
        )
        return 0.5 * value if self.p == 2 else value
