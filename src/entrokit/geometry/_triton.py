r"""Fused Triton kernels of the online point-cloud reductions: the soft-min, the plan products
and the marginals, with the cost, the potentials' shift, the exponential and the reduction
computed in registers (the tile never goes to memory).

**Costs.** ``"sqeuclidean"`` (:math:`C_{ij}=\|x_i-y_j\|^2`, on points centred as in
:mod:`entrokit.geometry._online`) and ``"inner"`` (:math:`C_{ij}=-x_i\cdot y_j`). Both are
one cross term plus per-row and per-column offsets; with :math:`L=\log_2 e` the kernels
(:mod:`entrokit.geometry._triton_kernels`) evaluate the base-2 exponent

.. math::

    t_{ij} = a_i + b_j + X_i\cdot Y_j,\qquad
    \text{sqeuclidean: } X_i = \tfrac{2L}{\varepsilon}x_i,\;
    b_j = \tfrac{L}{\varepsilon}(\text{col}_j - \|y_j\|^2),\;
    a_i = \tfrac{L}{\varepsilon}(\text{row}_i - \|x_i\|^2),

(``"inner"``: :math:`X_i = \tfrac{L}{\varepsilon}x_i`, :math:`b_j = \tfrac{L}{\varepsilon}\text{col}_j`,
:math:`a_i = \tfrac{L}{\varepsilon}\text{row}_i`), so that
:math:`2^{t_{ij}} = \exp((\text{row}_i+\text{col}_j-C_{ij})/\varepsilon)` (FlashSinkhorn's
shifted potentials: one bias per column instead of three).

**Soft-min** (:func:`lse_pairs`, :func:`online_lse`): per row the online pair
:math:`(M_i, S_i)` with :math:`\operatorname{lse}_i = M_i + \log S_i`, the same pairs the
tiled and sharded geometries merge (:func:`entrokit.geometry.base.combine_lse`).
**Plan products** (:func:`plan_products`): :math:`P V` and :math:`P^\top U` for ``k`` vectors
at once, :math:`P_{ij} = 2^{t_{ij}}`; :func:`marginals` gives :math:`P\mathbf 1`, :math:`P^\top\mathbf 1`.
**Gradients** of :func:`online_lse` are two fused plan products (:class:`_FusedLSE`).

**Precision.** Products are float32 (``input_precision="ieee"``) for float16/bfloat16/float32
inputs, float64 for float64 inputs: float64 runs in the kernel (``tl.dot`` in float64), and
so do float32 clouds too spread for float32 exponents (``wide=True``,
:func:`entrokit.geometry._online.needs_wide_tiles`). ``allow_tf32=True`` rounds the inputs of
each ``tl.dot`` to TF32 (10-bit mantissa, unit roundoff :math:`u=2^{-11}`); the error of
each exponent is then at most about

.. math::

    |\delta t_{ij}|\,\ln 2 \;\le\; 2u\,\frac{2\,|x_i|\,|y_j|}{\varepsilon}
    \;\le\; 2^{-9}\,\frac{R^2}{\varepsilon}\approx 2\cdot 10^{-3}\,\frac{R^2}{\varepsilon}

for the squared-Euclidean cost with :math:`R` the largest norm of the centred points
(:math:`2^{-10}|x_i||y_j|/\varepsilon` for ``"inner"``), a relative error of the same size in
each :math:`P_{ij}`: far above the 1e-4 tolerances of a solve unless :math:`R^2/\varepsilon`
is small. The plan products also round :math:`P_{ij}` and ``V`` to TF32 (a relative error
:math:`u` per entry). It is off by default.

**Where the kernels run.** CUDA tensors, or CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported: the tests). :func:`check_usable`
raises a typed error otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from entrokit._errors import InputError
from entrokit.geometry.costs import centre

__all__ = ["available", "interpreting", "check_usable", "use_triton", "lse_pairs", "online_lse",
           "plan_products", "marginals"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
COSTS = ("sqeuclidean", "inner")
# "auto" falls back to the torch tiles after a failed launch (compiler or driver problem)
_failed = False


def available() -> bool:
    """Whether the ``triton`` package is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_usable(device: torch.device) -> None:
    """Raise :class:`~entrokit.InputError` unless the kernels can run on ``device``."""
    if not available():
        raise InputError("kernel='triton' needs the optional package 'triton', which is not installed "
                         "(pip install triton; it ships with the CUDA builds of torch). Use kernel='auto'.")
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise InputError(f"kernel='triton' runs on CUDA tensors (got a {device.type} tensor); on CPU only under the "
                     "Triton interpreter (set TRITON_INTERPRET=1 before importing triton). Use kernel='auto', "
                     "'compile' or 'eager' on this device.")


