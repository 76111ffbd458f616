r"""The tiling engine: every reduction of a point-cloud cost computed tile by tile, so the
full ``n x m`` matrix is never stored.

One tile table (:data:`TILES`, by device) and one tile loop (:func:`tiles`) serve the
soft-min (:func:`lse_online`, differentiable: :func:`online_lse`), the plan products and
sums (:func:`plan_pass`: ``P V``, ``P^T U``, :math:`\langle C, P\rangle`), the cost bounds
(:func:`cost_bounds`) and the autograd variants (:class:`_OnlineLSE` and the custom
backward of :class:`~entrokit.geometry.pointcloud.PointCloud`'s plan, both on
:func:`plan_backward`); ``chunk_size`` of a point
cloud is the number of rows of a tile everywhere.

The soft-min along ``axis=1`` is, per row :math:`i`,

.. math::

    \operatorname{lse}_i = \log\sum_j \exp\big((h_j + \varepsilon\log w_j - C(x_i, y_j))/\varepsilon\big),

computed tile by tile: a tile of rows against a block of columns gives a partial pair
:math:`(M, S)` (max and shifted sum-exp, :mod:`entrokit.geometry.base`), and the pairs of
the column blocks are merged exactly. ``axis=0`` is the same computation with the roles
of ``x`` and ``y`` swapped.

**Squared Euclidean tiles** use the matmul expansion (:func:`entrokit.geometry.costs.expand`). With the points centred (the cost
is translation invariant, and centring keeps the expansion's cancellation at the scale
of the cloud's radius :math:`R` rather than of its distance to the origin),

.. math::

    z_{ij} = \underbrace{\frac{h_j + \varepsilon\log w_j - \|y_j\|^2}{\varepsilon}}_{u_j}
    + \frac{2}{\varepsilon}\, x_i\cdot y_j \;-\; \frac{\|x_i\|^2}{\varepsilon},

so a tile is one batched ``baddbmm`` (inner dimension ``d``) followed by a max and a
sum-exp; the row constant :math:`-\|x_i\|^2/\varepsilon` is added to the merged result
exactly. The rounding error of :math:`z` is about :math:`4R^2 u/\varepsilon` (``u`` the
unit roundoff); when that exceeds :data:`_MAX_EXPONENT_ERROR` in float32, the tiles are
computed in float64 instead (:func:`needs_wide_tiles`).

**Plan sums in one pass.** Row sums, column sums and :math:`\langle C, P\rangle` are one
pass of plan products. For the squared Euclidean cost, with centred points
:math:`\tilde x, \tilde y`, :math:`\langle C, P\rangle = \sum_i r_i\|\tilde x_i\|^2 +
\sum_j c_j\|\tilde y_j\|^2 - 2\langle \tilde x, P\tilde y\rangle`, so the pass computes
:math:`P\,[\mathbf 1, \tilde y]` and :math:`P^\top\mathbf 1` only; other costs add
:math:`\sum_{ij} P_{ij}C_{ij}` tile by tile.

**Gradients** (:class:`_OnlineLSE`) are recomputed tile by tile in backward, so memory
stays :math:`O(n + m)`: with :math:`p_{ij} = e^{z_{ij} - \operatorname{lse}_i}` and the
incoming gradient :math:`\gamma_i`,
:math:`\partial/\partial h_j = \sum_i \gamma_i p_{ij}/\varepsilon`,
:math:`\partial/\partial C_{ij} = -\gamma_i p_{ij}/\varepsilon`, which for the squared
Euclidean cost gives
:math:`\nabla_{x_i} = -\tfrac{2}{\varepsilon}\gamma_i\big(x_i \sum_j p_{ij} - \sum_j p_{ij} y_j\big)`
and the transposed formula for :math:`y_j` (two small matmuls per tile). Other costs
differentiate the recomputed tile with autograd, which also carries :math:`\bar C` to the
tensors a cost callable holds (its parameters, found by :func:`cost_leaves`): the forward
passes run without a graph for every cost.

**Kernels.** A tile is either evaluated by plain batched torch operations ("eager") or by
the same function compiled with ``torch.compile`` (inductor: vectorised C++ on CPU,
Triton on GPU), which fuses the max, shift, exp and sum into one pass over the tile. On
our 2-core CPU a compiled pass runs 1.2x faster than an eager one (benchmarks/results/scale.md);
compilation costs seconds once per process, so "auto" compiles only when a pass has
at least :data:`COMPILE_MIN_ENTRIES` entries.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

from entrokit.geometry.base import combine_lse, exp_floor, plan_block
from entrokit.geometry.costs import Cost, SqEuclidean, centre, expand, ieee_matmul

__all__ = ["TILES", "tile_entries", "tiles", "use_compiled", "radius_sq", "needs_wide_tiles", "Pass",
           "lse_online", "online_lse", "plan_pass", "plan_products", "plan_sums", "plan_backward",
           "cost_leaves", "cost_bounds", "ieee_matmul"]

# The one tile table: (entries per tile, widest column block) by device. On CPU 4 MiB in
# float32 (tiles stay in cache); on a GPU 256 MiB (enough work per launch to hide the
# launch latency).
TILES = {"cpu": (1 << 20, 4096), "cuda": (1 << 26, 1 << 16)}
# "auto" compiles the tile kernel for passes of at least this many entries.
COMPILE_MIN_ENTRIES = 1 << 24
# Largest tolerated rounding error of a float32 exponent before tiles go to float64.
_MAX_EXPONENT_ERROR = 1e-4


def _kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def tile_entries(device: torch.device) -> int:
    """Entries of one tile on ``device`` (:data:`TILES`): the block size of every tiled loop
    of the geometry package."""
    return TILES[_kind(device)][0]


def tile_shape(m: int, device: torch.device, rows: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a tile against ``m`` columns (``rows``, a point cloud's
    ``chunk_size``, overrides the default)."""
    entries, max_cols = TILES[_kind(device)]
    cols = min(max(m, 1), max_cols)
    return rows or max(16, entries // cols), cols


def _row_blocks(n: int, m: int, device: torch.device, rows: int | None = None):
    """Row blocks ``[(r0, r1), ...]`` and column blocks ``[(c0, c1), ...]`` of a pass."""
    tr, tc = tile_shape(m, device, rows)
    return [(r0, min(r0 + tr, n)) for r0 in range(0, n, tr)], [(c0, min(c0 + tc, m)) for c0 in range(0, m, tc)]


def tiles(n: int, m: int, device: torch.device, rows: int | None = None):
    """The tile loop: ``(r0, r1, c0, c1)`` row-major over an ``n x m`` pass."""
    row_blocks, col_blocks = _row_blocks(n, m, device, rows)
    return ((r0, r1, c0, c1) for r0, r1 in row_blocks for c0, c1 in col_blocks)


def radius_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest squared norm of the centred points (one host sync; cached by the geometry)."""
    xc, yc = centre(x, y)
    return max(float(xc.pow(2).sum(-1).max()), float(yc.pow(2).sum(-1).max()))


def needs_wide_tiles(radius_sq: float, eps: float, dtype: torch.dtype) -> bool:
    """Whether float32 tiles would round the exponents by more than
    :data:`_MAX_EXPONENT_ERROR` (then tiles are computed in float64)."""
    if dtype != torch.float32:
        return False
    return 4.0 * radius_sq * torch.finfo(torch.float32).eps / eps > _MAX_EXPONENT_ERROR


def _tile_pair(z: torch.Tensor, floor: float):
    """``(max, sum exp(z - max))`` along the last axis; ``z`` is a temporary (overwritten)."""
    mx = z.amax(-1, keepdim=True)
    empty = mx == -math.inf
    s = z.sub_(mx.masked_fill(empty, 0.0)).clamp_min_(floor).exp_().sum(-1)
    return mx.squeeze(-1), s.masked_fill(empty.squeeze(-1), 0.0)


def _lse_tile_sq(xs: torch.Tensor, y: torch.Tensor, u: torch.Tensor, floor: float):
    """Partial pair of ``z = u_j + xs_i . y_j`` along the columns (the squared Euclidean tile)."""
    return _tile_pair(expand(xs, y, u, 1.0), floor)


def _lse_tile_cost(C: torch.Tensor, hw: torch.Tensor, eps: float, floor: float):
    """Partial pair of ``z = (hw_j - C_ij) / eps`` along the columns (any cost tile)."""
    return _tile_pair((hw.unsqueeze(-2) - C) / eps, floor)


_compiled: dict[str, Callable] = {}


def _compiled_tile(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


_compile_failed = False


def use_compiled(kernel: str, entries: int) -> bool:
    """The kernel rule: ``"compile"`` always, ``"eager"`` never, ``"auto"`` for passes of at
    least :data:`COMPILE_MIN_ENTRIES` entries (unless ``ENTROKIT_COMPILE=0`` or an earlier
    compilation failed)."""
    if kernel == "eager" or _compile_failed or os.environ.get("ENTROKIT_COMPILE", "1") == "0":
        return False
    return kernel == "compile" or entries >= COMPILE_MIN_ENTRIES


def _run_tile(name: str, fn: Callable, compiled: bool, *args):
    global _compile_failed
    if compiled and not _compile_failed:
        try:
            return _compiled_tile(name, fn)(*args)
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            _compile_failed = True
            warnings.warn(
                f"torch.compile of the online tile kernel failed ({type(err).__name__}: {err}); "
                "falling back to eager tiles (about 1.2x slower on CPU). Set ENTROKIT_COMPILE=0 to skip the "
                "attempt.", RuntimeWarning, stacklevel=4,
            )
    return fn(*args)


class Pass:
    """The points of one pass as the tiles take them: centred for a translation-invariant
    cost (:meth:`Cost.prepare`) and, for the squared Euclidean expansion, widened to float64
    with ``wide`` and with their squared norms. ``transpose`` swaps the roles (rows are
    ``y``): the tile is then :meth:`Cost.tile_t`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost: Cost, wide: bool = False, transpose: bool = False):
        self.sq = isinstance(cost, SqEuclidean)
        self.cost, self.transpose = cost, transpose
        xp, yp = cost.prepare(x, y)
        work = torch.float64 if (wide and self.sq) else x.dtype
        self.x, self.y = xp.to(work), yp.to(work)
        self.dtype = work
        if self.sq:
            self.x_sq, self.y_sq = self.x.pow(2).sum(-1), self.y.pow(2).sum(-1)

    def cost_tile(self, x_t: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        """``C`` on a tile of rows ``x_t`` and columns ``y_c`` (of this pass's points)."""
        return self.cost.tile_t(x_t, y_c) if self.transpose else self.cost.tile(x_t, y_c)

    def log_plan(self, r0, r1, c0, c1, row, col, eps: float) -> torch.Tensor:
        r""":math:`(\text{row}_i + \text{col}_j - C_{ij})/\varepsilon` on one tile (matmul
        expansion for the squared Euclidean cost)."""
        x_t, y_c = self.x[..., r0:r1, :], self.y[..., c0:c1, :]
        if self.sq:
            return expand(x_t, y_c, (col[..., c0:c1] - self.y_sq[..., c0:c1]) / eps, 2.0 / eps,
                          (row[..., r0:r1] - self.x_sq[..., r0:r1]) / eps)
        return (row[..., r0:r1].unsqueeze(-1) + col[..., c0:c1].unsqueeze(-2) - self.cost_tile(x_t, y_c)) / eps


@torch.no_grad()  # a cost callable's parameters build no graph here
def lse_online(x, y, hw, eps: float, cost: Cost, compiled: bool = False, row_tile: int | None = None,
               wide: bool = False, transpose: bool = False) -> torch.Tensor:
    r"""Full log-sum-exp along the columns, ``(B, n)``, of
    :math:`z_{ij} = (hw_j - C(x_i, y_j))/\varepsilon` with ``hw = h + eps log w``
    (``transpose``: the cost is :math:`C(y_j, x_i)`). No autograd (:func:`online_lse`)."""
    with ieee_matmul(x.device):
        t = Pass(x, y, cost, wide, transpose)
        # outputs are preallocated and filled in place: small long-lived tensors allocated
        # between tiles would pin the freed tile buffers and grow the CPU heap with n
        out = torch.empty(*x.shape[:-1], dtype=t.dtype, device=x.device)
        floor = exp_floor(t.dtype)
        hw = hw.to(t.dtype)
        rows, cols = _row_blocks(x.shape[-2], y.shape[-2], x.device, row_tile)
        if t.sq:
            xs, u = t.x * (2.0 / eps), (hw - t.y_sq) / eps
            for r0, r1 in rows:
                mx, s = _merged(_run_tile("sq", _lse_tile_sq, compiled, xs[..., r0:r1, :], t.y[..., c0:c1, :],
                                          u[..., c0:c1], floor) for c0, c1 in cols)
                out[..., r0:r1] = mx + torch.log(s) - t.x_sq[..., r0:r1] / eps
            return out.to(x.dtype)
        for r0, r1 in rows:
            mx, s = _merged(_run_tile("cost", _lse_tile_cost, compiled,
                                      t.cost_tile(t.x[..., r0:r1, :], t.y[..., c0:c1, :]), hw[..., c0:c1], eps, floor)
                            for c0, c1 in cols)
            out[..., r0:r1] = mx + torch.log(s)
        return out


def _merged(pairs):
    """Running merge of the column blocks' partial pairs, one block at a time (no list of
    pairs kept alive across the tiles)."""
    acc = None
    for pair in pairs:
        acc = pair if acc is None else combine_lse((acc, pair))
    return acc


class _OnlineLSE(torch.autograd.Function):
    r"""Differentiable :func:`lse_online`; its backward is :func:`plan_backward` (the
    soft-min's weights :math:`p_{ij} = e^{z_{ij} - \operatorname{lse}_i}` are the plan of
    the potentials :math:`(-\varepsilon\operatorname{lse}, h + \varepsilon\log w)`, whose row
    sums receive the incoming gradient). ``params``: the tensors the cost holds
    (:func:`cost_leaves`), differentiated through the recomputed tiles."""

    @staticmethod
    def forward(ctx, x, y, hw, eps, cost, compiled, row_tile, wide, transpose, *params):
        lse = lse_online(x.detach(), y.detach(), hw.detach(), eps, cost, compiled, row_tile, wide, transpose)
        ctx.save_for_backward(x, y, hw, lse)
        ctx.eps, ctx.cost, ctx.row_tile, ctx.wide, ctx.transpose = eps, cost, row_tile, wide, transpose
        ctx.params = params
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gamma):
        x, y, hw, lse = ctx.saved_tensors
        need = [k for k, nd in zip("xyg", ctx.needs_input_grad[:3]) if nd]
        t = Pass(x.detach(), y.detach(), ctx.cost, ctx.wide, ctx.transpose)
        out = plan_backward(t, -ctx.eps * lse, hw.detach(), None, None, ctx.eps, need, g_rows=gamma,
                            row_tile=ctx.row_tile, params=ctx.params)
        return (*(None if k not in out else out[k].to(v.dtype) for k, v in zip("xyg", (x, y, hw))),
                None, None, None, None, None, None, *out.get("params", ()))


