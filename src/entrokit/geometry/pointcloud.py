r"""Costs computed from two point clouds, ``C_ij = c(x_i, y_j)``, dense or online (in tiles).

**When the cost is materialised.** A :class:`PointCloud` stores its cost matrix only when
the dense path fits a memory budget: the dense solvers hold about
:data:`DENSE_COPIES` matrices of ``B n m`` entries (cost, kernel, plan and a temporary), so
the geometry goes online when ``DENSE_COPIES * B * n * m * itemsize`` exceeds the budget.
The budget is :func:`memory_budget` (2 GiB unless set by :func:`set_memory_budget`, the
``ENTROKIT_MEMORY_BUDGET`` environment variable in bytes, or per geometry with
``memory_budget=``). ``online=True``/``False`` overrides the rule. Every solver, the
divergences and ``entrokit solve`` build their point clouds through this class, so they
share the rule.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor, check_same_dtype_device
from entrokit.geometry import _online, _triton
from entrokit.geometry.base import PointGeometry, exp_floor, plan_block
from entrokit.geometry.dense import DenseCost

__all__ = ["PointCloud", "memory_budget", "set_memory_budget", "DENSE_COPIES"]

CostName = Literal["sqeuclidean", "euclidean", "pnorm"]
CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Keep row chunks of the online plan reductions at about this many entries.
_DEFAULT_CHUNK_ENTRIES = 1 << 22
# The dense path holds about this many n x m matrices at once.
DENSE_COPIES = 4
_DEFAULT_BUDGET = 2 << 30
_budget: int | None = None


def memory_budget() -> int:
    """Bytes the dense path of a :class:`PointCloud` may use (module docstring)."""
    if _budget is not None:
        return _budget
    env = os.environ.get("ENTROKIT_MEMORY_BUDGET")
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise InputError(f"ENTROKIT_MEMORY_BUDGET must be a number of bytes, got {env!r}.") from None
        if value > 0:
            return value
        raise InputError(f"ENTROKIT_MEMORY_BUDGET must be positive, got {env!r}.")
    return _DEFAULT_BUDGET


def set_memory_budget(nbytes: int | None) -> None:
    """Set the process-wide budget in bytes (``None`` restores the default/environment)."""
    global _budget
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, Real) or nbytes <= 0):
        raise InputError(f"the memory budget must be a positive number of bytes or None, got {nbytes!r}.")
    _budget = None if nbytes is None else int(nbytes)


def _centred(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clouds shifted by the midpoint of their means (translation-invariant costs
    only): keeps the matmul expansion's cancellation at the clouds' radius."""
    c = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)).detach()
    return x - c, y - c


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for (B, n, d), (B, m, d) -> (B, n, m), clamped at 0."""
    x, y = _centred(x, y)
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1).unsqueeze(-2)
    with _online.ieee_matmul(x.device):
        d = torch.matmul(x, y.transpose(-1, -2))
    # in place: one n x m buffer per call (several temporaries fragment the CPU heap)
    return d.mul_(-2.0).add_(xx).add_(yy).clamp_min_(0.0)


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


def _coordinate_sum(x: torch.Tensor, y: torch.Tensor, term) -> torch.Tensor:
    """sum_k term(x_ik - y_jk), one coordinate at a time (no (n, m, d) temporary)."""
    out = None
    for k in range(x.shape[-1]):
        t = term(x[..., :, k].unsqueeze(-1) - y[..., :, k].unsqueeze(-2))
        out = t if out is None else out + t
    return out


def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j|| from coordinate differences (no cancellation near coincident points)."""
    return _SafeSqrt.apply(_coordinate_sum(x, y, lambda t: t * t))


class _PNorm:
    r""":math:`\sum_k |x_k - y_k|^p` (the p-th power of the :math:`\ell_p` distance)."""

    def __init__(self, p: float):
        self.p = p
        self.__name__ = f"pnorm(p={p:g})"

    def __call__(self, x, y):
        p = self.p
        if p == 1.0:
            return _coordinate_sum(x, y, torch.abs)
        if p == 2.0:
            return _coordinate_sum(x, y, lambda t: t * t)
        # |t|^p has gradient p |t|^(p-1) sign(t), finite at 0 for p >= 1
        return _coordinate_sum(x, y, lambda t: t.abs().pow(p))


