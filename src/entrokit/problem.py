r"""The OT problem: weights ``a``, ``b`` and a geometry, validated once at the boundary.

Entropic OT solved here:

.. math::

    \min_{P \ge 0,\ P\mathbf 1 = a,\ P^\top \mathbf 1 = b}
        \langle C, P\rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a\otimes b),
    \qquad \mathrm{KL}(P\|Q) = \sum_{ij} P_{ij}\log\frac{P_{ij}}{Q_{ij}} - P_{ij} + Q_{ij}.

Zero weights are legal: rows/columns with zero mass carry no plan mass, their
potentials are still defined (by the soft c-transform), and ``log 0 = -inf`` is masked
on purpose rather than smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entrokit._errors import InputError
from entrokit._validation import (
    as_float_tensor,
    check_masses,
    check_nonneg_finite,
    check_same_dtype_device,
)
from entrokit.geometry import DenseCost, Geometry, PointCloud, as_geometry

__all__ = ["OTProblem", "make_problem", "log_weights"]


def log_weights(w: torch.Tensor) -> torch.Tensor:
    """log w with log 0 = -inf exactly (no smoothing constant)."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), torch.full_like(w, -float("inf")))


@dataclass(frozen=True, eq=False)
class OTProblem:
    """Weights and geometry of one OT problem (or a batch of them).

    Attributes:
        a: source weights ``[n]`` or ``[B, n]``.
        b: target weights ``[m]`` or ``[B, m]``.
        geometry: the cost (:class:`~entrokit.geometry.DenseCost` or
            :class:`~entrokit.geometry.PointCloud`).
    """

    a: torch.Tensor
    b: torch.Tensor
    geometry: Geometry

    @property
    def batched(self) -> bool:
        return self.a.dim() == 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def with_batch(self) -> OTProblem:
        if self.batched:
            return self
        return OTProblem(self.a.unsqueeze(0), self.b.unsqueeze(0), self.geometry.with_batch())

    def squeeze_batch(self) -> OTProblem:
        if not self.batched:
            return self
        return OTProblem(self.a.squeeze(0), self.b.squeeze(0), self.geometry.squeeze_batch())


def make_problem(a, b, cost, *, normalize: bool = False, check_inputs: bool = True) -> OTProblem:
    """Validate ``a``, ``b`` and the cost and build an :class:`OTProblem`.

    Raises:
        TypeError: non-tensor inputs or integer dtypes.
        InputError: bad shapes, mismatched dtype/device, negative/NaN/inf entries, zero
            or unequal total masses (unless ``normalize=True``), empty inputs.
    """
    geom = as_geometry(cost)
    a = as_float_tensor(a, "a")
    b = as_float_tensor(b, "b")
    tensors = {"a": a, "b": b}
    for i, t in enumerate(geom.tensors()):
        tensors[["cost", "x", "y"][i if not isinstance(geom, PointCloud) else i + 1]] = t
    check_same_dtype_device(tensors)
    if a.dim() not in (1, 2) or b.dim() != a.dim():
        raise InputError(
            f"a and b must both have shape (n,) and (m,), or (batch, n) and (batch, m); got "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    n, m = geom.shape
    if (a.shape[-1], b.shape[-1]) != (n, m):
        raise InputError(
            f"shape mismatch: a has {a.shape[-1]} entries and b has {b.shape[-1]}, but the cost is "
            f"{n} x {m}; expected a of length {n} and b of length {m}."
        )
    batched = a.dim() == 2
    if batched != geom.batched or (batched and not (a.shape[0] == b.shape[0] == geom.batch_shape[0])):
        raise InputError(
            f"batch mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, cost batch shape "
            f"{geom.batch_shape}; either all inputs carry the same leading batch axis or none does."
        )
    if check_inputs:
        check_nonneg_finite(a, "a")
        check_nonneg_finite(b, "b")
        if isinstance(geom, DenseCost):
            # one pass: min/max are finite iff every entry is (NaN propagates); cached for
            # the eps-scaling rule
            lo, hi = geom.cost_bounds()
            if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
                check_nonneg_finite(geom.cost_matrix(), "cost", allow_negative=True)
        elif not isinstance(geom, PointCloud):
            check_nonneg_finite(geom.cost_matrix(), "cost", allow_negative=True)
        else:
            check_nonneg_finite(geom.x, "x", allow_negative=True)
            check_nonneg_finite(geom.y, "y", allow_negative=True)
        a, b = check_masses(a, b, normalize=normalize)
    elif normalize:
        a = a / a.sum(-1, keepdim=True)
        b = b / b.sum(-1, keepdim=True)
    return OTProblem(a, b, geom)