def cost_leaves(cost: Cost, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """The tensors requiring gradients that ``cost`` holds besides the points (a callable's
    parameters, or the leaves they are computed from): the leaves of the graph of one
    ``1 x 1`` tile of detached points. Empty for a parameter-free cost or without grad mode."""
    if cost.parameter_free or not torch.is_grad_enabled():
        return ()
    C = cost.tile(x[..., :1, :].detach(), y[..., :1, :].detach())
    if not C.requires_grad:
        return ()
    leaves, seen, stack = {}, set(), [C.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            leaves.setdefault(id(var), var)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return tuple(leaves.values())


def plan_backward(t: Pass, f, g, a, b, eps: float, need, *, g_rows=None, g_cols=None, g_tc=None, g_out=None,
                  V=None, U=None, row_tile: int | None = None, params: tuple = ()) -> dict:
    r"""The gradients ``need`` (among ``"f", "g", "a", "b", "V", "U", "x", "y"``) of the row
    sums, column sums, :math:`\langle C, P\rangle` and ``P V`` (or ``P^T U``) of
    :math:`P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}` (``a, b = None``: 1) on the
    points of the pass ``t``, from their incoming gradients, recomputing the plan tile by
    tile (:math:`O(n + m)` memory). With the plan's cotangent
    :math:`w_{ij} = \bar r_i + \bar c_j + \bar t\,C_{ij} + \bar O_i\cdot V_j` (or
    :math:`U_i\cdot\bar O_j`) and :math:`q = P\odot w`:
    :math:`\bar f_i = \sum_j q_{ij}/\varepsilon`, :math:`\bar g_j = \sum_i q_{ij}/\varepsilon`,
    :math:`\bar a_i = \sum_j w_{ij} b_j e^{(\cdot)}`, :math:`\bar V = P^\top\bar O`,
    :math:`\bar U = P\bar O` and :math:`\bar C = \bar t P - q/\varepsilon`, pulled back to the
    points in closed form for the squared Euclidean cost
    (:math:`\bar x_i = 2(x_i\sum_j\bar C_{ij} - \sum_j \bar C_{ij} y_j)`), by autograd on the
    tile otherwise. ``params`` (:func:`cost_leaves`): tensors the cost holds, whose
    gradients autograd pulls back from :math:`\bar C` on every recomputed tile (returned as
    ``out["params"]``, in their own dtypes). Results in the pass's dtype."""
    vjp = _PlanVJP(t, f, g, a, b, eps, need, g_rows, g_cols, g_tc, g_out, V, U, params)
    with ieee_matmul(t.x.device):
        for r0, r1, c0, c1 in tiles(t.x.shape[-2], t.y.shape[-2], t.x.device, row_tile):
            vjp.tile(slice(r0, r1), slice(c0, c1))
    if params:
        vjp.out["params"] = tuple(vjp.p_out)
    return vjp.out


class _PlanVJP:
    """One :func:`plan_backward`: its detached inputs in the pass's dtype, its accumulators
    (``out``, ``p_out``) and one method per step of a tile (the plan, its cotangent, the
    gradients of each kind of leaf)."""

    def __init__(self, t: Pass, f, g, a, b, eps, need, g_rows, g_cols, g_tc, g_out, V, U, params):
        work = t.dtype
        self.t, self.eps, self.params = t, eps, params
        self.lo, self.hi = exp_floor(work), 0.5 * math.log(torch.finfo(work).max)
        self.f, self.g, self.a, self.b, self.V, self.U, self.g_out, self.g_rows, self.g_cols = (
            None if v is None else v.detach().to(work) for v in (f, g, a, b, V, U, g_out, g_rows, g_cols))
        self.gt = None if g_tc is None else g_tc.to(work).unsqueeze(-1).unsqueeze(-1)
        like = {"f": self.f, "g": self.g, "a": self.a, "b": self.b, "V": self.V, "U": self.U, "x": t.x, "y": t.y}
        self.out = {k: torch.zeros_like(like[k]) for k in need}
        self.points = "x" in self.out or "y" in self.out
        # autograd on the cost tile: for the parameters, and for the points of other costs
        self.generic = bool(params) or (self.points and not t.sq)
        self.p_out = [torch.zeros_like(p) for p in params]

    def tile(self, rs: slice, cs: slice) -> None:
        """Accumulate the gradients of the tile ``rs x cs``."""
        t, out = self.t, self.out
        with torch.enable_grad() if self.generic else torch.no_grad():
            xs = t.x[..., rs, :].detach().requires_grad_(self.generic and "x" in out)
            yc = t.y[..., cs, :].detach().requires_grad_(self.generic and "y" in out)
            C_graph = None if (t.sq and self.gt is None) else t.cost_tile(xs, yc)
        with torch.no_grad():
            C = None if C_graph is None else C_graph.detach()
            E = self._kernel(rs, cs, C)
            w = self._cotangent(rs, cs, E, C)
            self._weight_grads(rs, cs, w, E)
            P = E if self.a is None else E.mul_(self.a[..., rs].unsqueeze(-1)).mul_(self.b[..., cs].unsqueeze(-2))
            self._product_grads(rs, cs, P)
            q = w.mul_(P)
            self._potential_grads(rs, cs, q)
            if not (self.points or self.params):
                return
            G = q.mul_(-1.0 / self.eps)  # dL/dC = t P - q / eps
            if self.gt is not None:
                G.addcmul_(self.gt.expand_as(P), P)
            del P, E
            if not self.generic:
                self._sq_point_grads(rs, cs, xs, yc, G)
                return
        self._autograd_grads(rs, cs, xs, yc, C_graph, G)

    def _kernel(self, rs: slice, cs: slice, C):
        r""":math:`e^{(f_i + g_j - C_{ij})/\varepsilon}` on the tile, clamped as in
        :func:`~entrokit.geometry.base.plan_block` (weights not applied)."""
        if self.t.sq:  # the matmul expansion (float64 with wide tiles)
            E = self.t.log_plan(rs.start, rs.stop, cs.start, cs.stop, self.f, self.g, self.eps)
        else:
            E = (self.f[..., rs].unsqueeze(-1) + self.g[..., cs].unsqueeze(-2) - C) / self.eps
        return E.clamp_(self.lo, self.hi).exp_()

    def _cotangent(self, rs: slice, cs: slice, E, C):
        r"""The plan's cotangent :math:`w_{ij} = \bar r_i + \bar c_j + \bar t C_{ij} +
        \bar O_i\cdot V_j` (or :math:`U_i\cdot\bar O_j`) on the tile."""
        w = torch.zeros_like(E)
        if self.g_rows is not None:
            w += self.g_rows[..., rs].unsqueeze(-1)
        if self.g_cols is not None:
            w += self.g_cols[..., cs].unsqueeze(-2)
        if self.gt is not None:
            w.addcmul_(self.gt.expand_as(C), C)
        if self.g_out is not None:
            w += (torch.matmul(self.g_out[..., rs, :], self.V[..., cs, :].mT) if self.V is not None
                  else torch.matmul(self.U[..., rs, :], self.g_out[..., cs, :].mT))
        return w

    def _weight_grads(self, rs: slice, cs: slice, w, E) -> None:
        r""":math:`\bar a_i = \sum_j w_{ij} b_j E_{ij}` and :math:`\bar b_j = \sum_i a_i w_{ij} E_{ij}`."""
        if "a" in self.out:
            self.out["a"][..., rs] += torch.matmul(w * E, self.b[..., cs].unsqueeze(-1)).squeeze(-1)
        if "b" in self.out:
            self.out["b"][..., cs] += torch.matmul(self.a[..., rs].unsqueeze(-2), w * E).squeeze(-2)

    def _product_grads(self, rs: slice, cs: slice, P) -> None:
        r""":math:`\bar V = P^\top\bar O` and :math:`\bar U = P\bar O`."""
        if "V" in self.out:
            self.out["V"][..., cs, :] += torch.matmul(P.mT, self.g_out[..., rs, :])
        if "U" in self.out:
            self.out["U"][..., rs, :] += torch.matmul(P, self.g_out[..., cs, :])

    def _potential_grads(self, rs: slice, cs: slice, q) -> None:
        r""":math:`\bar f_i = \sum_j q_{ij}/\varepsilon` and :math:`\bar g_j = \sum_i q_{ij}/\varepsilon`."""
        if "f" in self.out:
            self.out["f"][..., rs] += q.sum(-1) / self.eps
        if "g" in self.out:
            self.out["g"][..., cs] += q.sum(-2) / self.eps

    def _sq_point_grads(self, rs: slice, cs: slice, xs, yc, G) -> None:
        r"""The squared Euclidean closed form :math:`\bar x_i = 2(x_i\sum_j \bar C_{ij} - \sum_j
        \bar C_{ij} y_j)` (and its transpose for :math:`y`)."""
        if "x" in self.out:
            self.out["x"][..., rs, :] += 2.0 * (xs * G.sum(-1, keepdim=True) - torch.matmul(G, yc))
        if "y" in self.out:
            self.out["y"][..., cs, :] += 2.0 * (yc * G.sum(-2).unsqueeze(-1) - torch.matmul(G.mT, xs))

    def _autograd_grads(self, rs: slice, cs: slice, xs, yc, C_graph, G) -> None:
        r""":math:`\bar C = G` pulled back through the recomputed cost tile to the points that
        require it and to the cost's parameters."""
        wrt = [v for v in (xs, yc) if v.requires_grad] + list(self.params)
        grads = list(torch.autograd.grad(C_graph, wrt, G, allow_unused=True)) if C_graph.requires_grad else []
        grads += [None] * (len(wrt) - len(grads))
        with torch.no_grad():
            if "x" in self.out and (gx := grads.pop(0)) is not None:
                self.out["x"][..., rs, :] += gx
            if "y" in self.out and (gy := grads.pop(0)) is not None:
                self.out["y"][..., cs, :] += gy
            for acc, gp in zip(self.p_out, grads):
                if gp is not None:
                    acc += gp


def online_lse(x, y, hw, eps: float, cost: Cost, compiled: bool = False, row_tile: int | None = None,
               wide: bool = False, transpose: bool = False, params: tuple = ()) -> torch.Tensor:
    """:func:`lse_online`, differentiable in ``x``, ``y``, ``hw`` and ``params``, the
    tensors the cost holds (:func:`cost_leaves`), in :math:`O(n+m)` memory (first order:
    the backward recomputes the tiles and is not itself differentiable)."""
    if params or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or hw.requires_grad)):
        return _OnlineLSE.apply(x, y, hw, eps, cost, compiled, row_tile, wide, transpose, *params)
    return lse_online(x, y, hw, eps, cost, compiled, row_tile, wide, transpose)


