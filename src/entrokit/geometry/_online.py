r"""Tiled (online) reductions of a point-cloud cost: the full ``n x m`` matrix is never stored.

The soft-min along ``axis=1`` is, per row :math:`i`,

.. math::

    \operatorname{lse}_i = \log\sum_j \exp\big((h_j + \varepsilon\log w_j - C(x_i, y_j))/\varepsilon\big),

computed tile by tile: a tile of rows against a block of columns gives a partial pair
:math:`(M, S)` (max and shifted sum-exp, :mod:`entrokit.geometry.base`), and the pairs of
the column blocks are merged exactly. ``axis=0`` is the same computation with the roles
of ``x`` and ``y`` swapped.

**Squared Euclidean tiles** use the matmul expansion. With the points centred (the cost
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

**Gradients** (:class:`_OnlineLSE`) are recomputed tile by tile in backward, so memory
stays :math:`O(n + m)`: with :math:`p_{ij} = e^{z_{ij} - \operatorname{lse}_i}` and the
incoming gradient :math:`\gamma_i`,
:math:`\partial/\partial h_j = \sum_i \gamma_i p_{ij}/\varepsilon`,
:math:`\partial/\partial C_{ij} = -\gamma_i p_{ij}/\varepsilon`, which for the squared
Euclidean cost gives
:math:`\nabla_{x_i} = -\tfrac{2}{\varepsilon}\gamma_i\big(x_i \sum_j p_{ij} - \sum_j p_{ij} y_j\big)`
and the transposed formula for :math:`y_j` (two small matmuls per tile). Other costs
differentiate the recomputed tile with autograd.

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

from entrokit.geometry.base import combine_lse, exp_floor

# Tiles hold about this many entries: 4 MiB in float32 on CPU (they stay in cache); on a
# GPU, 256 MiB (enough work per launch to hide the launch latency).
TILE_ENTRIES = {"cpu": 1 << 20, "cuda": 1 << 26}
# Column blocks are at most this wide (the row block is TILE_ENTRIES // width).
MAX_TILE_COLS = {"cpu": 4096, "cuda": 1 << 16}
# "auto" compiles the tile kernel for passes of at least this many entries.
COMPILE_MIN_ENTRIES = 1 << 24
# Largest tolerated rounding error of a float32 exponent before tiles go to float64.
_MAX_EXPONENT_ERROR = 1e-4

CostTile = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ieee_matmul:
    r"""Context: float32 matmuls in full precision on CUDA even where the user enabled TF32
    (a TF32 product rounds ``x . y`` to 10 bits, an exponent error of about
    :math:`10^{-3} R^2/\varepsilon`, far above any useful tolerance). No-op on CPU."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self):
        if self.active:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def radius_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest squared norm of the centred points (one host sync; cached by the geometry)."""
    centre = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True))
    return max(float((x - centre).pow(2).sum(-1).max()), float((y - centre).pow(2).sum(-1).max()))


def needs_wide_tiles(radius_sq: float, eps: float, dtype: torch.dtype) -> bool:
    """Whether float32 tiles would round the exponents by more than
    :data:`_MAX_EXPONENT_ERROR` (then tiles are computed in float64)."""
    if dtype != torch.float32:
        return False
    return 4.0 * radius_sq * torch.finfo(torch.float32).eps / eps > _MAX_EXPONENT_ERROR


def _lse_tile_sq(xs: torch.Tensor, y: torch.Tensor, u: torch.Tensor, floor: float):
    """Partial pair of ``z = u_j + xs_i . y_j`` along the columns (the squared Euclidean tile)."""
    return _tile_pair(torch.baddbmm(u.unsqueeze(-2), xs, y.transpose(-1, -2)), floor)


def _tile_pair(z: torch.Tensor, floor: float):
    """``(max, sum exp(z - max))`` along the last axis; ``z`` is a temporary (overwritten)."""
    mx = z.amax(-1, keepdim=True)
    empty = mx == -math.inf
    s = z.sub_(mx.masked_fill(empty, 0.0)).clamp_min_(floor).exp_().sum(-1)
    return mx.squeeze(-1), s.masked_fill(empty.squeeze(-1), 0.0)


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
    if compiled:
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


def tile_rows(m: int, device: torch.device, rows: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a tile against ``m`` columns (``rows`` overrides the default)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    cols = min(max(m, 1), MAX_TILE_COLS[kind])
    return rows or max(16, TILE_ENTRIES[kind] // cols), cols


class SqEuclideanTiles:
    """Centred, optionally widened points of a squared-Euclidean cost, shared by every
    tile of a pass (module docstring)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, wide: bool):
        work = torch.float64 if wide else x.dtype
        centre = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True))
        self.x = (x - centre).to(work)
        self.y = (y - centre).to(work)
        self.x_sq = self.x.pow(2).sum(-1)
        self.y_sq = self.y.pow(2).sum(-1)
        self.dtype = x.dtype


