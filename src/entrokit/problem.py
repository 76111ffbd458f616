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

import math
from dataclasses import dataclass

import torch

from entrokit._errors import InputError
from entrokit._validation import (
    as_float_tensor,
    check_masses,
    check_nonneg_finite,
    check_same_dtype_device,
    is_array_like,
)
from entrokit.geometry import Geometry, PointCloud, as_geometry
from entrokit.geometry.base import (
    TensorMetadata,
    log_weights,  # re-exported: its old home
)

__all__ = ["OTProblem", "make_problem", "log_weights"]


@dataclass(frozen=True, eq=False)
class OTProblem(TensorMetadata):
    """Weights and geometry of one OT problem (or a batch of them).

    Attributes:
        a: source weights ``[..., n]``.
        b: target weights ``[..., m]``.
        geometry: the cost (:class:`~entrokit.DenseCost`, :class:`~entrokit.PointCloud`
            or any :class:`~entrokit.Geometry`).
        user_batch_shape: set by :meth:`with_batch` to the batch axes of the problem it
            flattened, so that results can be reshaped back.
    """

    a: torch.Tensor
    b: torch.Tensor
    geometry: Geometry
    user_batch_shape: tuple[int, ...] | None = None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[:-1])

    @property
    def batched(self) -> bool:
        return self.a.dim() >= 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.shape

    @property
    def _stored(self) -> torch.Tensor:  # dtype and device are the weights'
        return self.a

    def with_batch(self) -> OTProblem:
        """The same problems with exactly one leading batch axis ``(B, n)``."""
        if self.user_batch_shape is not None:
            return self
        shape = self.batch_shape
        B = math.prod(shape)
        n, m = self.shape
        return OTProblem(
            self.a.reshape(B, n), self.b.reshape(B, m), self.geometry.reshape_batch((B,)), shape
        )

    def squeeze_batch(self) -> OTProblem:
        """Undo :meth:`with_batch`: the user's batch axes."""
        if self.user_batch_shape is None:
            return self
        shape = self.user_batch_shape
        n, m = self.shape
        return OTProblem(
            self.a.reshape(*shape, n), self.b.reshape(*shape, m), self.geometry.reshape_batch(shape)
        )


def _uniform(size: int, batch_shape, like: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``size`` weights ``1 / total`` (``total``: the global count of a sharded geometry)."""
    return torch.full((*batch_shape, size), 1.0 / (total or size), dtype=like.dtype, device=like.device)


def make_problem(a, b, cost, *, normalize: bool = False, check_inputs: bool = True) -> OTProblem:
    """Validate ``a``, ``b`` and the cost and build an :class:`OTProblem`.

    ``a`` or ``b`` may be ``None`` (uniform weights). NumPy arrays and lists are
    converted; the cost's dtype and device decide those of converted weights.

    Raises:
        TypeError: inputs that are not arrays, integer or half-precision dtypes.
        InputError: bad shapes, mismatched dtype/device, negative/NaN/inf entries, a
            computed cost that is not finite, zero or unequal total masses (unless
            ``normalize=True``), empty inputs.
    """
    if is_array_like(cost):
        cost = as_float_tensor(cost, "cost")
    geom = as_geometry(cost)
    like = geom.tensors()[0]
    n, m = geom.shape
    bshape = geom.batch_shape
    n_total, m_total = geom.global_shape
    a = _uniform(n, bshape, like, n_total) if a is None else as_float_tensor(a, "a", like=None if isinstance(a, torch.Tensor) else like)
    b = _uniform(m, bshape, like, m_total) if b is None else as_float_tensor(b, "b", like=None if isinstance(b, torch.Tensor) else like)
    tensors = {"a": a, "b": b}
    names = ("x", "y") if isinstance(geom, PointCloud) else ("cost",)
    for name, t in zip(names, geom.tensors()):
        tensors[name] = t
    check_same_dtype_device(tensors)
    if a.dim() != b.dim():
        raise InputError(
            f"a and b must have shapes (..., n) and (..., m) with the same batch axes; got "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    if (a.shape[-1], b.shape[-1]) != (n, m):
        raise InputError(
            f"shape mismatch: a has {a.shape[-1]} entries and b has {b.shape[-1]}, but the cost is "
            f"{n} x {m}; expected a of length {n} and b of length {m}."
        )
    if not (tuple(a.shape[:-1]) == tuple(b.shape[:-1]) == tuple(bshape)):
        raise InputError(
            f"batch mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, cost batch shape "
            f"{tuple(bshape)}; every input must carry the same leading batch axes (or none)."
        )
    if check_inputs:
        check_nonneg_finite(a, "a")
        check_nonneg_finite(b, "b")
        for name, t in zip(names, geom.tensors()):
            if name != "cost":
                check_nonneg_finite(t, name, allow_negative=True)
        # one pass over the computed cost (cached bounds feed the eps-scaling rule)
        geom.check_finite()
        a, b = check_masses(a, b, normalize=normalize, geometry=geom)
    elif normalize:
        a = a / geom.row_sum(a).unsqueeze(-1)
        b = b / geom.col_sum(b).unsqueeze(-1)
    return OTProblem(a, b, geom)
