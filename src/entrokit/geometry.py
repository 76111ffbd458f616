r"""Geometries: how a solver sees the ground cost.

A solver never touches the cost directly; it calls a handful of primitives that every
geometry implements, so one Sinkhorn loop serves dense matrices and point clouds whose
cost is computed on the fly in chunks (never materialising the :math:`n\times m` matrix).

The central primitive is the soft-min (soft :math:`c`-transform) along one axis,

.. math::

    \operatorname{softmin}_\varepsilon(h, w)_i = -\varepsilon \log \sum_j
        w_j \exp\big((h_j - C_{ij})/\varepsilon\big),

computed stably with log-sum-exp from :math:`\log w` (zero weights give :math:`\log 0 =
-\infty`, which drops the term exactly).

Shapes: geometries are stored with a leading batch axis ``(B, n, m)`` once a solver has
canonicalised them; the public constructors also accept unbatched inputs.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor, check_same_dtype_device

__all__ = ["Geometry", "DenseCost", "PointCloud", "as_geometry"]

CostName = Literal["sqeuclidean", "euclidean"]
CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Keep chunks of the online cost at about this many entries (64 MiB in float64).
_DEFAULT_CHUNK_ENTRIES = 1 << 23


class Geometry:
    """Base class: the primitives a solver may call. Subclasses are immutable."""

    batched: bool

    @property
    def shape(self) -> tuple[int, int]:  # (n, m)
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def batch_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def is_online(self) -> bool:
        """True when the cost is never stored as a full matrix."""
        return False

    def cost_matrix(self) -> torch.Tensor:
        """The dense cost ``(..., n, m)`` (materialises it for point clouds)."""
        raise NotImplementedError

    def with_batch(self) -> Geometry:
        """Same geometry with a leading batch axis of size 1 when unbatched."""
        raise NotImplementedError

    def squeeze_batch(self) -> Geometry:
        raise NotImplementedError

    def detach(self) -> Geometry:
        raise NotImplementedError

    def max_cost(self) -> torch.Tensor:
        """max_ij |C_ij| per problem, shape ``(B,)`` (used by the eps-scaling start)."""
        raise NotImplementedError

    def cost_range(self) -> torch.Tensor:
        """max C - min C per problem, shape ``(B,)``."""
        raise NotImplementedError

    # -- primitives on batched tensors -----------------------------------------------
    def softmin(self, h: torch.Tensor, log_w: torch.Tensor, eps: float, axis: int) -> torch.Tensor:
        r"""Soft c-transform. ``axis=1`` reduces over columns: input ``h, log_w`` of shape
        ``(B, m)``, output ``(B, n)``; ``axis=0`` reduces over rows: ``(B, n) -> (B, m)``."""
        raise NotImplementedError

    def plan_reduce(
        self, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Row sums, column sums and :math:`\langle C, P\rangle` of
        :math:`P_{ij} = a_i b_j \exp((f_i+g_j-C_{ij})/\varepsilon)`, differentiable in
        ``a, b`` and the cost, without storing P for online geometries."""
        raise NotImplementedError

    def plan(self, f, g, a, b, eps) -> torch.Tensor:
        """The dense plan ``(B, n, m)`` (materialised)."""
        raise NotImplementedError

    def plan_matvec(self, f, g, a, b, eps, vec: torch.Tensor, axis: int) -> torch.Tensor:
        """``P @ vec`` (axis=1, vec ``(B, m)``) or ``P.T @ vec`` (axis=0, vec ``(B, n)``)."""
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the cost depends on (for custom autograd Functions)."""
        raise NotImplementedError

    def rebuild(self, *tensors: torch.Tensor) -> Geometry:
        """A copy of this geometry built on other tensors of the same shapes."""
        raise NotImplementedError


def exp_floor(dtype: torch.dtype) -> float:
    """Exponents below this are treated as exp(-inf) = 0.

    Exponentials that underflow into subnormal numbers run an order of magnitude slower
    on x86 CPUs (and subnormals slow down every later product), while terms below
    ``exp(floor)`` are far below the working precision of any sum they enter.
    """
    return -600.0 if dtype == torch.float64 else -80.0


def _plan_block(f, g, a, b, C, eps) -> torch.Tensor:
    r"""P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) for a block of rows/columns.

    The weights multiply (rather than enter as log a) so that gradients with respect to
    zero weights are finite; the exponent is clamped below overflow, which only touches
    pairs whose weights are zero.
    """
    S = (f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps
    S = S.clamp(exp_floor(S.dtype), 0.5 * math.log(torch.finfo(S.dtype).max))
    return torch.exp(S) * a.unsqueeze(-1) * b.unsqueeze(-2)


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable log-sum-exp (differentiable); -inf for an all -inf slice."""
    mx = x.detach().amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    z = (x - mx).clamp_min(exp_floor(x.dtype))
    z = torch.where(x == -float("inf"), torch.full_like(z, -float("inf")), z)
    return torch.log(torch.exp(z).sum(dim)) + mx.squeeze(dim)


