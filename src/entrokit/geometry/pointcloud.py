r"""Costs computed from two point clouds, ``C_ij = c(x_i, y_j)``, dense or online (in tiles).

**The backend is decided once.** At construction a :class:`PointCloud` picks a delegate
that every reduction goes to: ``_Dense`` (the materialised cost and the kernel engine of
:class:`~entrokit.geometry.DenseCost`), ``_Tiled`` (the tiling engine of
:mod:`entrokit.geometry._online`, or the fused Triton kernels where they are chosen) or
KeOps (:class:`~entrokit.geometry.keops.KeOpsPointCloud`). The cost is a
:class:`~entrokit.geometry.costs.Cost` object, resolved once from a name or a callable.
Reshaped, detached, re-typed and self geometries are derived from a built one without
validating again (:meth:`PointCloud.derive`).

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
import weakref
from numbers import Integral, Real
from typing import Callable, Literal

import torch

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor, check_same_dtype_device
from entrokit.geometry import _online, _triton
from entrokit.geometry.base import Geometry, PointGeometry
from entrokit.geometry.costs import Cost, Euclidean, SqEuclidean, resolve_cost
from entrokit.geometry.dense import DenseCost

__all__ = ["PointCloud", "memory_budget", "set_memory_budget", "DENSE_COPIES"]

CostName = Literal["sqeuclidean", "euclidean", "pnorm"]
CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The dense path holds about this many n x m matrices at once.
DENSE_COPIES = 4
_DEFAULT_BUDGET = 2 << 30
_budget: int | None = None
_KERNELS = ("auto", "compile", "eager", "triton")
# the named costs by string (the Monge gap and other losses evaluate them directly)
_COSTS: dict[str, Cost] = {"sqeuclidean": SqEuclidean(), "euclidean": Euclidean()}


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


def _versions(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """In-place modification counters of the points; ``None`` for inference tensors, which
    do not track them (nothing is cached for those)."""
    if x.is_inference() or y.is_inference():
        return None
    return (x._version, y._version)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def check_point_shapes(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x (..., n, d)`` and ``y (..., m, d)``: the shapes of two point clouds of one geometry."""
    if x.dim() < 2 or y.dim() != x.dim():
        raise InputError(
            f"x and y must have shapes (..., n, d) and (..., m, d) with the same batch axes; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}. Add a feature axis with x[:, None] for 1-D points."
        )
    if x.shape[-1] != y.shape[-1]:
        raise InputError(f"x and y must have the same point dimension, got d={x.shape[-1]} and d={y.shape[-1]}.")
    if x.shape[:-2] != y.shape[:-2]:
        raise InputError(f"batch axes of x and y differ: {tuple(x.shape[:-2])} vs {tuple(y.shape[:-2])}.")