def use_triton(kernel: str, device: torch.device, cost) -> bool:
    """The dispatch rule: ``"triton"`` always; ``"auto"`` for a squared-Euclidean cost on CUDA
    when triton is installed (and no earlier launch failed); never otherwise."""
    if kernel == "triton":
        return True
    return (kernel == "auto" and cost == "sqeuclidean" and device.type == "cuda" and not _failed
            and os.environ.get("ENTROKIT_TRITON", "1") != "0" and available())


def run_or_fallback(kernel: str, fused, fallback):
    """``fused()``; under ``kernel="auto"`` a failing launch warns once and runs ``fallback()``."""
    global _failed
    if kernel == "triton":
        return fused()
    if _failed:  # an earlier launch failed: the geometry chose the kernel once, the fallback holds
        return fallback()
    try:
        return fused()
    except InputError:  # the caller's mistake, not the kernel's
        raise
    except Exception as err:  # no compiler for this GPU, driver problem, ...
        import warnings

        _failed = True
        warnings.warn(f"the fused Triton kernel failed ({type(err).__name__}: {err}); falling back to the "
                      "torch tiles. Set ENTROKIT_TRITON=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return fallback()


def _kernels():
    from entrokit.geometry import _triton_kernels

    return _triton_kernels


def _work_dtype(dtype: torch.dtype, wide: bool) -> torch.dtype:
    return torch.float64 if (wide or dtype == torch.float64) else torch.float32


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(v)))


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _blocks(device: torch.device, work: torch.dtype, d: int, rows: int, prec: str):
    """``(BLOCK_M, BLOCK_N, BLOCK_D, ONE_D, SMALL_D, num_warps)`` for ``rows = B n`` rows; tiny
    blocks under the interpreter. Chosen so that no configuration spills registers on sm_90
    (``tests/geometry/test_triton.py`` compiles them): ``d <= 4`` full-precision coordinates go
    through outer products (:func:`_small_d`), up to 32 coordinates stay in registers for
    ``tl.dot``, more are streamed 16 at a time through smaller tiles; the larger row blocks when
    they give at least two programs per SM."""
    small = _small_d(d, prec)
    if device.type != "cuda":
        return 16, 16, 16, d <= 16, small, 1
    if small:
        if work == torch.float64:
            return 64, 32, 16, True, small, 4
        return (128, 32, 16, True, small, 8) if rows >= 128 * 2 * _sm_count(device) else (64, 32, 16, True, small, 4)
    if d > 32 or work == torch.float64 and d > 16:
        return 64, 32, 16, False, 0, 4
    block_d = _pow2(d, 16, 32)
    if work == torch.float64:
        return 64, 32, block_d, True, 0, 4
    if rows >= 128 * 2 * _sm_count(device):
        return 128, 64, block_d, True, 0, 8
    return 64, 64, block_d, True, 0, 4


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_k(device: torch.device, k: int, one_d: bool) -> int:
    """Vectors per program of the plan kernel: up to 64 (16 when the coordinates are streamed)."""
    return 16 if device.type != "cuda" else _pow2(k, 16, 64 if one_d else 16)


def _prec(allow_tf32: bool, work: torch.dtype) -> str:
    return "tf32" if (allow_tf32 and work == torch.float32) else "ieee"


def _small_d(d: int, prec: str) -> int:
    """``d`` when the cross term is cheaper as ``d`` outer products than as a ``tl.dot`` padded to
    an inner dimension of 16 (full-precision products of ``d <= 4`` coordinates), else 0."""
    return d if (d <= 4 and prec == "ieee") else 0