def lse_online(
    x: torch.Tensor,
    y: torch.Tensor,
    hw: torch.Tensor,
    eps: float,
    cost_tile: CostTile | None,
    compiled: bool,
    row_tile: int | None = None,
    wide: bool = False,
) -> torch.Tensor:
    r"""Full log-sum-exp along the columns, ``(B, n)``, of
    :math:`z_{ij} = (hw_j - C(x_i, y_j))/\varepsilon` with ``hw = h + eps log w``.

    ``cost_tile=None`` is the squared Euclidean cost (matmul expansion); otherwise
    ``cost_tile(x_rows, y_cols)`` gives a cost tile; ``wide`` computes squared-Euclidean
    float32 tiles in float64 (:func:`needs_wide_tiles`). No autograd (see :class:`_OnlineLSE`).
    """
    with ieee_matmul(x.device):
        return _lse_online(x, y, hw, eps, cost_tile, compiled, row_tile, wide)


def _lse_online(x, y, hw, eps, cost_tile, compiled, row_tile, wide):
    # outputs are preallocated and filled in place: small long-lived tensors allocated
    # between tiles would pin the freed tile buffers and grow the CPU heap with n
    n, m = x.shape[-2], y.shape[-2]
    rows, cols = tile_rows(m, x.device, row_tile)
    floor = exp_floor(x.dtype)
    if cost_tile is None:
        t = SqEuclideanTiles(x, y, wide)
        xs = t.x * (2.0 / eps)
        u = (hw.to(t.x.dtype) - t.y_sq) / eps
        floor = exp_floor(t.x.dtype)
        out = torch.empty(*x.shape[:-1], dtype=t.x.dtype, device=x.device)
        for r0 in range(0, n, rows):
            mx, s = _merged(
                _run_tile("sq", _lse_tile_sq, compiled, xs[..., r0:r0 + rows, :], t.y[..., c0:c0 + cols, :],
                          u[..., c0:c0 + cols], floor)
                for c0 in range(0, m, cols)
            )
            out[..., r0:r0 + rows] = mx + torch.log(s) - t.x_sq[..., r0:r0 + rows] / eps
        return out.to(x.dtype)
    out = torch.empty(*x.shape[:-1], dtype=x.dtype, device=x.device)
    for r0 in range(0, n, rows):
        mx, s = _merged(
            _run_tile("cost", _lse_tile_cost, compiled, cost_tile(x[..., r0:r0 + rows, :], y[..., c0:c0 + cols, :]),
                      hw[..., c0:c0 + cols], eps, floor)
            for c0 in range(0, m, cols)
        )
        out[..., r0:r0 + rows] = mx + torch.log(s)
    return out


def _merged(pairs):
    """Running merge of the column blocks' partial pairs, one block at a time (no list of
    pairs kept alive across the tiles)."""
    acc = None
    for pair in pairs:
        acc = pair if acc is None else combine_lse((acc, pair))
    return acc