_COSTS: dict[str, CostFn] = {"sqeuclidean": _sq_dist, "euclidean": _euclidean}


def check_pnorm_exponent(cost: str, p) -> float | None:
    """The exponent ``p`` of ``cost="pnorm"`` as a float (``None`` for the other costs,
    which take none); ``p >= 1`` keeps the gradient of :math:`|t|^p` finite at 0."""
    if cost != "pnorm":
        if p is not None:
            raise InputError(f"p={p!r} is only used with cost='pnorm'; got cost={cost!r}. Drop p, or pass cost='pnorm'.")
        return None
    if p is None:
        raise InputError("cost='pnorm' needs the exponent p (C_ij = sum_k |x_ik - y_jk|^p), e.g. p=1.5.")
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(p) or p < 1:
        raise InputError(f"cost='pnorm' needs a finite exponent p >= 1 (p=1: Manhattan), got p={p!r}.")
    return float(p)
_KERNELS = ("auto", "compile", "eager", "triton")


def _versions(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """In-place modification counters of the points; ``None`` for inference tensors, which
    do not track them (nothing is cached for those)."""
    if x.is_inference() or y.is_inference():
        return None
    return (x._version, y._version)


class PointCloud(PointGeometry):
    r"""Cost computed from two point clouds, ``C_ij = c(x_i, y_j)``.

    Args:
        x: source points ``[..., n, d]``.
        y: target points ``[..., m, d]`` (the same batch axes as ``x``).
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`, the POT/OTT convention; GeomLoss uses
            half of it), ``"euclidean"`` (:math:`\|x-y\|`, with a zero gradient where points
            coincide), ``"pnorm"`` (:math:`\sum_k |x_k-y_k|^p`, give ``p >= 1``) or a
            callable ``c(x, y)`` mapping ``[B, n', d], [B, m', d]`` to a floating
            ``[B, n', m']`` (evaluated on tiles when online).
        p: the exponent of ``cost="pnorm"``.
        online: ``True`` computes every reduction on tiles, never storing the ``n x m``
            cost (memory :math:`O(n+m)` plus a few cache-sized tiles); ``False``
            materialises the cost once (fastest when it fits); ``None`` (default) decides
            by the memory budget (module docstring).
        chunk_size: rows per tile of the online reductions (implies ``online=True``;
            default: tiles of about a million entries; the fused Triton kernels pick their
            own blocks).
        memory_budget: bytes the dense path may use for this geometry (default
            :func:`memory_budget`).
        kernel: online tile kernel: ``"compile"`` (``torch.compile``; fastest, compiles
            once per process), ``"eager"`` (plain batched matmuls) or ``"auto"``
            (compile for passes of at least ``2**24`` entries; on CUDA with a squared-Euclidean
            cost and triton installed: the fused Triton kernels); see
            :mod:`entrokit.geometry._online`. ``"triton"``: the fused kernels of
            :mod:`entrokit.geometry._triton` (squared-Euclidean cost; CUDA tensors, or CPU
            under ``TRITON_INTERPRET=1``).
        allow_tf32: TF32 products in the fused Triton kernels (default ``False``: full
            float32). Each exponent then errs by up to about :math:`2\cdot10^{-3}R^2/\varepsilon`
            (:math:`R` the radius of the centred clouds; :mod:`entrokit.geometry._triton`).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: CostName | CostFn = "sqeuclidean",
        *,
        p: float | None = None,
        online: bool | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        kernel: str = "auto",
        allow_tf32: bool = False,
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
            p = check_pnorm_exponent(cost, p)
            if cost == "pnorm":
                self._cost_fn = _PNorm(p)
            elif cost in _COSTS:
                self._cost_fn = _COSTS[cost]
            else:
                raise InputError(
                    f"cost must be 'sqeuclidean', 'euclidean', 'pnorm' or a callable c(x, y); got {cost!r}."
                )
        elif callable(cost):
            self._cost_fn = cost
        else:
            raise TypeError(f"cost must be a string or a callable, got {type(cost).__name__}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1
        ):
            raise InputError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        if online not in (None, True, False):
            raise InputError(f"online must be True, False or None (automatic), got {online!r}.")
        if online is False and chunk_size is not None:
            raise InputError("chunk_size sets the tiles of the online path; it contradicts online=False.")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, Real) or memory_budget <= 0
        ):
            raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
        if kernel not in _KERNELS:
            raise InputError(f"kernel must be one of {_KERNELS}, got {kernel!r}.")
        if kernel == "triton":
            if cost != "sqeuclidean":
                raise InputError(f"kernel='triton' computes the squared-Euclidean cost only, got cost={cost!r}; "
                                 "use kernel='auto' for other costs.")
            _triton.check_usable(x.device)
        if allow_tf32 not in (True, False):
            raise InputError(f"allow_tf32 must be True or False, got {allow_tf32!r}.")
        self.allow_tf32 = bool(allow_tf32)
        self.x, self.y, self.cost, self.p = x, y, cost, p
        self.chunk_size, self.memory_budget, self.kernel = chunk_size, memory_budget, kernel
        if online is None:
            online = chunk_size is not None or self.dense_bytes() > (memory_budget or globals()["memory_budget"]())
        self._online = bool(online)

    def dense_bytes(self) -> int:
        """Estimated peak bytes of the dense path: ``DENSE_COPIES * B * n * m * itemsize``."""
        n, m = self.shape
        B = 1
        for s in self.batch_shape:
            B *= s
        return DENSE_COPIES * B * n * m * self.x.element_size()

    def __repr__(self) -> str:
        c = self.cost if isinstance(self.cost, str) else getattr(self.cost, "__name__", "callable")
        return (
            f"PointCloud(n={self.shape[0]}, m={self.shape[1]}, d={self.x.shape[-1]}, cost={c!r}, "
            f"online={self.is_online}, batch={self.batch_shape})"
        )

    @property
    def is_online(self) -> bool:
        return self._online

    def _new(self, x, y) -> PointCloud:
        return type(self)(x, y, self.cost, p=self.p, online=self._online, chunk_size=self.chunk_size,
                          memory_budget=self.memory_budget, kernel=self.kernel, allow_tf32=self.allow_tf32)

    def self_geometries(self) -> tuple[PointCloud, PointCloud]:
        """``(PointCloud(x, x), PointCloud(y, y))`` with the same cost and tiling."""
        return self._new(self.x, self.x), self._new(self.y, self.y)

    def _derived(self, x, y, cost_map) -> PointCloud:
        """A geometry on transformed points that keeps this one's materialised cost
        transformed by ``cost_map`` (when still valid), so distances are computed once."""
        out = self._new(x, y)
        if "_radius_sq" in self.__dict__:  # the same points, reshaped or detached
            out.__dict__["_radius_sq"] = self.__dict__["_radius_sq"]
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
        if not (self.x.requires_grad or self.y.requires_grad):
            return self  # nothing to cut: keep the caches (cost, bounds, radius)
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

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_online:
            with torch.no_grad():
                return self._materialised().cost_bounds()
        cached = self.__dict__.get("_bounds")
        if cached is None:
            with torch.no_grad():
                # running bounds updated in place (no list of per-chunk results: small
                # long-lived tensors between the chunk buffers would grow the heap)
                shape = self.batch_shape
                lo = torch.full(shape, float("inf"), dtype=self.dtype, device=self.device)
                hi = torch.full(shape, -float("inf"), dtype=self.dtype, device=self.device)
                for s, e in self._row_chunks():
                    C = self._c(self.x[..., s:e, :], self.y).flatten(-2)
                    torch.minimum(lo, C.amin(-1), out=lo)
                    torch.maximum(hi, C.amax(-1), out=hi)
                    del C
                    # NaN propagates through minimum/maximum
            cached = (lo, hi)
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

    def _wide_tiles(self, eps: float) -> bool:
        """Float64 tiles for a float32 squared-Euclidean cost too spread for float32 exponents
        (:func:`entrokit.geometry._online.needs_wide_tiles`); the radius is measured once."""
        if self.cost != "sqeuclidean" or self.dtype != torch.float32:
            return False
        r2 = self.__dict__.get("_radius_sq")
        if r2 is None:
            with torch.no_grad():
                r2 = self.__dict__["_radius_sq"] = _online.radius_sq(self.x, self.y)
        return _online.needs_wide_tiles(r2, eps, self.dtype)

    def _tile_cost(self, transpose: bool):
        """The cost of a tile for :mod:`entrokit.geometry._online` (``None``: squared
        Euclidean by matmul expansion); ``transpose`` for reductions over the rows."""
        if self.cost == "sqeuclidean":
            return None
        if not transpose or isinstance(self.cost, str):  # the named costs are symmetric
            return self._c
        return lambda y, x: self._c(x, y).transpose(-1, -2)

    def lse(self, h, log_w, eps, axis):
        dense = self._materialised()
        if dense is not None:
            return dense.lse(h, log_w, eps, axis)
        rows, cols = (self.x, self.y) if axis == 1 else (self.y, self.x)
        if self._fused():  # the fused kernel's pairs, or its differentiable lse
            pair = _triton.run_or_fallback(
                self.kernel, lambda: self._fused_lse(rows, cols, h + eps * log_w, eps, axis), lambda: None)
            if pair is not None:
                return pair
        B, n, m = rows.shape[0] if rows.dim() == 3 else 1, rows.shape[-2], cols.shape[-2]
        compiled = _online.use_compiled(self.kernel, B * n * m)
        lse = _online.online_lse(rows, cols, h + eps * log_w, eps, self._tile_cost(axis == 0), compiled,
                                 self.chunk_size, self._wide_tiles(eps))
        return self._lse_pair(lse)

    def _fused(self) -> bool:
        """Whether the online reductions run in the fused Triton kernels (:func:`_triton.use_triton`)."""
        return _triton.use_triton(self.kernel, self.device, self.cost)

    def _fused_lse(self, rows, cols, hw, eps, axis):
        opts = dict(allow_tf32=self.allow_tf32, wide=self._wide_tiles(eps))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, cols, hw)):
            return self._lse_pair(_triton.online_lse(rows, cols, hw, eps, **opts))
        # the centred, scaled points are kept per axis for the current eps while x, y are unchanged
        key, version = (axis, opts["wide"]), _versions(self.x, self.y)
        cache = self.__dict__.setdefault("_fused_points", {})
        hit = cache.get(key)
        if hit is None or version is None or hit[:2] != (eps, version):
            hit = cache[key] = (eps, version, _triton.Prepared(rows, cols, eps, "sqeuclidean", opts["wide"]))
        return _triton.lse_pairs(rows, cols, hw, eps, prepared=hit[2], **opts)

    @staticmethod
    def _lse_pair(lse):
        # as a partial pair: M = lse (constant), S = exp(lse - M) = 1 carrying the gradient
        mx = lse.detach()
        empty = mx == -float("inf")
        s = torch.where(empty, torch.zeros_like(lse), torch.exp(lse - mx.masked_fill(empty, 0.0)))
        return mx, s

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
        need_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.x, self.y, f, g, a, b)
        )
        if need_grad and isinstance(self.cost, str) and accumulate is None and round_to is None:
            # the named costs: a custom backward recomputes the tiles (O(n + m) memory)
            return _OnlinePlan.apply(self, f, g, a, b, None, None, eps, self.x, self.y)[:3]
        rows, cols, tc = [], 0.0, 0.0
        row_out = None
        for s, e in self._row_chunks():
            args = (self.x[..., s:e, :], self.y, f[..., s:e], g, a[..., s:e], b)
            if need_grad:
                # a cost callable may hold parameters of its own: autograd sees them through
                # the checkpointed chunk, recomputed in backward
                r, c, t = checkpoint(self._reduce_chunk, *args, eps, accumulate, round_to, use_reentrant=False)
                rows.append(r)
                cols = cols + c
                tc = tc + t
                continue
            r, c, t = self._reduce_chunk(*args, eps, accumulate, round_to)
            if row_out is None:  # preallocated, filled in place (keeps the heap flat)
                row_out = torch.empty(*r.shape[:-1], self.shape[0], dtype=r.dtype, device=r.device)
                cols, tc = c.clone(), t.clone()
            else:
                cols.add_(c)
                tc.add_(t)
            row_out[..., s:e] = r
            del r, c, t
        if row_out is not None:
            return row_out, cols, tc
        return torch.cat(rows, -1), cols, tc

    @property
    def has_transport_cost_vjp(self) -> bool:
        return self.cost == "sqeuclidean"

    def transport_cost_vjp(self, Pv, PTu, r, c):
        r"""For :math:`C_{ij} = \|x_i - y_j\|^2`: :math:`\nabla_{x_i} = 2(r_i x_i - (P y)_i)`,
        :math:`\nabla_{y_j} = 2(c_j y_j - (P^\top x)_j)` (the products ``P y`` and
        ``P^T x`` take all coordinates at once: one pass each over the plan)."""
        if not self.has_transport_cost_vjp:
            return super().transport_cost_vjp(Pv, PTu, r, c)
        x, y = self.x.detach(), self.y.detach()
        Py, PTx = Pv(y), PTu(x)
        return 2.0 * (r.unsqueeze(-1) * x - Py), 2.0 * (c.unsqueeze(-1) * y - PTx)

    def marginals(self, f, g, a, b, eps):
        dense = self._materialised()
        if dense is not None:
            return dense.marginals(f, g, a, b, eps)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (self.x, self.y, f, g, a, b)):
            return super().marginals(f, g, a, b, eps)
        if self._fused():  # row sums in registers, no vector operand
            out = _triton.run_or_fallback(
                self.kernel, lambda: _triton.marginals(self.x, self.y, f + eps * torch.log(a), g + eps * torch.log(b),
                                                       eps, allow_tf32=self.allow_tf32, wide=self._wide_tiles(eps)),
                lambda: None)
            if out is not None:
                return out
        # P 1 and P^T 1 in one pass over the tiles
        ones_m = torch.ones(*g.shape, 1, dtype=g.dtype, device=g.device)
        ones_n = torch.ones(*f.shape, 1, dtype=f.dtype, device=f.device)
        row, col = self._plan_products(f, g, a, b, eps, ones_m, ones_n)
        return row.squeeze(-1), col.squeeze(-1)

    def _plan_products(self, f, g, a, b, eps, V, U):
        """``(P V, P^T U)`` in one pass over the online tiles (no autograd)."""
        if self._fused():
            out = _triton.run_or_fallback(
                self.kernel, lambda: _triton.plan_products(self.x, self.y, f + eps * torch.log(a), g + eps * torch.log(b),
                                                           eps, V, U, allow_tf32=self.allow_tf32,
                                                           wide=self._wide_tiles(eps)), lambda: None)
            if out is not None:
                return out
        return _online.plan_products(self.x, self.y, f + eps * torch.log(a), g + eps * torch.log(b), eps, V, U,
                                     self._tile_cost(False), self.chunk_size, self._wide_tiles(eps))

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        """``P @ vec`` / ``P.T @ vec``; ``vec`` may carry a trailing axis of ``k`` vectors
        (``(B, m, k)`` / ``(B, n, k)``), applied in the same pass over the tiles."""
        dense = self._materialised()
        if dense is not None:
            return dense.plan_matvec(f, g, a, b, eps, vec, axis)
        several = vec.dim() == f.dim() + 1
        V = vec if several else vec.unsqueeze(-1)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (self.x, self.y, f, g, a, b, vec))):
            PV, PTU = self._plan_products(f, g, a, b, eps, V if axis == 1 else None, V if axis == 0 else None)
            out = PV if axis == 1 else PTU
            return out if several else out.squeeze(-1)
        if isinstance(self.cost, str):
            # the named costs: a custom backward recomputes the tiles (O(n + m) memory)
            out = _OnlinePlan.apply(self, f, g, a, b, V if axis == 1 else None, V if axis == 0 else None, eps,
                                    self.x, self.y)[3]
            return out if several else out.squeeze(-1)
        out = [] if axis == 1 else 0.0
        for s, e in self._row_chunks():
            P = plan_block(f[..., s:e], g, a[..., s:e], b, self._c(self.x[..., s:e, :], self.y), eps)
            if axis == 1:
                out.append(torch.matmul(P, V))
            else:
                out = out + torch.matmul(P.transpose(-1, -2), V[..., s:e, :])
        out = torch.cat(out, -2) if axis == 1 else out
        return out if several else out.squeeze(-1)

    def plan_operator(self, f, g, a, b, eps):
        if self.is_online:
            return super().plan_operator(f, g, a, b, eps)
        return self._materialised().plan_operator(f, g, a, b, eps)

    def scaling_engine(self, a, b, log_a, log_b):
        if self.is_online:
            return None
        return self._materialised().scaling_engine(a, b, log_a, log_b)


class _OnlinePlan(torch.autograd.Function):
    r"""Row sums, column sums, :math:`\langle C, P\rangle` and one of ``P V`` / ``Pᵀ U`` of
    the online plan :math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}` of a named
    cost, differentiable in ``x, y, f, g, a, b, V, U`` in :math:`O(n + m)` memory: forward
    runs without a graph, backward recomputes the plan chunk by chunk. With incoming
    gradients :math:`\bar r, \bar c, \bar t, \bar O` the plan's cotangent is
    :math:`w_{ij} = \bar r_i + \bar c_j + \bar t\,C_{ij} + \bar O_i\cdot V_j` (or
    :math:`U_i\cdot\bar O_j`), and with :math:`q = P\odot w`:
    :math:`\bar f_i = \sum_j q_{ij}/\varepsilon`, :math:`\bar g_j = \sum_i q_{ij}/\varepsilon`,
    :math:`\bar a_i = \sum_j w_{ij} b_j e^{(\cdot)}`, :math:`\bar C = \bar t P - q/\varepsilon`
    (pulled back to the points in closed form for the squared Euclidean cost, by autograd
    on the chunk otherwise), :math:`\bar V = P^\top\bar O`, :math:`\bar U = P\bar O`.
    ``geom`` is the point cloud; ``x, y`` its points (passed for autograd)."""

    @staticmethod
    def forward(ctx, geom, f, g, a, b, V, U, eps, x, y):
        geom = geom.detach()
        f_, g_, a_, b_ = f.detach(), g.detach(), a.detach(), b.detach()
        with torch.no_grad():
            rows, cols, tc = geom.plan_reduce(f_, g_, a_, b_, eps)
            out = None
            if V is not None or U is not None:
                PV, PTU = geom._plan_products(f_, g_, a_, b_, eps, None if V is None else V.detach(),
                                              None if U is None else U.detach())
                out = PV if V is not None else PTU
        ctx.geom, ctx.eps = geom, eps
        ctx.save_for_backward(f, g, a, b, V, U)
        return rows, cols, tc, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_rows, g_cols, g_tc, g_out):
        f, g, a, b, V, U = (None if t is None else t.detach() for t in ctx.saved_tensors)
        geom, eps = ctx.geom, ctx.eps
        x, y = geom.x, geom.y
        _, need_f, need_g, need_a, need_b, need_V, need_U, _, need_x, need_y = ctx.needs_input_grad
        need_V, need_U = need_V and g_out is not None, need_U and g_out is not None
        dtype = torch.promote_types(torch.result_type(f, g), torch.result_type(a, b))
        out = {k: torch.zeros_like(t) for k, t, need in (("f", f, need_f), ("g", g, need_g), ("a", a, need_a),
               ("b", b, need_b), ("x", x, need_x), ("y", y, need_y)) if need}
        if need_V:
            out["V"] = torch.zeros_like(V)
        if need_U:
            out["U"] = torch.zeros_like(U)
        lo, hi = exp_floor(dtype), 0.5 * math.log(torch.finfo(dtype).max)
        sq = geom.cost == "sqeuclidean"
        gt = None if g_tc is None else g_tc.to(dtype).unsqueeze(-1).unsqueeze(-1)
        for s, e in geom._row_chunks():
            generic = (need_x or need_y) and not sq
            with torch.enable_grad() if generic else torch.no_grad():
                xs = x[..., s:e, :].detach().requires_grad_(generic and need_x)
                yc = y.detach().requires_grad_(generic and need_y)
                C_graph = geom._c(xs, yc)
            with torch.no_grad():
                C = C_graph.detach()
                # E_ij = exp((f_i + g_j - C_ij)/eps) (clamped as in plan_block), P = a_i b_j E_ij
                E = (f[..., s:e].unsqueeze(-1) + g.unsqueeze(-2) - C).mul_(1.0 / eps).clamp_(lo, hi).exp_()
                w = torch.zeros_like(E)
                if g_rows is not None:
                    w += g_rows[..., s:e].unsqueeze(-1)
                if g_cols is not None:
                    w += g_cols.unsqueeze(-2)
                if gt is not None:
                    w.addcmul_(gt.expand_as(C), C)
                if g_out is not None:
                    if V is not None:
                        w += torch.matmul(g_out[..., s:e, :], V.transpose(-1, -2))
                    else:
                        w += torch.matmul(U[..., s:e, :], g_out.transpose(-1, -2))
                if need_a:
                    out["a"][..., s:e] += torch.matmul(w * E, b.unsqueeze(-1)).squeeze(-1)
                if need_b:
                    out["b"] += torch.matmul(a[..., s:e].unsqueeze(-2), w * E).squeeze(-2)
                P = E.mul_(a[..., s:e].unsqueeze(-1)).mul_(b.unsqueeze(-2))
                if need_V:
                    out["V"] += torch.matmul(P.transpose(-1, -2), g_out[..., s:e, :])
                if need_U:
                    out["U"][..., s:e, :] += torch.matmul(P, g_out)
                q = w.mul_(P)
                if need_f:
                    out["f"][..., s:e] += q.sum(-1) / eps
                if need_g:
                    out["g"] += q.sum(-2) / eps
                if not (need_x or need_y):
                    continue
                # dL/dC = t P - q / eps
                G = q.mul_(-1.0 / eps)
                if gt is not None:
                    G.addcmul_(gt.expand_as(P), P)
                del P, E
                if sq:
                    # C_ij = |x_i - y_j|^2: grad x_i = 2 (x_i sum_j G_ij - sum_j G_ij y_j)
                    xd = x[..., s:e, :].detach()
                    if need_x:
                        out["x"][..., s:e, :] += 2.0 * (xd * G.sum(-1, keepdim=True) - torch.matmul(G, y.detach()))
                    if need_y:
                        out["y"] += 2.0 * (y.detach() * G.sum(-2).unsqueeze(-1) - torch.matmul(G.transpose(-1, -2), xd))
                    continue
            grads = torch.autograd.grad(C_graph, [t for t in (xs, yc) if t.requires_grad], G, allow_unused=True)
            grads = list(grads)
            with torch.no_grad():
                if need_x and (gx := grads.pop(0)) is not None:
                    out["x"][..., s:e, :] += gx
                if need_y and (gy := grads.pop(0)) is not None:
                    out["y"] += gy
        return (None, out.get("f"), out.get("g"), out.get("a"), out.get("b"), out.get("V"), out.get("U"), None,
                out.get("x"), out.get("y"))