class DenseCost(Geometry):
    """A cost given as a dense matrix ``(..., n, m)``."""

    def __init__(self, cost: torch.Tensor):
        cost = as_float_tensor(cost, "cost")
        if cost.dim() not in (2, 3):
            raise InputError(
                f"cost must have shape (n, m) or (batch, n, m), got shape {tuple(cost.shape)}; "
                "flatten extra batch axes with cost.reshape(-1, n, m)."
            )
        self.C = cost
        self.batched = cost.dim() == 3

    def __repr__(self) -> str:
        return f"DenseCost(shape={tuple(self.C.shape)}, dtype={self.C.dtype}, device={self.C.device})"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.C.shape[-2], self.C.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.C.dtype

    @property
    def device(self) -> torch.device:
        return self.C.device

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.C.shape[:-2])

    def cost_matrix(self) -> torch.Tensor:
        return self.C

    def with_batch(self) -> DenseCost:
        if self.batched:
            return self
        out = DenseCost(self.C.unsqueeze(0))
        if "_bounds" in self.__dict__:
            lo, hi = self.__dict__["_bounds"]
            out.__dict__["_bounds"] = (lo.reshape(1), hi.reshape(1))
        return out

    def squeeze_batch(self) -> DenseCost:
        return DenseCost(self.C.squeeze(0)) if self.batched else self

    def detach(self) -> DenseCost:
        out = DenseCost(self.C.detach())
        if "_bounds" in self.__dict__:
            out.__dict__["_bounds"] = self.__dict__["_bounds"]
        return out

    def max_cost(self) -> torch.Tensor:
        return self.C.detach().abs().amax(dim=(-2, -1))

    def cost_range(self) -> torch.Tensor:
        lo, hi = self.cost_bounds()
        return hi - lo

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min C, max C) per problem in one pass (cached; NaN propagates)."""
        cached = self.__dict__.get("_bounds")
        if cached is None:
            flat = self.C.detach().flatten(-2)
            cached = (flat.amin(-1), flat.amax(-1))  # faster than aminmax on CPU
            self.__dict__["_bounds"] = cached
        return cached

    def softmin(self, h, log_w, eps, axis, out: torch.Tensor | None = None):
        """Soft c-transform; ``out`` is an optional ``(B, n, m)`` workspace (no grad)."""
        C = self.C
        hw = h + eps * log_w
        if out is None or torch.is_grad_enabled() and (C.requires_grad or h.requires_grad):
            z = (hw.unsqueeze(-2) if axis == 1 else hw.unsqueeze(-1)) - C
            return -eps * _logsumexp(z / eps, dim=-1 if axis == 1 else -2)
        # in place on the workspace: one pass per step, no allocation of n x m temporaries
        dim = -1 if axis == 1 else -2
        torch.sub(hw.unsqueeze(-2) if axis == 1 else hw.unsqueeze(-1), C, out=out)
        out.div_(eps)
        mx = out.amax(dim=dim, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        out.sub_(mx).clamp_(min=exp_floor(out.dtype)).exp_()
        lse = out.sum(dim=dim).log_() + mx.squeeze(dim)
        return -eps * lse

    def plan_reduce(self, f, g, a, b, eps):
        C = self.C
        P = _plan_block(f, g, a, b, C, eps)
        return P.sum(-1), P.sum(-2), (P * C).sum((-2, -1))

    def plan(self, f, g, a, b, eps):
        return _plan_block(f, g, a, b, self.C, eps)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        P = _plan_block(f, g, a, b, self.C, eps)
        if axis == 1:
            return torch.matmul(P, vec.unsqueeze(-1)).squeeze(-1)
        return torch.matmul(vec.unsqueeze(-2), P).squeeze(-2)

    def tensors(self):
        return (self.C,)

    def rebuild(self, C):
        return DenseCost(C)


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


class PointCloud(Geometry):
    r"""Cost computed from two point clouds, ``C_ij = c(x_i, y_j)``.

    Args:
        x: source points ``[n, d]`` or ``[B, n, d]``.
        y: target points ``[m, d]`` or ``[B, m, d]``.
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`, the POT/OTT convention; GeomLoss uses
            half of it), ``"euclidean"`` (:math:`\|x-y\|`, with a zero gradient where points
            coincide) or a callable ``c(x, y)`` mapping ``[B, n', d], [B, m', d]`` to
            ``[B, n', m']``.
        chunk_size: when given, every reduction is computed on blocks of at most
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
        if x.dim() not in (2, 3) or y.dim() != x.dim():
            raise InputError(
                f"x and y must both have shape (n, d) / (m, d), or (batch, n, d) / (batch, m, d); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}. Add a feature axis with x[:, None] "
                "for 1-D points."
            )
        if x.shape[-1] != y.shape[-1]:
            raise InputError(
                f"x and y must have the same point dimension, got d={x.shape[-1]} and d={y.shape[-1]}."
            )
        if x.dim() == 3 and x.shape[0] != y.shape[0]:
            raise InputError(f"batch sizes of x and y differ: {x.shape[0]} vs {y.shape[0]}.")
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
        self.batched = x.dim() == 3

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

    def with_batch(self) -> PointCloud:
        return self if self.batched else self._new(self.x.unsqueeze(0), self.y.unsqueeze(0))

    def squeeze_batch(self) -> PointCloud:
        return self._new(self.x.squeeze(0), self.y.squeeze(0)) if self.batched else self

    def detach(self) -> PointCloud:
        return self._new(self.x.detach(), self.y.detach())

    def _c(self, x, y) -> torch.Tensor:
        C = self._cost_fn(x, y)
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

    def max_cost(self) -> torch.Tensor:
        with torch.no_grad():
            out = [self._c(self.x[..., s:e, :], self.y).abs().amax(dim=(-2, -1)) for s, e in self._row_chunks()]
        return torch.stack(out, 0).amax(0)

    def cost_range(self) -> torch.Tensor:
        with torch.no_grad():
            hi, lo = [], []
            for s, e in self._row_chunks():
                C = self._c(self.x[..., s:e, :], self.y)
                hi.append(C.amax(dim=(-2, -1)))
                lo.append(C.amin(dim=(-2, -1)))
        return torch.stack(hi, 0).amax(0) - torch.stack(lo, 0).amin(0)

    def softmin(self, h, log_w, eps, axis):
        hw = h + eps * log_w
        if axis == 1:
            out = []
            for s, e in self._row_chunks():
                z = hw.unsqueeze(-2) - self._c(self.x[..., s:e, :], self.y)
                out.append(-eps * _logsumexp(z / eps, dim=-1))
            return torch.cat(out, -1)
        out = []
        for s, e in self._col_chunks():
            z = hw.unsqueeze(-1) - self._c(self.x, self.y[..., s:e, :])
            out.append(-eps * _logsumexp(z / eps, dim=-2))
        return torch.cat(out, -1)

    def _reduce_chunk(self, xs, y, fs, g, as_, b, eps):
        C = self._c(xs, y)
        P = _plan_block(fs, g, as_, b, C, eps)
        return P.sum(-1), P.sum(-2), (P * C).sum((-2, -1))

    def plan_reduce(self, f, g, a, b, eps):
        if not self.is_online:
            return DenseCost(self.cost_matrix()).plan_reduce(f, g, a, b, eps)
        rows, cols, tc = [], 0.0, 0.0
        need_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.x, self.y, f, g, a, b)
        )
        for s, e in self._row_chunks():
            args = (self.x[..., s:e, :], self.y, f[..., s:e], g, a[..., s:e], b)
            if need_grad:
                # recompute the block in backward: memory stays O((n + m) * chunk)
                r, c, t = checkpoint(self._reduce_chunk, *args, eps, use_reentrant=False)
            else:
                r, c, t = self._reduce_chunk(*args, eps)
            rows.append(r)
            cols = cols + c
            tc = tc + t
        return torch.cat(rows, -1), cols, tc

    def plan(self, f, g, a, b, eps):
        return _plan_block(f, g, a, b, self.cost_matrix(), eps)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        if axis == 1:
            out = []
            for s, e in self._row_chunks():
                P = _plan_block(f[..., s:e], g, a[..., s:e], b, self._c(self.x[..., s:e, :], self.y), eps)
                out.append(torch.matmul(P, vec.unsqueeze(-1)).squeeze(-1))
            return torch.cat(out, -1)
        out = 0.0
        for s, e in self._row_chunks():
            P = _plan_block(f[..., s:e], g, a[..., s:e], b, self._c(self.x[..., s:e, :], self.y), eps)
            out = out + torch.matmul(vec[..., s:e].unsqueeze(-2), P).squeeze(-2)
        return out

    def tensors(self):
        return (self.x, self.y)

    def rebuild(self, x, y):
        return self._new(x, y)


def as_geometry(cost) -> Geometry:
    """Wrap a tensor as :class:`DenseCost`; pass geometries through."""
    if isinstance(cost, Geometry):
        return cost
    if isinstance(cost, torch.Tensor):
        return DenseCost(cost)
    raise TypeError(
        f"cost must be a torch.Tensor of shape (n, m) or an entrokit geometry (PointCloud, "
        f"DenseCost), got {type(cost).__name__}."
    )