@torch.no_grad()  # a cost callable's parameters build no graph here
def plan_pass(t: Pass, row, col, eps: float, V=None, U=None, *, a=None, b=None, with_cost: bool = False,
              row_tile=None, accumulate: torch.dtype | None = None, round_to: torch.dtype | None = None):
    r"""``(P V, P^T U, sum_ij P_ij C_ij)`` in one pass over the tiles of ``t``. Without
    weights, :math:`P_{ij} = \exp((\text{row}_i + \text{col}_j - C_{ij})/\varepsilon)` (``row =
    f + eps log a``, ``col = g + eps log b``; zero weights: ``-inf``, exactly 0; the squared
    Euclidean exponent by the matmul expansion). With weights ``a, b``, ``row, col`` are the
    potentials: the squared Euclidean pass folds the weights into them
    (``row + eps log a``: the plan :meth:`~entrokit.geometry.base.Geometry.plan` returns, to
    the rounding of the exponent, by one expansion per tile); other costs form each tile as
    :func:`~entrokit.geometry.base.plan_block` of the cost tile, entry for entry that plan.
    ``V (B, m, k)``, ``U (B, n, k)`` or ``None``; ``with_cost`` adds the tile sums of
    :math:`P\odot C` (``None`` otherwise). Entries are formed in the working dtype, rounded
    to ``round_to`` if given, and summed in ``accumulate`` (default: the working dtype). No
    autograd."""
    x, dev = t.x, t.x.device
    n, m = x.shape[-2], t.y.shape[-2]
    if a is not None and t.sq:
        # the same plan as one expansion per tile: row = f + eps log a (zero weight: -inf)
        row, col, a, b = row + eps * torch.log(a), col + eps * torch.log(b), None, None
    if a is None:
        row, col = row.to(t.dtype), col.to(t.dtype)
    # the plan's dtype: the working dtype, or wider potentials/weights (as plan_block promotes)
    acc = accumulate or torch.promote_types(torch.promote_types(row.dtype, col.dtype), t.dtype)
    PV = None if V is None else torch.zeros(*V.shape[:-2], n, V.shape[-1], dtype=acc, device=dev)
    PTU = None if U is None else torch.zeros(*U.shape[:-2], m, U.shape[-1], dtype=acc, device=dev)
    V = None if V is None else V.to(acc)
    U = None if U is None else U.to(acc)
    tc = torch.zeros(x.shape[:-2], dtype=acc, device=dev) if with_cost else None
    floor = exp_floor(t.dtype)
    with ieee_matmul(dev):
        for r0, r1, c0, c1 in tiles(n, m, dev, row_tile):
            C = None
            if a is None:
                P = t.log_plan(r0, r1, c0, c1, row, col, eps).clamp_min_(floor).exp_()
            else:
                C = t.cost_tile(t.x[..., r0:r1, :], t.y[..., c0:c1, :])
                P = plan_block(row[..., r0:r1], col[..., c0:c1], a[..., r0:r1], b[..., c0:c1], C, eps)
            if round_to is not None:
                P = P.to(round_to)
            P = P.to(acc)
            if PV is not None:
                PV[..., r0:r1, :] += torch.matmul(P, V[..., c0:c1, :])
            if PTU is not None:
                PTU[..., c0:c1, :] += torch.matmul(P.transpose(-1, -2), U[..., r0:r1, :])
            if with_cost:
                C = t.cost_tile(t.x[..., r0:r1, :], t.y[..., c0:c1, :]) if C is None else C
                tc += (P * C.to(acc)).sum((-2, -1))
    return PV, PTU, tc