class PointCloud(PointGeometry):
    r"""Cost computed from two point clouds, ``C_ij = c(x_i, y_j)``.

    Args:
        x: source points ``[..., n, d]``.
        y: target points ``[..., m, d]`` (the same batch axes as ``x``).
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`, the POT/OTT convention; GeomLoss uses
            half of it), ``"euclidean"`` (:math:`\|x-y\|`, with a zero gradient where points
            coincide), ``"pnorm"`` (:math:`\sum_k |x_k-y_k|^p`, give ``p >= 1``), a
            :class:`~entrokit.geometry.costs.Cost` object, or a callable ``c(x, y)``
            mapping ``[B, n', d], [B, m', d]`` to a floating ``[B, n', m']`` (evaluated on
            tiles when online).
        p: the exponent of ``cost="pnorm"``.
        online: ``True`` computes every reduction on tiles, never storing the ``n x m``
            cost (memory :math:`O(n+m)` plus a few cache-sized tiles); ``False``
            materialises the cost once (fastest when it fits); ``None`` (default) decides
            by the memory budget (module docstring).
        chunk_size: rows per tile of every online reduction (implies ``online=True``;
            default: the tile table of :mod:`entrokit.geometry._online`; the fused Triton
            kernels pick their own blocks).
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

    #: decided at construction (an attribute of each instance, read without a call)
    is_online: bool = False
    #: the cost's parameters are held constant (:meth:`detach`)
    cost_detached: bool = False

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: CostName | Cost | CostFn = "sqeuclidean",
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
        check_point_shapes(x, y)
        self.cost_fn = resolve_cost(cost, p)
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
            if not isinstance(self.cost_fn, SqEuclidean):
                raise InputError(f"kernel='triton' computes the squared-Euclidean cost only, got cost={cost!r}; "
                                 "use kernel='auto' for other costs.")
            _triton.check_usable(x.device)
        if allow_tf32 not in (True, False):
            raise InputError(f"allow_tf32 must be True or False, got {allow_tf32!r}.")
        self.allow_tf32 = bool(allow_tf32)
        self.x, self.y, self.cost = x, y, cost
        self.p = self.cost_fn.p if isinstance(cost, str) and cost == "pnorm" else None
        self.chunk_size, self.memory_budget, self.kernel = chunk_size, memory_budget, kernel
        if online is None:
            online = chunk_size is not None or self.dense_bytes() > (memory_budget or globals()["memory_budget"]())
        self.is_online = bool(online)
        self._backend = self._make_backend()

    def _make_backend(self):
        """The delegate of every reduction (module docstring), chosen once."""
        return _Tiled(self) if self.is_online else _Dense(self)

    def dense_bytes(self) -> int:
        """Estimated peak bytes of the dense path: ``DENSE_COPIES * B * n * m * itemsize``."""
        n, m = self.shape
        return DENSE_COPIES * math.prod(self.batch_shape) * n * m * self.x.element_size()

    def __repr__(self) -> str:
        c = self.cost if isinstance(self.cost, str) else self.cost_fn.name
        return (
            f"PointCloud(n={self.shape[0]}, m={self.shape[1]}, d={self.x.shape[-1]}, cost={c!r}, "
            f"online={self.is_online}, batch={self.batch_shape})"
        )

    # -- derived geometries (no validation: the points and options were checked) ----------
    def derive(self, x: torch.Tensor, y: torch.Tensor, *, same_points: bool = False,
               cost_map: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PointCloud:
        """This geometry (class, cost, options and backend) on other points ``x, y`` of the
        same dtype and device, built without running ``__init__`` (no validation, no
        backend decision). ``same_points``: ``x, y`` are views of this geometry's points
        (reshaped or detached), so the cached bounds and radius carry over, and a
        materialised cost carries over mapped by ``cost_map``."""
        out = object.__new__(type(self))
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_backend", "_bounds")})
        out.x, out.y = x, y
        out._backend = self._backend.derive(out, cost_map if same_points else None)
        hit = self.__dict__.get("_bounds")
        version = _versions(x, y)
        if same_points and hit is not None and version is not None and hit[0] == _versions(self.x, self.y):
            out._bounds = (version, tuple(t.reshape(out.batch_shape) for t in hit[1]))
        return out

    def self_geometries(self) -> tuple[PointCloud, PointCloud]:
        """``(PointCloud(x, x), PointCloud(y, y))`` with the same cost and tiling."""
        return self.derive(self.x, self.x), self.derive(self.y, self.y)

    def reshape_batch(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        (n, m), d = self.shape, self.x.shape[-1]
        return self.derive(self.x.reshape(*batch_shape, n, d), self.y.reshape(*batch_shape, m, d),
                           same_points=True, cost_map=lambda C: C.reshape(*batch_shape, n, m))

    def detach(self) -> PointCloud:
        """This geometry without gradients: detached points, and a cost whose parameters
        (:meth:`cost_params`) are held constant."""
        with torch.enable_grad():
            held = bool(self.cost_params())
        if not (self.x.requires_grad or self.y.requires_grad or held):
            return self  # nothing to cut: keep the caches (cost, bounds, radius)
        out = self.derive(self.x.detach(), self.y.detach(), same_points=True, cost_map=torch.Tensor.detach)
        out.cost_detached = True
        return out

    def cost_params(self) -> tuple:
        """The tensors requiring gradients that the cost holds (a callable's parameters, by
        :func:`entrokit.geometry._online.cost_leaves`); empty after :meth:`detach`."""
        return () if self.cost_detached else _online.cost_leaves(self.cost_fn, self.x, self.y)

    def rebuild(self, x, y):
        return self.derive(x, y)

    # -- the cost --------------------------------------------------------------------------
    def cost_matrix(self) -> torch.Tensor:
        return self.cost_fn(self.x, self.y)

    def to_dense(self) -> DenseCost:
        return DenseCost(self.cost_matrix())

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min C, max C)`` per problem (one pass of the backend; cached while the points
        are not modified in place)."""
        version = _versions(self.x, self.y)
        hit = self.__dict__.get("_bounds")
        if hit is not None and version is not None and hit[0] == version:
            return hit[1]
        with torch.no_grad():
            bounds = self._backend.cost_bounds()
        if version is not None:
            self._bounds = (version, bounds)
        return bounds

    @property
    def has_transport_cost_vjp(self) -> bool:
        return self.cost_fn.has_transport_cost_vjp

    def transport_cost_vjp(self, Pv, PTu, r, c):
        r"""The cost's closed form (:meth:`~entrokit.geometry.costs.Cost.transport_cost_vjp`;
        for :math:`\|x_i - y_j\|^2`: :math:`\nabla_{x_i} = 2(r_i x_i - (P y)_i)`, all
        coordinates in one pass over the plan)."""
        if not self.has_transport_cost_vjp:
            return super().transport_cost_vjp(Pv, PTu, r, c)
        return self.cost_fn.transport_cost_vjp(self.x.detach(), self.y.detach(), Pv, PTu, r, c)

    # -- the reductions: the backend's ----------------------------------------------------
    def lse(self, h, log_w, eps, axis):
        return self._backend.lse(h, log_w, eps, axis)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        return self._backend.plan_reduce(f, g, a, b, eps, accumulate=accumulate, round_to=round_to)

    def marginals(self, f, g, a, b, eps):
        return self._backend.marginals(f, g, a, b, eps)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        """``P @ vec`` / ``P.T @ vec``; ``vec`` may carry a trailing axis of ``k`` vectors
        (``(B, m, k)`` / ``(B, n, k)``), applied in the same pass over the tiles."""
        return self._backend.plan_matvec(f, g, a, b, eps, vec, axis)

    def plan_operator(self, f, g, a, b, eps):
        return self._backend.plan_operator(f, g, a, b, eps)

    def scaling_engine(self, a, b, log_a, log_b):
        return self._backend.scaling_engine(a, b, log_a, log_b)