def _tile_softmax_weights(x_t, y_c, hw_c, lse_t, gamma_t, eps, cost_tile, sq):
    """``gamma_i * p_ij`` of one tile, ``p_ij = exp(z_ij - lse_i)``."""
    z = log_plan_tile(x_t, y_c, torch.zeros_like(lse_t), hw_c, eps, cost_tile, sq)
    p = torch.exp((z - lse_t.unsqueeze(-1)).clamp_min(exp_floor(z.dtype)))
    return p * gamma_t.unsqueeze(-1)


class _OnlineLSE(torch.autograd.Function):
    """Differentiable :func:`lse_online` with tile-by-tile recomputation in backward."""

    @staticmethod
    def forward(ctx, x, y, hw, eps, cost_tile, compiled, row_tile, wide):
        lse = lse_online(x.detach(), y.detach(), hw.detach(), eps, cost_tile, compiled, row_tile, wide)
        ctx.save_for_backward(x, y, hw, lse)
        ctx.eps, ctx.cost_tile, ctx.row_tile, ctx.wide = eps, cost_tile, row_tile, wide
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gamma):
        with ieee_matmul(gamma.device):
            return _OnlineLSE._backward(ctx, gamma)

    @staticmethod
    def _backward(ctx, gamma):
        x, y, hw, lse = ctx.saved_tensors
        eps, cost_tile = ctx.eps, ctx.cost_tile
        need_x, need_y, need_h = ctx.needs_input_grad[:3]
        n, m = x.shape[-2], y.shape[-2]
        rows, cols = tile_rows(m, x.device, ctx.row_tile)
        gx = torch.zeros_like(x) if need_x else None
        gy = torch.zeros_like(y) if need_y else None
        gh = torch.zeros_like(hw) if need_h else None
        if cost_tile is None:
            sq = SqEuclideanTiles(x.detach(), y.detach(), ctx.wide)
            xw, yw = sq.x, sq.y
        else:
            sq, xw, yw = None, x.detach(), y.detach()
        hw_w, lse_w, gamma_w = hw.detach().to(xw.dtype), lse.to(xw.dtype), gamma.to(xw.dtype)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            for c0 in range(0, m, cols):
                c1 = min(c0 + cols, m)
                x_t, y_c = xw[..., r0:r1, :], yw[..., c0:c1, :]
                if cost_tile is None or not (need_x or need_y):
                    q = _tile_softmax_weights(x_t, y_c, hw_w[..., c0:c1], lse_w[..., r0:r1],
                                              gamma_w[..., r0:r1], eps, cost_tile, sq)
                    if need_h:
                        gh[..., c0:c1] += (q.sum(-2) / eps).to(gh.dtype)
                    if need_x:
                        # grad_x_i = -(2/eps)(x_i sum_j q_ij - sum_j q_ij y_j)
                        gx[..., r0:r1, :] += (-(2.0 / eps) * (x_t * q.sum(-1, keepdim=True) - torch.matmul(q, y_c))).to(gx.dtype)
                    if need_y:
                        gy[..., c0:c1, :] += (-(2.0 / eps) * (y_c * q.sum(-2).unsqueeze(-1) - torch.matmul(q.transpose(-1, -2), x_t))).to(gy.dtype)
                    continue
                with torch.enable_grad():
                    xt = x_t.detach().requires_grad_(need_x)
                    yc = y_c.detach().requires_grad_(need_y)
                    C = cost_tile(xt, yc)
                    z = (hw_w[..., c0:c1].unsqueeze(-2) - C.detach()) / eps
                    q = torch.exp((z - lse_w[..., r0:r1].unsqueeze(-1)).clamp_min(exp_floor(z.dtype)))
                    q = q * gamma_w[..., r0:r1].unsqueeze(-1)
                    if need_h:
                        gh[..., c0:c1] += q.sum(-2) / eps
                    inputs = [t_ for t_, need in ((xt, need_x), (yc, need_y)) if need]
                    grads = torch.autograd.grad(C, inputs, grad_outputs=-q / eps, allow_unused=True)
                grads = list(grads)
                if need_x:
                    g_ = grads.pop(0)
                    if g_ is not None:
                        gx[..., r0:r1, :] += g_
                if need_y:
                    g_ = grads.pop(0)
                    if g_ is not None:
                        gy[..., c0:c1, :] += g_
        return gx, gy, gh, None, None, None, None, None