def plan_products(x, y, row, col, eps: float, V, U, cost: Cost, row_tile: int | None = None, wide: bool = False):
    """``(P V, P^T U)`` of :func:`plan_pass` for the points ``x, y`` (results in ``V``'s,
    else ``U``'s, dtype)."""
    PV, PTU, _ = plan_pass(Pass(x, y, cost, wide), row, col, eps, V, U, row_tile=row_tile)
    out_dtype = V.dtype if V is not None else (U.dtype if U is not None else x.dtype)
    return (None if PV is None else PV.to(out_dtype)), (None if PTU is None else PTU.to(out_dtype))


def plan_sums(x, y, f, g, a, b, eps: float, cost: Cost, row_tile: int | None = None, *,
              accumulate: torch.dtype | None = None, round_to: torch.dtype | None = None):
    r"""Row sums, column sums and :math:`\langle C, P\rangle` of the plan
    :math:`P = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}` in one pass, its entries those
    of :meth:`~entrokit.geometry.base.Geometry.plan` (module docstring: the squared Euclidean
    cost reads :math:`\langle C, P\rangle` from :math:`P[\mathbf 1, \tilde y]`). Results in
    ``accumulate`` (default: the plan's dtype)."""
    t = Pass(x, y, cost)
    ones_m = torch.ones(*t.y.shape[:-1], 1, dtype=t.dtype, device=x.device)
    ones_n = torch.ones(*t.x.shape[:-1], 1, dtype=t.dtype, device=x.device)
    V = torch.cat([ones_m, t.y], -1) if t.sq else ones_m
    PV, PTU, tc = plan_pass(t, f, g, eps, V, ones_n, a=a, b=b, with_cost=not t.sq,
                            row_tile=row_tile, accumulate=accumulate, round_to=round_to)
    r, c, out = PV[..., 0], PTU[..., 0], PV.dtype
    if t.sq:
        # <C, P> = sum_i r_i |x_i|^2 + sum_j c_j |y_j|^2 - 2 <x, P y> (centred points, float64)
        d = torch.float64
        tc = ((r.to(d) * t.x_sq.to(d)).sum(-1) + (c.to(d) * t.y_sq.to(d)).sum(-1)
              - 2.0 * (t.x.to(d) * PV[..., 1:].to(d)).sum((-2, -1)))
    return r.to(out), c.to(out), tc.to(out)


@torch.no_grad()  # a cost callable's parameters build no graph here
def cost_bounds(x, y, cost: Cost, row_tile: int | None = None):
    """``(min C, max C)`` over the batch axes of ``x``, one tile at a time (NaN propagates)."""
    t = Pass(x, y, cost)
    lo = torch.full(x.shape[:-2], float("inf"), dtype=x.dtype, device=x.device)
    hi = torch.full(x.shape[:-2], -float("inf"), dtype=x.dtype, device=x.device)
    with ieee_matmul(x.device):
        for r0, r1, c0, c1 in tiles(x.shape[-2], y.shape[-2], x.device, row_tile):
            # running bounds updated in place (small per-tile results would grow the heap)
            C = t.cost_tile(t.x[..., r0:r1, :], t.y[..., c0:c1, :]).flatten(-2)
            torch.minimum(lo, C.amin(-1).to(lo.dtype), out=lo)
            torch.maximum(hi, C.amax(-1).to(hi.dtype), out=hi)
    return lo, hi