def _lse_pair(lse):
    """A full log-sum-exp as a partial pair: ``M = lse`` (constant), ``S = exp(lse - M) = 1``
    carrying the gradient."""
    mx = lse.detach()
    empty = mx == -float("inf")
    s = torch.where(empty, torch.zeros_like(lse), torch.exp(lse - mx.masked_fill(empty, 0.0)))
    return mx, s


class _Backend:
    """Base of the point-cloud backends. The cloud owns its backend, and the backend refers
    back to the cloud weakly: a strong reference both ways is a cycle that only Python's
    cyclic collector frees, which keeps the cached n x m cost (and the solver's buffers
    derived from it) alive for an unbounded time after the last use (measured: about
    480 MiB more per solve at n = m = 5000 in a loop)."""

    @property
    def pc(self):
        return self._pc()

    @pc.setter
    def pc(self, pc) -> None:
        self._pc = weakref.ref(pc)

    def __getstate__(self):
        # copied or pickled with its cloud: a strong reference there (the memo keeps one object)
        return {**self.__dict__, "_pc": self.pc}

    def __setstate__(self, state) -> None:
        state = dict(state)
        pc = state.pop("_pc")
        self.__dict__.update(state)
        self.pc = pc


class _Dense(_Backend):
    """The materialised backend: a :class:`DenseCost` of the cost matrix does every
    reduction (and provides the kernel engine). Its detached value is computed once and
    kept (dropped if ``x`` or ``y`` is modified in place); under autograd with points or
    cost parameters that require gradients it is rebuilt per call, so no graph is kept
    alive between calls."""

    def __init__(self, pc: PointCloud, cached=None):
        self.pc, self._cache = pc, cached

    def derive(self, pc: PointCloud, cost_map) -> _Dense:
        cached, version = self._cache, _versions(pc.x, pc.y)
        if cost_map is None or cached is None or version is None or cached[0] != _versions(self.pc.x, self.pc.y):
            return _Dense(pc)
        return _Dense(pc, (version, DenseCost(cost_map(cached[1].C))))

    def matrix(self) -> DenseCost:
        pc = self.pc
        version = _versions(pc.x, pc.y)
        if version is None or _needs_grad(pc.x, pc.y) or pc.cost_params():
            return DenseCost(pc.cost_matrix())  # with the graph of the points or the cost's parameters
        if self._cache is None or self._cache[0] != version:
            with torch.no_grad():
                self._cache = (version, DenseCost(pc.cost_matrix()))
        return self._cache[1]

    def __getattr__(self, name):
        # every reduction (lse, plan_reduce, marginals, plan_matvec, plan_operator,
        # scaling_engine, cost_bounds) is the materialised cost's
        if name.startswith("_") or name == "pc":
            raise AttributeError(name)
        return getattr(self.matrix(), name)


