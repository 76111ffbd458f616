r"""Costs computed from two point clouds, ``C_ij = c(x_i, y_j)``, dense or in tiles."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor, check_same_dtype_device
from entrokit.geometry.base import Geometry, logsumexp_pair, plan_block
from entrokit.geometry.dense import DenseCost

__all__ = ["PointCloud"]

CostName = Literal["sqeuclidean", "euclidean"]
CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Keep tiles of the online cost at about this many entries (64 MiB in float64).
_DEFAULT_CHUNK_ENTRIES = 1 << 23


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for (B, n, d), (B, m, d) -> (B, n, m), clamped at 0."""
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1).unsqueeze(-2)
    d = xx + yy - 2.0 * torch.matmul(x, y.transpose(-1, -2))
    return d.clamp_min(0.0)


class _SafeSqrt(torch.autograd.Function):
    """sqrt with gradient 0 at 0 (avoids NaN gradients for coincident points)."""

    @staticmethod
    def forward(ctx, x):
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, gy / (2 * y).clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(y))


def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _SafeSqrt.apply(_sq_dist(x, y))


_COSTS: dict[str, CostFn] = {"sqeuclidean": _sq_dist, "euclidean": _euclidean}


def _versions(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """In-place modification counters of the points; ``None`` for inference tensors, which
    do not track them (nothing is cached for those)."""
    if x.is_inference() or y.is_inference():
        return None
    return (x._version, y._version)


class PointCloud(Geometry):
    r"""Cost computed from two point clouds, ``C_ij = c(x_i, y_j)``.

    Args:
        x: source points ``[..., n, d]``.
        y: target points ``[..., m, d]`` (the same batch axes as ``x``).
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`, the POT/OTT convention; GeomLoss uses
            half of it), ``"euclidean"`` (:math:`\|x-y\|`, with a zero gradient where points
            coincide) or a callable ``c(x, y)`` mapping ``[B, n', d], [B, m', d]`` to a
            floating ``[B, n', m']``.
        chunk_size: when given, every reduction is computed on tiles of at most
            ``chunk_size`` rows (or columns), so the full cost matrix is never stored:
            memory is :math:`O((n+m)\cdot \text{chunk\_size})`. ``None`` materialises the
            cost once (fastest for problems that fit in memory).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: CostName | CostFn = "sqeuclidean",
        *,
        chunk_size: int | None = None,
    ):
        x = as_float_tensor(x, "x")
        y = as_float_tensor(y, "y")
        check_same_dtype_device({"x": x, "y": y})
        if x.dim() < 2 or y.dim() != x.dim():
            raise InputError(
                f"x and y must have shapes (..., n, d) and (..., m, d) with the same batch axes; "
                f"got {tuple(x.shape)} and {tuple(y.shape)}. Add a feature axis with x[:, None] "
                "for 1-D points."
            )
        if x.shape[-1] != y.shape[-1]:
            raise InputError(
                f"x and y must have the same point dimension, got d={x.shape[-1]} and d={y.shape[-1]}."
            )
        if x.shape[:-2] != y.shape[:-2]:
            raise InputError(
                f"batch axes of x and y differ: {tuple(x.shape[:-2])} vs {tuple(y.shape[:-2])}."
            )
        if isinstance(cost, str):
            if cost not in _COSTS:
                raise InputError(
                    f"cost must be 'sqeuclidean', 'euclidean' or a callable c(x, y); got {cost!r}."
                )
            self._cost_fn = _COSTS[cost]
        elif callable(cost):
            self._cost_fn = cost
        else:
            raise TypeError(f"cost must be a string or a callable, got {type(cost).__name__}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise InputError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.x, self.y, self.cost = x, y, cost
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        c = self.cost if isinstance(self.cost, str) else getattr(self.cost, "__name__", "callable")
        return (
            f"PointCloud(n={self.shape[0]}, m={self.shape[1]}, d={self.x.shape[-1]}, cost={c!r}, "
            f"chunk_size={self.chunk_size}, batch={self.batch_shape})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[-2], self.y.shape[-2])

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[:-2])

    @property
    def is_online(self) -> bool:
        return self.chunk_size is not None

    def _new(self, x, y) -> PointCloud:
        return PointCloud(x, y, self.cost, chunk_size=self.chunk_size)

    def self_geometries(self) -> tuple[PointCloud, PointCloud]:
        """``(PointCloud(x, x), PointCloud(y, y))`` with the same cost and tiling."""
        return self._new(self.x, self.x), self._new(self.y, self.y)

    def _derived(self, x, y, cost_map) -> PointCloud:
        """A geometry on transformed points that keeps this one's materialised cost
        transformed by ``cost_map`` (when still valid), so distances are computed once."""
        out = self._new(x, y)
        cached = self.__dict__.get("_dense")
        version = _versions(x, y)
        if cached is not None and version is not None and cached[0] == _versions(self.x, self.y):
            out.__dict__["_dense"] = (version, DenseCost(cost_map(cached[1].C)))
        return out

    def reshape_batch(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        (n, m), d = self.shape, self.x.shape[-1]
        return self._derived(self.x.reshape(*batch_shape, n, d), self.y.reshape(*batch_shape, m, d),
                             lambda C: C.reshape(*batch_shape, n, m))

    def detach(self) -> PointCloud:
        return self._derived(self.x.detach(), self.y.detach(), torch.Tensor.detach)

    def tensors(self):
        return (self.x, self.y)

    def rebuild(self, x, y):
        return self._new(x, y)

    def _c(self, x, y) -> torch.Tensor:
        C = self._cost_fn(x, y)
        if not isinstance(C, torch.Tensor):
            raise TypeError(f"the cost callable must return a torch.Tensor, got {type(C).__name__}.")
        if not C.is_floating_point():
            raise TypeError(
                f"the cost callable returned dtype {C.dtype}; it must return a floating tensor "
                f"of the points' dtype ({x.dtype}). Cast inside the callable, e.g. c(x, y).to(x.dtype)."
            )
        if C.shape[-2:] != (x.shape[-2], y.shape[-2]):
            raise InputError(
                f"the cost callable returned shape {tuple(C.shape)} for inputs {tuple(x.shape)} and "
                f"{tuple(y.shape)}; it must return (..., {x.shape[-2]}, {y.shape[-2]})."
            )
        return C

    def cost_matrix(self) -> torch.Tensor:
        return self._c(self.x, self.y)

    def to_dense(self) -> DenseCost:
        return DenseCost(self.cost_matrix())

    def _row_chunks(self):
        n, m = self.shape
        cs = self.chunk_size or max(1, _DEFAULT_CHUNK_ENTRIES // max(m, 1))
        for s in range(0, n, cs):
            yield s, min(s + cs, n)

    def _col_chunks(self):
        n, m = self.shape
        cs = self.chunk_size or max(1, _DEFAULT_CHUNK_ENTRIES // max(n, 1))
        for s in range(0, m, cs):
            yield s, min(s + cs, m)

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_online:
            with torch.no_grad():
                return self._materialised().cost_bounds()
        cached = self.__dict__.get("_bounds")
        if cached is None:
            with torch.no_grad():
                hi, lo = [], []
                for s, e in self._row_chunks():
                    C = self._c(self.x[..., s:e, :], self.y).flatten(-2)
                    hi.append(C.amax(-1))
                    lo.append(C.amin(-1))
            cached = (torch.stack(lo, 0).amin(0), torch.stack(hi, 0).amax(0))
            self.__dict__["_bounds"] = cached
        return cached

    def _materialised(self) -> DenseCost | None:
        """The cost matrix when this geometry is not online. Its detached value is computed
        once and kept (every later reduction and bound reads it; the cache is dropped if
        ``x`` or ``y`` is modified in place). Under autograd with points that require
        gradients it is rebuilt per call, so no graph is kept alive between calls."""
        if self.is_online:
            return None
        version = _versions(self.x, self.y)
        if version is None or (torch.is_grad_enabled() and (self.x.requires_grad or self.y.requires_grad)):
            return DenseCost(self.cost_matrix())
        cached = self.__dict__.get("_dense")
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = self.__dict__["_dense"] = (version, DenseCost(self.cost_matrix()))
        return cached[1]

    def lse(self, h, log_w, eps, axis):
        dense = self._materialised()
        if dense is not None:
            return dense.lse(h, log_w, eps, axis)
        hw = h + eps * log_w
        if axis == 1:
            out = []
            for s, e in self._row_chunks():
                z = (hw.unsqueeze(-2) - self._c(self.x[..., s:e, :], self.y)) / eps
                out.append(logsumexp_pair(z, dim=-1, overwrite=True))
            return torch.cat([p[0] for p in out], -1), torch.cat([p[1] for p in out], -1)
        pairs = []
        for s, e in self._col_chunks():
            z = (hw.unsqueeze(-1) - self._c(self.x, self.y[..., s:e, :])) / eps
            pairs.append(logsumexp_pair(z, dim=-2, overwrite=True))
        return torch.cat([p[0] for p in pairs], -1), torch.cat([p[1] for p in pairs], -1)

    def _reduce_chunk(self, xs, y, fs, g, as_, b, eps, accumulate, round_to=None):
        C = self._c(xs, y)
        P = plan_block(fs, g, as_, b, C, eps)
        if round_to is not None:
            P = P.to(round_to)
        if accumulate is not None and accumulate != P.dtype:
            P, C = P.to(accumulate), C.to(accumulate)
        return P.sum(-1), P.sum(-2), (P * C).sum((-2, -1))

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        dense = self._materialised()
        if dense is not None:
            return dense.plan_reduce(f, g, a, b, eps, accumulate=accumulate, round_to=round_to)
        rows, cols, tc = [], 0.0, 0.0
        need_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.x, self.y, f, g, a, b)
        )
        for s, e in self._row_chunks():
            args = (self.x[..., s:e, :], self.y, f[..., s:e], g, a[..., s:e], b)
            if need_grad and self.is_online:
                # recompute the tile in backward: memory stays O((n + m) * chunk)
                r, c, t = checkpoint(self._reduce_chunk, *args, eps, accumulate, round_to, use_reentrant=False)
            else:
                r, c, t = self._reduce_chunk(*args, eps, accumulate, round_to)
            rows.append(r)
            cols = cols + c
            tc = tc + t
        return torch.cat(rows, -1), cols, tc

    @property
    def has_transport_cost_vjp(self) -> bool:
        return self.cost == "sqeuclidean"

    def transport_cost_vjp(self, Pv, PTu, r, c):
        r"""For :math:`C_{ij} = \|x_i - y_j\|^2`: :math:`\nabla_{x_i} = 2(r_i x_i - (P y)_i)`,
        :math:`\nabla_{y_j} = 2(c_j y_j - (P^\top x)_j)` (one plan product per coordinate)."""
        if not self.has_transport_cost_vjp:
            return super().transport_cost_vjp(Pv, PTu, r, c)
        x, y = self.x.detach(), self.y.detach()
        Py = torch.stack([Pv(y[..., k]) for k in range(y.shape[-1])], -1)
        PTx = torch.stack([PTu(x[..., k]) for k in range(x.shape[-1])], -1)
        return 2.0 * (r.unsqueeze(-1) * x - Py), 2.0 * (c.unsqueeze(-1) * y - PTx)

    def marginals(self, f, g, a, b, eps):
        dense = self._materialised()
        if dense is not None:
            return dense.marginals(f, g, a, b, eps)
        return super().marginals(f, g, a, b, eps)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        dense = self._materialised()
        if dense is not None:
            return dense.plan_matvec(f, g, a, b, eps, vec, axis)
        if axis == 1:
            out = []
            for s, e in self._row_chunks():
                P = plan_block(f[..., s:e], g, a[..., s:e], b, self._c(self.x[..., s:e, :], self.y), eps)
                out.append(torch.matmul(P, vec.unsqueeze(-1)).squeeze(-1))
            return torch.cat(out, -1)
        out = 0.0
        for s, e in self._row_chunks():
            P = plan_block(f[..., s:e], g, a[..., s:e], b, self._c(self.x[..., s:e, :], self.y), eps)
            out = out + torch.matmul(vec[..., s:e].unsqueeze(-2), P).squeeze(-2)
        return out

    def plan_operator(self, f, g, a, b, eps):
        if self.is_online:
            return super().plan_operator(f, g, a, b, eps)
        return self._materialised().plan_operator(f, g, a, b, eps)

    def scaling_engine(self, a, b, log_a, log_b):
        if self.is_online:
            return None
        return self._materialised().scaling_engine(a, b, log_a, log_b)