class Prepared:
    """Centred points and norms of one pair of clouds, flattened to ``(B, n, d)``, with the scaled
    rows and row offsets of the soft-min computed once (a geometry keeps one per axis and
    ``eps``: :meth:`entrokit.geometry.PointCloud.lse`)."""

    def __init__(self, x, y, eps: float, cost: str, wide: bool):
        if cost not in COSTS:
            raise InputError(f"the fused kernels take cost 'sqeuclidean' or 'inner', got {cost!r}.")
        if x.device != y.device:
            raise InputError(f"x and y are on different devices ({x.device}, {y.device}).")
        check_usable(x.device)
        self.batch, self.n, self.m, self.d = x.shape[:-2], x.shape[-2], y.shape[-2], x.shape[-1]
        self.dtype, self.work = x.dtype, _work_dtype(x.dtype, wide)
        x = x.detach().reshape(-1, self.n, self.d).to(self.work)
        y = y.detach().reshape(-1, self.m, self.d).to(self.work)
        if cost == "sqeuclidean":  # translation invariant: centred as every tile is
            x, y = centre(x, y)
            self.x_sq, self.y_sq = x.pow(2).sum(-1), y.pow(2).sum(-1)
            self.scale = 2.0 / eps
        else:
            self.x_sq = self.y_sq = None
            self.scale = 1.0 / eps
        self.x, self.y, self.eps, self.cost = x.contiguous(), y.contiguous(), eps, cost
        self.B = self.x.shape[0]
        self._lse_rows = None

    def lse_rows(self):
        """``(X, a)`` of the soft-min along the columns: ``X = L scale x``, ``a = -L |x|^2 / eps``
        (``None`` for the inner product)."""
        if self._lse_rows is None:
            X = (self.x * (self.scale * _LOG2E)).contiguous()
            a = None if self.x_sq is None else (self.x_sq * (-_LOG2E / self.eps)).contiguous()
            self._lse_rows = (X, a)
        return self._lse_rows

    def offset(self, pot, sq):
        """``L (pot - |p|^2) / eps`` (``L = log2 e``) as a contiguous ``(B, len)`` tensor; ``pot``
        has the points' batch axes (or none: shared by the batch)."""
        if pot.shape[-1] not in (self.n, self.m) or (pot.dim() > 1 and tuple(pot.shape[:-1]) != tuple(self.batch)):
            raise InputError(f"a potential of shape {tuple(pot.shape)} does not match points with batch axes "
                             f"{tuple(self.batch)} and n={self.n}, m={self.m}.")
        pot = pot.detach().to(self.work).expand(*self.batch, pot.shape[-1]).reshape(self.B, -1)
        if sq is not None:
            pot = pot - sq
        return (pot * (_LOG2E / self.eps)).contiguous()