class _Tiled(_Backend):
    """The online backend: every reduction runs on the tiling engine
    (:mod:`entrokit.geometry._online`) or, where chosen, the fused Triton kernels. The
    kernel choices are made here, once; whether float32 tiles go to float64 is decided
    once per ``eps`` (the clouds' radius is measured on first use)."""

    def __init__(self, pc: PointCloud, parent: _Tiled | None = None, same_points: bool = False):
        self.pc, self.cost, self.rows = pc, pc.cost_fn, pc.chunk_size
        if parent is None:
            n, m = pc.shape
            self.compiled = _online.use_compiled(pc.kernel, math.prod(pc.batch_shape) * n * m)
            self.fused = _triton.use_triton(pc.kernel, pc.device, self.cost.name)
        else:  # derived geometries keep the kernel choice of the one they come from
            self.compiled, self.fused = parent.compiled, parent.fused
        self.may_widen = isinstance(self.cost, SqEuclidean) and pc.dtype == torch.float32
        # the radius and the per-eps float64-tile decisions hold for the same points
        # (reshaped or detached): shared with the geometry they come from
        self._radius = parent._radius if same_points else [None]
        self._wide = parent._wide if same_points else {}
        self._fused_points = {}

    def derive(self, pc: PointCloud, cost_map) -> _Tiled:
        return _Tiled(pc, self, same_points=cost_map is not None and pc.dtype == self.pc.dtype)

    def wide(self, eps: float) -> bool:
        """Float64 tiles for a float32 squared-Euclidean cost too spread for float32 exponents
        (:func:`entrokit.geometry._online.needs_wide_tiles`)."""
        if not self.may_widen:
            return False
        w = self._wide.get(eps)
        if w is None:
            if self._radius[0] is None:
                with torch.no_grad():
                    self._radius[0] = _online.radius_sq(self.pc.x, self.pc.y)
            w = self._wide[eps] = _online.needs_wide_tiles(self._radius[0], eps, torch.float32)
        return w

    def cost_bounds(self):
        return _online.cost_bounds(self.pc.x, self.pc.y, self.cost, self.rows)

    def _weighted(self, f, g, a, b, eps):
        return f + eps * torch.log(a), g + eps * torch.log(b)

    def lse(self, h, log_w, eps, axis):
        pc = self.pc
        rows, cols = (pc.x, pc.y) if axis == 1 else (pc.y, pc.x)
        hw = h + eps * log_w
        if self.fused:  # the fused kernel's pairs, or its differentiable lse
            pair = _triton.run_or_fallback(pc.kernel, lambda: self._fused_lse(rows, cols, hw, eps, axis), lambda: None)
            if pair is not None:
                return pair
        return _lse_pair(_online.online_lse(rows, cols, hw, eps, self.cost, self.compiled, self.rows, self.wide(eps),
                                            transpose=axis == 0, params=self._params()))

    def _params(self):
        return self.pc.cost_params()

    def _fused_lse(self, rows, cols, hw, eps, axis):
        pc = self.pc
        opts = dict(allow_tf32=pc.allow_tf32, wide=self.wide(eps))
        if _needs_grad(rows, cols, hw):
            return _lse_pair(_triton.online_lse(rows, cols, hw, eps, **opts))
        # the centred, scaled points are kept per axis for the current eps while x, y are unchanged
        key, version = (axis, opts["wide"]), _versions(pc.x, pc.y)
        hit = self._fused_points.get(key)
        if hit is None or version is None or hit[:2] != (eps, version):
            hit = self._fused_points[key] = (eps, version, _triton.Prepared(rows, cols, eps, "sqeuclidean", opts["wide"]))
        return _triton.lse_pairs(rows, cols, hw, eps, prepared=hit[2], **opts)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        pc = self.pc
        params = self._params()
        if params or _needs_grad(pc.x, pc.y, f, g, a, b):
            return _OnlinePlan.apply(self, f, g, a, b, None, None, eps, (accumulate, round_to), pc.x, pc.y,
                                     *params)[:3]
        return _online.plan_sums(pc.x, pc.y, f, g, a, b, eps, self.cost, self.rows, accumulate=accumulate,
                                 round_to=round_to)

    def marginals(self, f, g, a, b, eps):
        pc = self.pc
        if _needs_grad(pc.x, pc.y, f, g, a, b) or self._params():
            return self.plan_reduce(f, g, a, b, eps)[:2]
        row, col = self._weighted(f, g, a, b, eps)
        if self.fused:  # row sums in registers, no vector operand
            out = _triton.run_or_fallback(
                pc.kernel, lambda: _triton.marginals(pc.x, pc.y, row, col, eps, allow_tf32=pc.allow_tf32,
                                                     wide=self.wide(eps)), lambda: None)
            if out is not None:
                return out
        # P 1 and P^T 1 in one pass over the tiles
        ones_m = torch.ones(*g.shape, 1, dtype=g.dtype, device=g.device)
        ones_n = torch.ones(*f.shape, 1, dtype=f.dtype, device=f.device)
        r, c = self.products(f, g, a, b, eps, ones_m, ones_n)
        return r.squeeze(-1), c.squeeze(-1)

    def products(self, f, g, a, b, eps, V, U):
        """``(P V, P^T U)`` in one pass over the tiles (no autograd)."""
        pc = self.pc
        row, col = self._weighted(f, g, a, b, eps)
        if self.fused:
            out = _triton.run_or_fallback(
                pc.kernel, lambda: _triton.plan_products(pc.x, pc.y, row, col, eps, V, U, allow_tf32=pc.allow_tf32,
                                                         wide=self.wide(eps)), lambda: None)
            if out is not None:
                return out
        return _online.plan_products(pc.x, pc.y, row, col, eps, V, U, self.cost, self.rows, self.wide(eps))

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        pc = self.pc
        several = vec.dim() == f.dim() + 1
        V = vec if several else vec.unsqueeze(-1)
        V, U = (V, None) if axis == 1 else (None, V)
        params = self._params()
        if params or _needs_grad(pc.x, pc.y, f, g, a, b, vec):
            out = _OnlinePlan.apply(self, f, g, a, b, V, U, eps, (None, None), pc.x, pc.y, *params)[3]
        else:
            out = self.products(f, g, a, b, eps, V, U)[0 if axis == 1 else 1]
        return out if several else out.squeeze(-1)

    def plan_operator(self, f, g, a, b, eps):
        return Geometry.plan_operator(self.pc, f, g, a, b, eps)

    def scaling_engine(self, a, b, log_a, log_b):
        return None