def online_lse(x, y, hw, eps: float, cost_tile: CostTile | None, compiled: bool,
               row_tile: int | None = None, wide: bool = False) -> torch.Tensor:
    """:func:`lse_online`, differentiable in ``x``, ``y`` and ``hw`` in :math:`O(n+m)` memory
    (first order: the backward recomputes the tiles and is not itself differentiable)."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or hw.requires_grad):
        return _OnlineLSE.apply(x, y, hw, eps, cost_tile, compiled, row_tile, wide)
    return lse_online(x, y, hw, eps, cost_tile, compiled, row_tile, wide)


def log_plan_tile(x_t, y_c, row_t, col_c, eps, cost_tile, sq: SqEuclideanTiles | None):
    r"""``log P`` on one tile: :math:`(\text{row}_i + \text{col}_j - C_{ij})/\varepsilon`, where
    ``row = f + eps log a`` and ``col = g + eps log b`` (matmul expansion for the squared
    Euclidean cost; ``x_t, y_c`` are then the centred points of ``sq``)."""
    if sq is not None:
        z = torch.baddbmm(((col_c.to(x_t.dtype) - y_c.pow(2).sum(-1)) / eps).unsqueeze(-2), x_t * (2.0 / eps),
                          y_c.transpose(-1, -2))
        return z + ((row_t.to(x_t.dtype) - x_t.pow(2).sum(-1)) / eps).unsqueeze(-1)
    return (row_t.unsqueeze(-1) + col_c.unsqueeze(-2) - cost_tile(x_t, y_c)) / eps


def plan_products(x, y, row, col, eps: float, V, U, cost_tile: CostTile | None,
                  row_tile: int | None = None, wide: bool = False):
    r"""``(P V, P^T U)`` in one pass over the tiles, for
    :math:`P_{ij} = \exp((\text{row}_i + \text{col}_j - C_{ij})/\varepsilon)` with
    ``row = f + eps log a``, ``col = g + eps log b`` (zero weights: ``-inf``, exactly 0).

    ``V``: ``(B, m, k)`` or ``None``; ``U``: ``(B, n, k)`` or ``None``. No autograd: callers
    that differentiate through the plan use the per-chunk autograd path.
    """
    with ieee_matmul(x.device):
        n, m = x.shape[-2], y.shape[-2]
        rows, cols = tile_rows(m, x.device, row_tile)
        sq = SqEuclideanTiles(x, y, wide) if cost_tile is None else None
        xw, yw = (sq.x, sq.y) if sq is not None else (x, y)
        work = xw.dtype
        row, col = row.to(work), col.to(work)
        PV = None if V is None else torch.zeros(*V.shape[:-2], n, V.shape[-1], dtype=work, device=x.device)
        PTU = None if U is None else torch.zeros(*U.shape[:-2], m, U.shape[-1], dtype=work, device=x.device)
        floor = exp_floor(work)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            for c0 in range(0, m, cols):
                c1 = min(c0 + cols, m)
                P = log_plan_tile(xw[..., r0:r1, :], yw[..., c0:c1, :], row[..., r0:r1], col[..., c0:c1], eps,
                                  cost_tile, sq).clamp_min_(floor).exp_()
                if PV is not None:
                    PV[..., r0:r1, :] += torch.matmul(P, V[..., c0:c1, :].to(work))
                if PTU is not None:
                    PTU[..., c0:c1, :] += torch.matmul(P.transpose(-1, -2), U[..., r0:r1, :].to(work))
        out_dtype = x.dtype if V is None else V.dtype
        return (None if PV is None else PV.to(out_dtype)), (None if PTU is None else PTU.to(out_dtype))