def _launch_lse(X, Y, a, b, allow_tf32: bool):
    """``(M, S)`` in base 2 of ``t_ij = a_i + b_j + X_i . Y_j`` along the columns (``a`` may be
    ``None``); ``(B, n)`` each."""
    k = _kernels()
    B, n, d = X.shape
    m = Y.shape[1]
    mx = torch.empty(B, n, dtype=X.dtype, device=X.device)
    s = torch.empty_like(mx)
    prec = _prec(allow_tf32, X.dtype)
    bm, bn, bd, one_d, small, warps = _blocks(X.device, X.dtype, d, B * n, prec)
    grid = (_cdiv(n, bm), B)
    a_t = b if a is None else a
    k.lse_kernel[grid](X, Y, a_t, b, mx, s, n, m, d, *X.stride(), *Y.stride(), *a_t.stride(), *b.stride(),
                       *mx.stride(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_D=one_d, PREC=prec, SMALL_D=small,
                       HAS_A=a is not None, num_warps=warps)
    return mx, s


def _launch_plan(X, Y, a, b, V, allow_tf32: bool):
    """``sum_j 2^(a_i + b_j + X_i . Y_j) V_j``: ``(B, n, k)``, or the row sums ``(B, n)`` for ``V=None``."""
    k_ = _kernels()
    B, n, d = X.shape
    m = Y.shape[1]
    prec = _prec(allow_tf32, X.dtype)
    bm, bn, bd, one_d, small, warps = _blocks(X.device, X.dtype, d, B * n, prec)
    if V is None:
        out = torch.empty(B, n, dtype=X.dtype, device=X.device)
        k, bk, vt, ostr = 1, 16, out, (*out.stride(), 0)
        vstr = (0, 0, 0)
    else:
        k = V.shape[-1]
        out = torch.empty(B, n, k, dtype=X.dtype, device=X.device)
        bk = _block_k(X.device, k, one_d)
        vt, vstr, ostr = V, V.stride(), out.stride()
    grid = (_cdiv(n, bm), B, _cdiv(k, bk))
    k_.plan_kernel[grid](X, Y, a, b, vt, out, n, m, d, k, *X.stride(), *Y.stride(), *a.stride(), *b.stride(),
                         *vstr, *ostr, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk, ONE_D=one_d,
                         HAS_V=V is not None, PREC=prec, SMALL_D=small, num_warps=warps)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lse_pairs(x, y, hw, eps: float, cost: str = "sqeuclidean", *, allow_tf32: bool = False,
              wide: bool = False, prepared: Prepared | None = None):
    r"""Partial pairs :math:`(M_i, S_i)` of :math:`\log\sum_j\exp((hw_j - C(x_i, y_j))/\varepsilon)`
    along the columns (``lse = M + log S``; rows without a finite term: ``(-inf, 0)``).

    Args:
        x: ``(..., n, d)`` rows; y: ``(..., m, d)`` columns; hw: ``(..., m)``, ``h + eps log w``
            (``-inf`` for zero weights).
        cost: ``"sqeuclidean"`` or ``"inner"`` (:math:`C = -x\cdot y`).
        allow_tf32: TF32 products (error bound in the module docstring).
        wide: run float32 inputs in float64 (the kernel then works in float64).
        prepared: ``Prepared(x, y, eps, cost, wide)`` kept from an earlier call (saves the
            centring and scaling of the points).

    Returns ``(M, S)`` of shape ``(..., n)`` in the inputs' dtype. No autograd (:func:`online_lse`).
    """
    p = prepared if prepared is not None else Prepared(x, y, eps, cost, wide)
    b = p.offset(hw, p.y_sq)
    X, a = p.lse_rows()
    mx, s = _launch_lse(X, p.y, a, b, allow_tf32)
    mx = mx * _LN2
    shape = (*p.batch, p.n)
    return mx.to(p.dtype).reshape(shape), s.to(p.dtype).reshape(shape)


class _FusedLSE(torch.autograd.Function):
    r"""Differentiable fused soft-min. With :math:`p_{ij} = e^{z_{ij}-\operatorname{lse}_i}` and the
    incoming :math:`\gamma_i`: :math:`\partial/\partial hw_j = \sum_i\gamma_i p_{ij}/\varepsilon`;
    squared Euclidean :math:`\nabla_{x_i} = -\tfrac2\varepsilon\gamma_i(x_i\sum_j p_{ij} - \sum_j p_{ij}y_j)`,
    :math:`\nabla_{y_j} = -\tfrac2\varepsilon(y_j\sum_i\gamma_ip_{ij} - \sum_i\gamma_ip_{ij}x_i)`;
    inner product :math:`\nabla_{x_i} = \gamma_i\sum_j p_{ij}y_j/\varepsilon`,
    :math:`\nabla_{y_j} = \sum_i\gamma_ip_{ij}x_i/\varepsilon`. Two fused plan products:
    :math:`P[1, y]` and :math:`P^\top[\gamma, \gamma x]` (first order only)."""

    @staticmethod
    def forward(ctx, x, y, hw, eps, cost, allow_tf32, wide):
        mx, s = lse_pairs(x, y, hw, eps, cost, allow_tf32=allow_tf32, wide=wide)
        lse = mx + torch.log(s)
        ctx.save_for_backward(x, y, hw, lse)
        ctx.args = (eps, cost, allow_tf32, wide)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gamma):
        x, y, hw, lse = ctx.saved_tensors
        eps, cost, allow_tf32, wide = ctx.args
        need_x, need_y, need_h = ctx.needs_input_grad[:3]
        p = Prepared(x, y, eps, cost, wide)
        lse_w = lse.detach().to(p.work).reshape(p.B, p.n)
        gam = gamma.to(p.work).reshape(p.B, p.n)
        row_const = -lse_w if p.x_sq is None else -p.x_sq / eps - lse_w
        # rows whose lse is -inf have no plan row: drop them (not +inf)
        a = torch.where(lse_w == -math.inf, torch.full_like(lse_w, -math.inf), row_const * _LOG2E).contiguous()
        b = p.offset(hw, p.y_sq)
        X = (p.x * (p.scale * _LOG2E)).contiguous()
        gx = gy = gh = None
        if need_x:
            V = torch.cat([torch.ones_like(p.y[..., :1]), p.y], -1).contiguous()
            R = _launch_plan(X, p.y, a, b, V, allow_tf32)  # [sum_j p_ij, sum_j p_ij y_j]
            if cost == "sqeuclidean":
                gx = -p.scale * gam.unsqueeze(-1) * (p.x * R[..., :1] - R[..., 1:])
            else:
                gx = gam.unsqueeze(-1) * R[..., 1:] / eps
            gx = gx.to(x.dtype).reshape(x.shape)
        if need_y or need_h:
            U = torch.cat([gam.unsqueeze(-1), gam.unsqueeze(-1) * p.x], -1) if need_y else gam.unsqueeze(-1)
            Yr = (p.y * (p.scale * _LOG2E)).contiguous()
            Cc = _launch_plan(Yr, p.x, b, a, U.contiguous(), allow_tf32)  # [sum_i g_i p_ij, sum_i g_i p_ij x_i]
            if need_h:
                gh = (Cc[..., 0] / eps).to(hw.dtype)
                gh = gh.reshape(hw.shape) if hw.dim() > 1 or p.B == 1 else gh.sum(0)
            if need_y:
                if cost == "sqeuclidean":
                    gy = -p.scale * (p.y * Cc[..., :1] - Cc[..., 1:])
                else:
                    gy = Cc[..., 1:] / eps
                gy = gy.to(y.dtype).reshape(y.shape)
        return gx, gy, gh, None, None, None, None