class _OnlinePlan(torch.autograd.Function):
    r"""Row sums, column sums, :math:`\langle C, P\rangle` and one of ``P V`` / ``Pᵀ U`` of
    the online plan :math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}`,
    differentiable in ``x, y, f, g, a, b, V, U`` and the tensors the cost holds
    (``params``, a callable's parameters) in :math:`O(n + m)` memory: forward runs without
    a graph (``sums_opts``: the ``accumulate, round_to`` of the sums), backward recomputes
    the plan tile by tile (:func:`entrokit.geometry._online.plan_backward`; the rounding of
    ``round_to`` passes the gradient unchanged). ``tiled`` is the point cloud's backend;
    ``x, y`` its points (passed for autograd)."""

    @staticmethod
    def forward(ctx, tiled, f, g, a, b, V, U, eps, sums_opts, x, y, *params):
        f_, g_, a_, b_ = f.detach(), g.detach(), a.detach(), b.detach()
        accumulate, round_to = sums_opts
        with torch.no_grad():
            rows, cols, tc = _online.plan_sums(x.detach(), y.detach(), f_, g_, a_, b_, eps, tiled.cost, tiled.rows,
                                               accumulate=accumulate, round_to=round_to)
            out = None
            if V is not None or U is not None:
                PV, PTU = tiled.products(f_, g_, a_, b_, eps, None if V is None else V.detach(),
                                         None if U is None else U.detach())
                out = PV if V is not None else PTU
        # what backward needs of the backend, not the backend (whose cloud may be gone by then)
        ctx.cost, ctx.rows, ctx.wide = tiled.cost, tiled.rows, tiled.wide(eps)
        ctx.eps, ctx.params = eps, params
        ctx.save_for_backward(f, g, a, b, V, U, x, y)
        return rows, cols, tc, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_rows, g_cols, g_tc, g_out):
        f, g, a, b, V, U, x, y = ctx.saved_tensors
        eps = ctx.eps
        names = ("f", "g", "a", "b", "V", "U", "x", "y")
        like = dict(zip(names, (f, g, a, b, V, U, x, y)))
        need = [k for k, nd in zip(names, (*ctx.needs_input_grad[1:7], *ctx.needs_input_grad[9:11]))
                if nd and (g_out is not None or k not in "VU")]
        t = _online.Pass(x.detach(), y.detach(), ctx.cost, ctx.wide)
        out = _online.plan_backward(t, f, g, a, b, eps, need, g_rows=g_rows, g_cols=g_cols, g_tc=g_tc, g_out=g_out,
                                    V=V, U=U, row_tile=ctx.rows, params=ctx.params)
        p_grads = out.pop("params", ())
        grads = {k: v.to(like[k].dtype) for k, v in out.items()}
        return (None, *(grads.get(k) for k in names[:6]), None, None, grads.get("x"), grads.get("y"), *p_grads)