def online_lse(x, y, hw, eps: float, cost: str = "sqeuclidean", *, allow_tf32: bool = False,
               wide: bool = False) -> torch.Tensor:
    r""":math:`\operatorname{lse}_i = \log\sum_j\exp((hw_j - C(x_i, y_j))/\varepsilon)`, ``(..., n)``,
    differentiable in ``x``, ``y`` and ``hw`` (backward: two fused plan products, :class:`_FusedLSE`)."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or hw.requires_grad):
        return _FusedLSE.apply(x, y, hw, eps, cost, allow_tf32, wide)
    mx, s = lse_pairs(x, y, hw, eps, cost, allow_tf32=allow_tf32, wide=wide)
    return mx + torch.log(s)


def plan_products(x, y, row, col, eps: float, V, U, cost: str = "sqeuclidean", *, allow_tf32: bool = False,
                  wide: bool = False):
    r"""``(P V, P^T U)`` for :math:`P_{ij} = \exp((\text{row}_i + \text{col}_j - C_{ij})/\varepsilon)`,
    ``row = f + eps log a``, ``col = g + eps log b`` (``-inf``: a zero weight, exactly 0): the
    fused counterpart of :func:`entrokit.geometry._online.plan_products`.

    ``V``: ``(..., m, k)`` or ``None``; ``U``: ``(..., n, k')`` or ``None``; ``k`` vectors go
    through one pass. Results in ``V``'s / ``U``'s dtype. No autograd."""
    p = Prepared(x, y, eps, cost, wide)
    a, b = p.offset(row, p.x_sq), p.offset(col, p.y_sq)
    PV = PTU = None
    if V is not None:
        Vw = V.detach().to(p.work).reshape(p.B, p.m, V.shape[-1]).contiguous()
        PV = _launch_plan((p.x * (p.scale * _LOG2E)).contiguous(), p.y, a, b, Vw, allow_tf32)
        PV = PV.to(V.dtype).reshape(*V.shape[:-2], p.n, V.shape[-1])
    if U is not None:
        Uw = U.detach().to(p.work).reshape(p.B, p.n, U.shape[-1]).contiguous()
        PTU = _launch_plan((p.y * (p.scale * _LOG2E)).contiguous(), p.x, b, a, Uw, allow_tf32)
        PTU = PTU.to(U.dtype).reshape(*U.shape[:-2], p.m, U.shape[-1])
    return PV, PTU


def marginals(x, y, row, col, eps: float, cost: str = "sqeuclidean", *, allow_tf32: bool = False,
              wide: bool = False):
    r"""``(P 1, P^T 1)``, ``(..., n)`` and ``(..., m)``, of the plan of :func:`plan_products`
    (row sums in registers: no vector operand). No autograd."""
    p = Prepared(x, y, eps, cost, wide)
    a, b = p.offset(row, p.x_sq), p.offset(col, p.y_sq)
    r = _launch_plan((p.x * (p.scale * _LOG2E)).contiguous(), p.y, a, b, None, allow_tf32)
    c = _launch_plan((p.y * (p.scale * _LOG2E)).contiguous(), p.x, b, a, None, allow_tf32)
    dtype = row.dtype if row.is_floating_point() else p.dtype
    return r.to(dtype).reshape(*p.batch, p.n), c.to(dtype).reshape(*p.batch, p.m)
