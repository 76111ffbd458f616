r"""Doubly stochastic attention (Sinkformer): Sinkhorn in place of the softmax.

For queries :math:`q \in \mathbb R^{T\times E}` and keys :math:`k \in \mathbb R^{S\times E}`
the scores are :math:`s = q k^\top \cdot \mathrm{scale}` (default
:math:`\mathrm{scale} = 1/\sqrt E`) and the cost is :math:`C = -s`. Sinkformer (Sander et
al., AISTATS 2022) replaces the row softmax by alternating log-domain normalisations of
:math:`e^{s/\varepsilon}` towards uniform marginals :math:`a = \mathbf 1/T` (rows) and
:math:`b = \mathbf 1/S` (columns), and multiplies the plan by :math:`T`:

.. math::

    P = T \cdot \operatorname{diag}(a)\,\operatorname{diag}(e^{f/\varepsilon})\,
        e^{s/\varepsilon}\,\operatorname{diag}(e^{g/\varepsilon})\operatorname{diag}(b),
    \qquad \text{output} = P\,v .

**Marginals.** Rows sum to 1 and columns to :math:`T/S` (for self-attention, :math:`T=S`,
both are 1, which is Sinkformer's convention; Sinkformer's code multiplies by the number
of keys, which equals ``T`` there). With masks, only *live* queries and keys take part:
a key that no query may attend to (a padded key) gets column weight 0, a query that may
attend to no key gets row weight 0 and a zero output, and the marginals are uniform
over the live ones: rows sum to 1, columns to :math:`T_\text{live}/S_\text{live}`.
Masked pairs carry exactly zero weight.

**Counting iterations** as Sinkformer does: ``n_iter`` is the number of normalisations,
alternating rows, columns, rows, ... starting from :math:`e^{s/\varepsilon}`. So
``n_iter=1`` is exactly softmax attention, and every odd ``n_iter`` ends on the rows
(rows sum to 1 exactly). An even ``n_iter`` ends on the columns, as in Sinkformer: the
columns are then exact and the rows approximate. Internally, ``n_iter = 2k + 1`` runs
``k`` iterations of the library's Sinkhorn loop
(:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`, each a row then a column update)
and finishes with one row normalisation; ``n_iter = 2k`` runs ``k`` loop iterations.
With ``tol``, the loop runs until the L1 marginal error of the normalised plan
(:math:`\|P1/T - a\|_1` after a column update) is at most ``tol`` (at most ``max_iter``
loop iterations), then one row normalisation follows.

**Gradients.**

* ``grad="unroll"`` (default): the gradient through every normalisation, as Sinkformer
  takes it; in the log domain memory grows linearly with ``n_iter`` (one
  :math:`T\times S` tensor per normalisation), in the CPU's scaling form it does not (the
  kernel, and one vector per normalisation).
* ``grad="implicit"``: the loop runs without a graph; the returned weights carry the
  gradient of the fixed point by the implicit function theorem (a conjugate-gradient
  solve of the adjoint's Schur complement in backward). Memory does
  not depend on ``n_iter`` (the weights are the one :math:`T\times S` tensor kept, and
  backward allocates one more at a time). The gradient is exact at convergence
  and an approximation of the converged layer's gradient before it (the same for every
  ``n_iter``, including ``n_iter=1``; use ``tol`` or many iterations with it).

**The scaling form on the CPU.** With a fixed ``n_iter``, CPU tensors are normalised in
the scaling form, Sinkhorn-Knopp on the row-normalised kernel
:math:`K = \mathrm{softmax}_j(s/\varepsilon)`: one fused softmax pass, then one mat-vec per
normalisation instead of a log-sum-exp pass, and both gradients in closed form; the
weights equal the log-domain loop's to rounding. Without dropout and without the weights,
the layer forms neither the weights nor their gradient: the output is
:math:`\mathrm{diag}(1/s)\,K(v \odot V)` and the logits' gradient is :math:`K \odot` a
thin product (:class:`_ScaledOutput`). Where a live column's largest kernel entry falls
below :math:`e^{-70}` (float32; :math:`e^{-670}` in float64), the kernel would lose weight
to underflow and the log-domain loop runs instead.

**No host synchronisation** in the fixed-``n_iter`` mode on devices other than the CPU: no
value is read back inside the layer, forward or unrolled backward (masks are handled with
tensor operations). On the CPU the scaling form reads one flag per call (its exactness
check); the host waits for no device there.
``tol`` reads the error back at every check, and ``grad="implicit"``'s backward reads
one value per conjugate-gradient iteration. ``torch.compile(fullgraph=False)`` traces
the layer; the loop's wall-clock timer (``info["time"]`` of
:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`) splits the graph.

**Return types.** :class:`SinkhornAttention` returns the output tensor from ``forward``
whatever the arguments, as :func:`~torch.nn.functional.scaled_dot_product_attention`
does; :meth:`SinkhornAttention.forward_with_weights` returns ``(output, weights)``, and so
does :func:`sinkhorn_attention_with_weights` beside :func:`sinkhorn_attention`. The former
flags ``need_weights`` and ``return_weights`` accept only ``False``: ``True`` raises
:class:`~entrokit.InputError` naming the call that returns the weights.

**Precision.** float16/bfloat16 inputs (what ``torch.autocast`` hands the layer) are
computed in float32 with autocast off (log-domain Sinkhorn needs float32 accumulation,
and the scores ``q kᵀ`` keep float32 digits) and the output is cast back.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from entrokit._errors import InputError
from entrokit._validation import check_positive, check_positive_int, no_autocast
from entrokit.geometry.logit import LogitCost
from entrokit.problem import OTProblem, log_weights
from entrokit.solvers._entropic import warn_not_converged
from entrokit.solvers._numerics import pcg
from entrokit.solvers.implicit import entropic_residual, implicit_fixed_point
from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

__all__ = ["SinkhornAttention", "sinkhorn_attention", "sinkhorn_attention_with_weights"]

GRAD_MODES = ("unroll", "implicit")
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# loop shared with entrokit.nn.matching (the geometry is entrokit.geometry.LogitCost)
# --------------------------------------------------------------------------------------
def _plan_adjoint(P, a, b, eps: float, rhs_f, rhs_g, row_scale=None, col_scale=None):
    r"""Solve the entropic adjoint system :math:`J\lambda = (\bar f, \bar g)`,
    :math:`J = \varepsilon^{-1}[[\mathrm{diag}(r), P], [P^\top, \mathrm{diag}(c)]]`,
    :math:`r = P1`, :math:`c = P^\top 1`, for a materialised plan ``P``, through its Schur
    complement on :math:`\lambda_g`:

    .. math::

        \bigl(\mathrm{diag}(c) - P^\top \mathrm{diag}(r)^{-1} P\bigr)\lambda_g
            = \varepsilon\bar g - P^\top \mathrm{diag}(r)^{-1}\varepsilon\bar f, \qquad
        \lambda_f = \mathrm{diag}(r)^{-1}(\varepsilon\bar f - P\lambda_g),

    by Jacobi-PCG (:func:`~entrokit.solvers._numerics.pcg`). The spectrum of the
    preconditioned full system is symmetric about 1 (:math:`1 \pm \sigma_k`), the Schur
    complement's is :math:`1 - \sigma_k^2`: the same tolerance takes about half the
    iterations, each with the same two mat-vecs (Saad, *Iterative Methods*, §8.2). The gauge
    direction :math:`(\mathbf 1, -\mathbf 1)` of :math:`J` (:math:`\mathbf 1` of the Schur
    complement) is projected out of the right-hand side as in
    :func:`~entrokit.solvers.implicit.bipartite_adjoint`; rows and columns of zero weight
    (or zero mass) are masked out. Relative tolerance 1e-6 in float32, 1e-12 in float64.
    With ``row_scale`` :math:`s` and ``col_scale`` :math:`t`, the plan is
    :math:`\mathrm{diag}(s) P \mathrm{diag}(t)`, applied without forming it."""
    n, m = P.shape[-2:]
    tol = 1e-12 if P.dtype == torch.float64 else 1e-6

    def Pv(v):
        out = _matvec(P, v if col_scale is None else v * col_scale)
        return out if row_scale is None else out * row_scale

    def PTu(u):
        out = _vecmat(u if row_scale is None else u * row_scale, P)
        return out if col_scale is None else out * col_scale

    r = P.sum(-1) if row_scale is None and col_scale is None else Pv(torch.ones_like(b))
    c = P.sum(-2) if row_scale is None and col_scale is None else PTu(torch.ones_like(a))
    mr, mc = ((a > 0) & (r > 0)).to(P.dtype), ((b > 0) & (c > 0)).to(P.dtype)
    inv_r = torch.where(mr > 0, 1.0 / r.clamp_min(torch.finfo(P.dtype).tiny), 0.0)
    bx, by = eps * rhs_f * mr, eps * rhs_g * mc
    proj = ((bx.sum(-1) - by.sum(-1)) / (mr.sum(-1) + mc.sum(-1)).clamp_min(1.0)).unsqueeze(-1)
    bx, by = bx - proj * mr, by + proj * mc

    def schur(y):
        return (c * y - PTu(Pv(y) * inv_r)) * mc

    inv_c = torch.where(mc > 0, 1.0 / c.clamp_min(torch.finfo(P.dtype).tiny), 0.0)
    lam_g = pcg(schur, (by - PTu(bx * inv_r)) * mc, inv_c, rtol=tol, max_iter=2 * m + 20).x
    return (bx - Pv(lam_g)) * inv_r, lam_g


class _LogitFixedPoint(torch.autograd.Function):
    r"""Identity on the potentials ``(f, g)`` in forward; backward differentiates the
    fixed point of the logits' Sinkhorn problem, :math:`P_{ij} = a_i b_j
    e^{L_{ij} + (f_i + g_j)/\varepsilon}` (:class:`~entrokit.geometry.LogitCost` at its own
    temperature), by the implicit function theorem: :math:`J\lambda = (\bar f, \bar g)`
    (:func:`_plan_adjoint`), then the residual :math:`H = (P1 - a, P^\top 1 - b)` pulled back
    in closed form, :math:`\bar L = -P \odot (\lambda_f 1^\top + 1 \lambda_g^\top)`
    (:math:`\partial H / \partial L_{ij} = P_{ij}` on row :math:`i` and column :math:`j`).
    The same gradient as :func:`~entrokit.solvers.implicit.implicit_fixed_point` with the
    entropic residual, with the plan formed once and no autograd graph in backward."""

    @staticmethod
    def forward(ctx, f, g, L, a, b, eps):
        ctx.eps = eps
        ctx.save_for_backward(f, g, L, a, b)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, gf, gg):
        f, g, L, a, b = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None, None
        eps = ctx.eps
        with torch.no_grad():
            gf = torch.zeros_like(f) if gf is None else gf
            gg = torch.zeros_like(g) if gg is None else gg
            P = LogitCost(L, eps).plan(f, g, a, b, eps)
            lam_f, lam_g = _plan_adjoint(P, a, b, eps, gf, gg)
            gL = P.mul_(lam_f.unsqueeze(-1) + lam_g.unsqueeze(-2)).neg_()
        return None, None, gL, None, None, None


def run_sinkhorn(
    geom: LogitCost,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    *,
    n_loop: int,
    tol: float | None,
    max_iter: int,
    grad: str,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    who: str = "sinkhorn",
):
    """``(f, g, errors)`` after ``n_loop`` iterations of the library's Sinkhorn loop (or
    until ``tol``), carrying unrolled or implicit gradients. ``errors`` is the L1
    row-marginal error after each check (detached)."""
    if tol is None and n_loop == 0:
        if init is None:
            f, g = torch.zeros_like(a), torch.zeros_like(b)
        else:
            f, g = init
        errors = torch.zeros(0, a.shape[0], dtype=a.dtype, device=a.device)
    else:
        if tol is None:
            opts = SinkhornOptions(fixed_iter=True, max_iter=n_loop, eps_scaling=False, lse_mode=True)
        else:
            opts = SinkhornOptions(tol=tol, max_iter=max_iter, eps_scaling=False, lse_mode=True)
        f, g, _, converged, errors, _ = sinkhorn_problem(
            OTProblem(a, b, geom), eps, opts, init=init, unroll=grad == "unroll"
        )
        if tol is not None and len(errors):
            warn_not_converged(
                converged, errors[-1], tol, who,
                f"Raise max_iter (now {max_iter}), loosen tol, or raise eps (the temperature).",
            )
    return f, g, errors


def attach_implicit(geom: LogitCost, f, g, a, b, eps):
    """``(f, g)`` carrying implicit-differentiation gradients to the logits (identity in
    forward); a no-op when nothing needs a gradient."""
    if not (torch.is_grad_enabled() and geom.L.requires_grad):
        return f, g
    if a.requires_grad or b.requires_grad or geom.eps0 != eps:  # the general form (weights differentiated)
        return implicit_fixed_point(
            geom, f.detach(), g.detach(), a, b, residual=entropic_residual(eps),
            adjoint=lambda geom, f, g, a, b, rf, rg: _plan_adjoint(geom.plan(f, g, a, b, eps), a, b, eps, rf, rg),
        )
    return _LogitFixedPoint.apply(f.detach(), g.detach(), geom.L, a, b, eps)


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------
class LayerOptions(NamedTuple):
    """The validated options of the Sinkhorn layers (:func:`check_options`)."""

    n_iter: int
    tol: float | None
    max_iter: int
    grad: str
    eps: float
    dropout_p: float


def check_options(n_iter, tol, max_iter, grad, eps, dropout_p=0.0) -> LayerOptions:
    """Validate the layer options; returns them normalised."""
    n_iter = check_positive_int(n_iter, "n_iter")
    if tol is not None:
        tol = check_positive(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter")
    if grad not in GRAD_MODES:
        raise InputError(f"grad must be one of 'unroll', 'implicit'; got {grad!r}.")
    eps = check_positive(eps, "eps")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not (0.0 <= dropout_p < 1.0):
        raise InputError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}; e.g. dropout_p=0.1.")
    return LayerOptions(n_iter, tol, max_iter, grad, eps, float(dropout_p))


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}; convert it with {name}.float().")


def _check_qkv(query, key, value):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise InputError(
            "query, key and value must have shapes (N, ..., T, E), (N, ..., S, E) and (N, ..., S, Ev) "
            f"with the same rank >= 3 (e.g. (batch, heads, tokens, head_dim)); got {tuple(query.shape)}, "
            f"{tuple(key.shape)} and {tuple(value.shape)}. Add a batch axis with x.unsqueeze(0)."
        )
    if query.shape[-1] != key.shape[-1]:
        raise InputError(
            f"query and key must share the embedding size E (last axis); got {query.shape[-1]} and "
            f"{key.shape[-1]}."
        )
    if key.shape[-2] != value.shape[-2]:
        raise InputError(
            f"key and value must hold the same number of keys S (axis -2); got {key.shape[-2]} and "
            f"{value.shape[-2]}."
        )
    if not (query.shape[:-2] == key.shape[:-2] == value.shape[:-2]):
        raise InputError(
            f"query, key and value must share their batch axes; got {tuple(query.shape[:-2])}, "
            f"{tuple(key.shape[:-2])} and {tuple(value.shape[:-2])}. Expand them explicitly, "
            "e.g. key.expand(*query.shape[:-2], -1, -1)."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise InputError(
            f"query, key and value must share one dtype; got {query.dtype}, {key.dtype} and {value.dtype}."
        )
    if not (query.device == key.device == value.device):
        raise InputError(
            f"query, key and value must be on one device; got {query.device}, {key.device} and {value.device}."
        )


def _check_mask(mask, name: str, target: tuple[int, ...], how: str):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}.")
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise InputError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {target}; {how}")


def _check_scale(scale, E: int) -> float:
    """The score scale, ``1/sqrt(E)`` by default."""
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise InputError(f"scale must be a finite number or None (1/sqrt(E)), got {scale!r}.")
    return float(scale)


def _check_masks(attn_mask, key_padding_mask, is_causal, target: tuple[int, ...]) -> None:
    if is_causal and attn_mask is not None:
        raise InputError("pass either attn_mask or is_causal=True, not both; fold the causal mask into attn_mask.")
    if attn_mask is not None:
        _check_mask(attn_mask, "attn_mask", target, "expected a mask broadcastable to (N, ..., T, S).")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}.")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}.")
        N, S = target[0], target[-1]
        if tuple(key_padding_mask.shape) != (N, S):
            raise InputError(
                f"key_padding_mask must have shape (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}."
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be bool (True = padded key), got {key_padding_mask.dtype}; "
                "convert with mask.bool()."
            )


def _no_flag(name: str, value, instead: str) -> None:
    """A former flag that selected ``(output, weights)``: a flag never changes the return
    type, so ``True`` is an error that names the call to use."""
    if value:
        raise InputError(f"{name}=True is no longer supported: a flag never changes the return type. {instead}")


# --------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------
def sinkhorn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    n_iter: int = 3,
    eps: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    grad: str = "unroll",
    return_weights: bool = False,
) -> torch.Tensor:
    r"""Sinkformer attention, a drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: ``(N, ..., T, E)``.
        key: ``(N, ..., S, E)``.
        value: ``(N, ..., S, Ev)``.
        attn_mask: bool (``True`` = may attend, as in SDPA) or float (added to the
            scores; ``-inf`` forbids), broadcastable to ``(N, ..., T, S)``.
        dropout_p: dropout on the attention weights (applied whenever > 0, as in SDPA).
        is_causal: lower-triangular mask (query ``i`` attends to keys ``j <= i``); not
            together with ``attn_mask``.
        scale: score scale, default :math:`1/\sqrt E`.
        key_padding_mask: bool ``(N, S)``, ``True`` marks a padded key (the
            :class:`torch.nn.MultiheadAttention` convention). Padded keys get no mass
            and the column marginals are uniform over the other keys.
        n_iter: number of normalisations (rows, columns, rows, ...); ``1`` is softmax.
            Ignored when ``tol`` is given.
        eps: temperature :math:`\varepsilon` (Sinkformer: 1); the kernel is
            :math:`e^{s/\varepsilon}`.
        tol: iterate until the L1 marginal error of the normalised plan is ``<= tol``.
        max_iter: loop iterations allowed with ``tol`` (each a row and a column update).
        grad: ``"unroll"`` or ``"implicit"`` (module docstring).
        return_weights: a former flag; a flag never changes the return type, so only
            ``False`` is accepted (``True`` raises :class:`~entrokit.InputError`): call
            :func:`sinkhorn_attention_with_weights` for ``(output, weights)``.

    Returns:
        The output ``(N, ..., T, Ev)``. Empty sequences follow
        :func:`~torch.nn.functional.scaled_dot_product_attention`: ``T = 0`` (or an empty
        batch) gives an empty output, ``S = 0`` (no key) gives zeros.

    Raises:
        InputError: mismatched shapes, masks that do not broadcast, bad options. The values
            of ``query``, ``key`` and ``value`` are not checked (no device sync): a NaN or
            inf entry propagates into the output, as in
            :func:`~torch.nn.functional.scaled_dot_product_attention`.
        TypeError: non-tensor or non-floating inputs.

    Example:
        >>> import torch
        >>> from entrokit.nn.attention import sinkhorn_attention
        >>> q, k, v = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> sinkhorn_attention(q, k, v, n_iter=5).shape
        torch.Size([2, 5, 4])
    """
    _no_flag("return_weights", return_weights, "Call sinkhorn_attention_with_weights(...) for (output, weights).")
    opts = check_options(n_iter, tol, max_iter, grad, eps, dropout_p)
    return _attention(query, key, value, attn_mask, key_padding_mask, is_causal, scale, opts, False)


def sinkhorn_attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    n_iter: int = 3,
    eps: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    grad: str = "unroll",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(output, weights)``: :func:`sinkhorn_attention` and its attention weights
    ``(N, ..., T, S)`` before dropout (rows of weight-0 queries are zero). Arguments,
    errors and empty inputs as in :func:`sinkhorn_attention` (``return_weights`` excepted).

    Example:
        >>> import torch
        >>> from entrokit.nn.attention import sinkhorn_attention_with_weights
        >>> q, k, v = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> out, P = sinkhorn_attention_with_weights(q, k, v, tol=1e-9)
        >>> out.shape, bool(torch.allclose(P.sum(-1), torch.ones(2, 5, dtype=torch.float64)))
        (torch.Size([2, 5, 4]), True)
        >>> bool(torch.allclose(P.sum(-2), torch.ones(2, 5, dtype=torch.float64), atol=1e-6))
        True
    """
    opts = check_options(n_iter, tol, max_iter, grad, eps, dropout_p)
    return _attention(query, key, value, attn_mask, key_padding_mask, is_causal, scale, opts, True)


@no_autocast()
def _attention(query, key, value, attn_mask, key_padding_mask, is_causal, scale, opts: LayerOptions, return_weights):
    """The layer on validated options; ``return_weights`` selects ``(output, weights)``."""
    _check_qkv(query, key, value)
    out_dtype = query.dtype
    if out_dtype in _HALF:
        query, key, value = query.float(), key.float(), value.float()
    *lead, T, E = query.shape
    S = key.shape[-2]
    target = (*lead, T, S)
    scale = _check_scale(scale, E)
    _check_masks(attn_mask, key_padding_mask, is_causal, target)

    if query.numel() == 0 or key.numel() == 0:
        # empty sequences (T = 0 or S = 0) or batch: like F.scaled_dot_product_attention, an
        # empty output, and zeros when there is no key to attend to (connected to the graph)
        P = torch.matmul(query, key.transpose(-2, -1)) * 0.0
        out = torch.matmul(P, value).to(out_dtype)
        return (out, P.to(out_dtype)) if return_weights else out

    L, masked = _logits(query, key, scale, opts.eps, attn_mask, key_padding_mask, is_causal)
    L, a, b, row_live = _live_marginals(L.reshape(-1, T, S), masked)
    out, weights = _attend(L, value.reshape(-1, S, value.shape[-1]), a, b, row_live, opts, plain_softmax=not masked,
                           need_weights=return_weights)
    out = out.reshape(*lead, T, value.shape[-1])
    weights = weights.reshape(target) if return_weights else None
    if row_live is not None:
        live = row_live.reshape(*lead, T, 1).to(out.dtype)
        out = out * live
        weights = weights * live if return_weights else weights
    out = out.to(out_dtype)
    return (out, weights.to(out_dtype)) if return_weights else out


def _logits(query, key, scale, eps, attn_mask, key_padding_mask, is_causal):
    r"""``(L, masked)``: the logits :math:`L = (q k^\top \cdot \mathrm{scale} + \text{float
    mask})/\varepsilon`, ``-inf`` on forbidden pairs, and whether any mask applied."""
    *lead, T, _ = query.shape
    S = key.shape[-2]
    device, dtype = query.device, query.dtype
    L = torch.matmul(query * (scale / eps), key.transpose(-2, -1))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            L = L.masked_fill(~attn_mask.to(device), -math.inf)
        else:
            mask = attn_mask.to(device=device, dtype=dtype)
            L = L + (mask if eps == 1.0 else mask / eps)
    if is_causal:
        L = L.masked_fill(torch.ones(T, S, dtype=torch.bool, device=device).tril().logical_not(), -math.inf)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device).reshape(lead[0], *([1] * (len(lead) - 1)), 1, S)
        L = L.masked_fill(pad, -math.inf)
    return L, attn_mask is not None or is_causal or key_padding_mask is not None


def _live_marginals(L, masked: bool):
    """``(L, a, b, row_live)`` for logits ``(B, T, S)``: uniform marginals over the live
    queries and keys (those with an allowed pair); dead rows and columns get weight 0 and
    logit 0 (finite, out of the way), and ``row_live`` is ``None`` without masks."""
    B, T, S = L.shape
    dtype, device = L.dtype, L.device
    if not masked:
        a = torch.full((B, T), 1.0 / T, dtype=dtype, device=device)
        b = torch.full((B, S), 1.0 / S, dtype=dtype, device=device)
        return L, a, b, None
    allowed = L.detach() > -math.inf
    row_live, col_live = allowed.any(-1), allowed.any(-2)
    L = L.masked_fill(~(row_live.unsqueeze(-1) & col_live.unsqueeze(-2)), 0.0)
    n_rows = row_live.sum(-1, keepdim=True).to(dtype)
    n_cols = col_live.sum(-1, keepdim=True).to(dtype)
    empty = n_rows == 0  # nothing may attend: uniform weights on logits 0, output 0
    a = torch.where(empty | row_live, 1.0 / torch.where(empty, float(T), n_rows), 0.0).to(dtype)
    b = torch.where(empty | col_live, 1.0 / torch.where(empty, float(S), n_cols), 0.0).to(dtype)
    return L, a, b, row_live


def _attend(L, value, a, b, row_live, opts: LayerOptions, *, plain_softmax: bool, need_weights: bool):
    r"""``(output, weights)`` for flat logits ``(B, T, S)`` and values ``(B, S, Ev)``; the
    weights are ``None`` unless ``need_weights``. The weights follow ``opts.n_iter``
    normalisations (or ``opts.tol``): on the CPU in the scaling form (:func:`_kernel_scalings`)
    wherever it is exact; otherwise ``k`` iterations of the library's Sinkhorn loop on
    :class:`~entrokit.geometry.LogitCost`, then the closing normalisation in closed form
    (:func:`_closing_weights`), differentiated by autograd (``"unroll"``) or at the fixed
    point (``"implicit"``, :class:`_ImplicitWeights`). Without dropout and without the
    weights, the scaling form returns the output alone (:class:`_ScaledOutput`: the weights
    and their gradient are never formed)."""
    eps, n_iter, tol = opts.eps, opts.n_iter, opts.tol
    rows = tol is not None or n_iter % 2 == 1  # the last normalisation is a row one
    n_loop = (n_iter - 1) // 2 if rows else n_iter // 2
    implicit = opts.grad == "implicit" and torch.is_grad_enabled() and L.requires_grad
    softmax_only = rows and n_loop == 0 and tol is None and plain_softmax and opts.grad == "unroll"
    scaled = None if softmax_only or tol is not None else _kernel_scalings(L, a, b, n_iter)
    if scaled is not None and opts.dropout_p == 0.0 and not need_weights:
        return _ScaledOutput.apply(L, value, scaled, a, b, implicit, rows, eps), None
    if softmax_only:
        P = torch.softmax(L, dim=-1)  # n_iter=1 without masks: softmax attention
    elif scaled is None:
        P = _log_domain_weights(L, a, b, row_live, opts, rows, n_loop, implicit)
    elif implicit:
        P = _ImplicitWeights.apply(L, scaled.weights(scaled.closing(a)), a, b, rows, eps)
    else:
        P = _KernelWeights.apply(L, scaled, a, b)
    weights = P
    if opts.dropout_p > 0.0:
        P = F.dropout(P, p=opts.dropout_p)
    return torch.matmul(P, value), weights


def _log_domain_weights(L, a, b, row_live, opts: LayerOptions, rows: bool, n_loop: int, implicit: bool):
    """The weights from ``n_loop`` iterations of the library's log-domain Sinkhorn loop (or
    ``opts.tol``) and the closing normalisation (:func:`_attend`)."""
    eps = opts.eps
    geom = LogitCost(L, eps)
    f, g, _ = run_sinkhorn(
        geom, a, b, eps, n_loop=n_loop, tol=opts.tol, max_iter=opts.max_iter, grad=opts.grad, who="sinkhorn_attention"
    )
    log_r = None  # after a row normalisation; after a column one, log T_live a_i (0 or -inf)
    if not rows:
        log_r = torch.zeros_like(a) if row_live is None else torch.where(row_live, 0.0, -math.inf).to(L.dtype)
    if implicit:
        with torch.no_grad():
            P = _closing_weights(L, f, g, log_weights(b), log_r, eps)
        return _ImplicitWeights.apply(L, P, a, b, rows, eps)
    return _closing_weights(L, f, g, log_weights(b), log_r, eps)


#: where the scaling form runs: it reads one flag back (its exactness check), free on the
#: host; other devices keep the log-domain loop, which reads nothing back
_SCALING_DEVICES = ("cpu",)

#: log of the smallest kernel entry a live column's largest may be: below it, entries that
#: underflow (e^-87 in float32, e^-708 in float64) could still carry weight 1e-7 (1e-16) of it
_KERNEL_FLOOR = {torch.float32: -70.0, torch.float64: -670.0}


class _Scalings(NamedTuple):
    r"""Sinkhorn-Knopp on the row-normalised kernel :math:`K = \mathrm{softmax}_j(L)`:
    ``steps[t]`` is ``(x, s, y)`` of normalisation ``t`` (rows first): :math:`s = Kx`,
    :math:`y = a/s` on the rows and :math:`s = K^\top x`, :math:`y = b/s` on the columns.
    The weights do not depend on the rows' scale: :math:`\mathrm{diag}(d) e^{L}` for any
    :math:`d > 0` gives the same steps after the first row normalisation, so the softmax's
    :math:`d = e^{-\mathrm{logsumexp}_j L}` is as good as :math:`e^{L}` and cannot overflow."""

    K: torch.Tensor
    steps: list

    def closing(self, a):
        r"""``(R, v, inv_s)``: the index of the last row normalisation, the column scaling
        after the last step, and :math:`1/s_R` (0 on the empty rows when a column
        normalisation closes); the weights are :math:`W = K \odot (1/s_R)\, v^\top`."""
        n = len(self.steps)
        R = n - 1 if n % 2 == 1 else n - 2
        s_R = self.steps[R][1]
        v = self.steps[R][0] if n % 2 == 1 else self.steps[-1][2]
        inv_s = 1.0 / s_R if n % 2 == 1 else torch.where(a > 0, 1.0 / s_R, 0.0)
        return R, v, inv_s

    def weights(self, closing):
        """The weights :math:`W` after the steps, from :meth:`closing`'s output."""
        _, v, inv_s = closing
        return torch.mul(self.K, v.unsqueeze(-2)).mul_(inv_s.unsqueeze(-1))


@torch.no_grad()
def _kernel_scalings(L, a, b, n_steps: int) -> _Scalings | None:
    r"""``n_steps`` alternating normalisations (rows first, from :math:`g = 0`, the library
    loop's start) in the scaling form: one fused softmax pass for the kernel, then one
    mat-vec per normalisation instead of :math:`n\times m` exponentials. ``None`` where the
    kernel is not exact to the dtype: a live column whose largest entry is below
    :math:`e^{\text{floor}}` (:data:`_KERNEL_FLOOR`), or a scaling that over/underflows;
    the log-domain loop then runs. Reads one flag back (the check)."""
    floor = _KERNEL_FLOOR.get(L.dtype)
    if floor is None or n_steps == 0 or L.device.type not in _SCALING_DEVICES:
        return None
    K = torch.softmax(L, dim=-1)  # every row holds a finite logit (dead rows are 0): no NaN
    x, steps = b, []
    live = (a > 0, b > 0)  # the rows and columns of nonzero weight, decided once
    for t in range(n_steps):
        w = a if t % 2 == 0 else b
        s = _matvec(K, x) if t % 2 == 0 else _vecmat(x, K)
        y = torch.where(live[t % 2], w / s, 0.0)
        steps.append((x, s, y))
        x = y
    ok = torch.isfinite(x).all() & torch.isfinite(steps[-1][1]).all()
    if n_steps > 1:  # max_i K_ij >= (K^T u)_j / sum(u): the floor, without a pass over K
        u, sigma = steps[1][0], steps[1][1]
        ok &= ((sigma >= math.exp(floor) * u.sum(-1, keepdim=True)) | (b == 0)).all()
    return _Scalings(K, steps) if bool(ok) else None


def _vecmat(x, M):
    """The row vectors ``x`` ``(B, n)`` times ``M`` ``(B, n, k)``: ``(B, k)`` (one batched GEMM)."""
    return torch.matmul(x.unsqueeze(-2), M).squeeze(-2)


def _matvec(M, x):
    """``M`` ``(B, n, k)`` times the column vectors ``x`` ``(B, k)``: ``(B, n)``, as the row
    vectors :math:`x^\top M^\top` (one batched GEMM that reads ``M`` transposed, no copy).
    The batched GEMM with one column that ``M @ x`` becomes is slow on the CPU (AMD EPYC,
    one thread, B = 32, 128 x 128: 0.61 ms against 0.07 ms; a broadcast product and row sum,
    0.08 ms, allocates an n x k temporary)."""
    return torch.matmul(x.unsqueeze(-2), M.transpose(-2, -1)).squeeze(-2)


class _KernelWeights(torch.autograd.Function):
    r"""The weights after the normalisations of :func:`_kernel_scalings`, with their unrolled
    gradient in closed form. The weights are :math:`W = K \odot (1/s_R)\, v^\top`: ``s_R``
    the row sums of the last row normalisation, ``v`` the last column scaling (1/s_R set to
    0 on empty rows when a column normalisation closes). Backward, with :math:`Q = \bar W
    \odot W`: :math:`\bar L = Q + K \odot \sum_t x_t y_t^\top`, the sum over the steps of
    the rank-one pull-backs of :math:`s = Kx` (one batched matmul), the adjoints
    :math:`\bar s = -\bar y\, y/s` carried back through one mat-vec per step. This is the
    gradient through :math:`K = e^{L}` and also through :math:`K = \mathrm{softmax}_j(L)`:
    the softmax's pull-back subtracts :math:`K_{ij} \sum_k K_{ik} \bar K_{ik}`, and that
    row sum is 0 because the weights do not depend on the rows' scale (:class:`_Scalings`)."""

    @staticmethod
    def forward(ctx, L, scaled: _Scalings, a, b):
        K, steps = scaled.K, scaled.steps
        closing = scaled.closing(a)
        W = scaled.weights(closing)
        R, v, inv_s = closing
        ctx.R = R
        ctx.save_for_backward(W, K, a, b, v, inv_s, *(t for step in steps for t in step))
        return W

    @staticmethod
    @once_differentiable
    def backward(ctx, gW):
        W, K, a, b, v, inv_s, *flat = ctx.saved_tensors
        Q = gW * W
        X, Y = _step_adjoints(flat, ctx.R, K, a, b, -Q.sum(-1) * inv_s, torch.where(v > 0, Q.sum(-2) / v, 0.0))
        return Q.addcmul_(torch.matmul(X, Y), K), None, None, None


def _step_adjoints(flat, R: int, K, a, b, g_sR, g_v):
    r"""The unrolled normalisations' pull-back to the kernel, :math:`\bar K = X Y`: ``flat``
    holds the steps' ``(x, s, y)`` of :class:`_Scalings` in a row, ``g_sR`` and ``g_v`` are
    the adjoints of the last row normalisation's sums and of the last column scaling. Step
    by step backwards, :math:`\bar s = -\bar y\, y/s` is carried back through one mat-vec,
    and :math:`s = Kx` adds the rank-one term :math:`\bar s x^\top` (:math:`x \bar s^\top`
    on the columns) to :math:`\bar K`: ``X`` ``(B, n, steps)``, ``Y`` ``(B, steps, m)``."""
    steps = [flat[i : i + 3] for i in range(0, len(flat), 3)]
    gv, gu = g_v, torch.zeros_like(a)
    rows, cols = a > 0, b > 0
    xs, ys = [], []
    for t in range(len(steps) - 1, -1, -1):
        x, s, y = steps[t]
        if t % 2 == 0:  # rows: s = K x (x the column scaling), y = a / s
            gs = torch.where(rows, -gu * y / s, 0.0)
            if t == R:
                gs = gs + g_sR
            xs.append(gs)
            ys.append(x)
            gv, gu = gv + _vecmat(gs, K), torch.zeros_like(a)
        else:  # columns: s = K^T x (x the row scaling), y = b / s
            gs = torch.where(cols, -gv * y / s, 0.0)
            xs.append(x)
            ys.append(gs)
            gu, gv = gu + _matvec(K, gs), torch.zeros_like(b)
    return torch.stack(xs, -1), torch.stack(ys, -2)


class _ScaledOutput(torch.autograd.Function):
    r"""The layer's output :math:`O = W V` for the scaling form's weights
    :math:`W = \mathrm{diag}(1/s_R)\, K\, \mathrm{diag}(v)` (:meth:`_Scalings.closing`),
    with the unrolled (:class:`_KernelWeights`) or the implicit (:class:`_ImplicitWeights`)
    gradient, and neither :math:`W` nor its gradient :math:`\bar W = \bar O V^\top` formed:
    :math:`O = (1/s_R) \odot K (v \odot V)` in forward, and only :math:`K` is kept.

    Backward: :math:`\bar V = W^\top \bar O = v \odot K^\top (\bar O / s_R)`. The row
    and column sums of :math:`\bar W \odot W` that both gradients start from are
    :math:`\bar O_i \cdot O_i` and :math:`V_j \cdot \bar V_j`. Both logit gradients have
    the form :math:`\bar L = K \odot (A B)` with a thin :math:`A B`, formed by one GEMM:

    * unrolled: :math:`\bar L = \bar W \odot W + K \odot X Y`
      (:func:`_step_adjoints`), so :math:`A = [\bar O / s_R,\ X]`,
      :math:`B = [(v \odot V)^\top;\ Y]`;
    * implicit: :math:`\bar L = W \odot (\bar W - \alpha 1^\top - a \lambda_g^\top)`
      with :math:`\alpha = w + a \odot \lambda_f` (:class:`_ImplicitWeights`), so
      :math:`A = [\bar O,\ -\alpha,\ -a] / s_R` and :math:`B = [(v \odot V)^\top;\ v^\top;
      (v \odot \lambda_g)^\top]`; the adjoint runs on :math:`K` with the scalings applied
      as vectors."""

    @staticmethod
    def forward(ctx, L, value, scaled: _Scalings, a, b, implicit: bool, rows: bool, eps: float):
        K = scaled.K
        R, v, inv_s = scaled.closing(a)
        v_value = value * v.unsqueeze(-1)
        out = torch.matmul(K, v_value).mul_(inv_s.unsqueeze(-1))
        ctx.R, ctx.implicit, ctx.rows, ctx.eps = R, implicit, rows, eps
        steps = () if implicit else scaled.steps
        ctx.save_for_backward(K, v_value, out, a, b, v, inv_s, *(t for step in steps for t in step))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        K, v_value, out, a, b, v, inv_s, *flat = ctx.saved_tensors
        u_out = g_out * inv_s.unsqueeze(-1)
        KTu = torch.matmul(K.transpose(-2, -1), u_out)
        g_value = KTu * v.unsqueeze(-1)
        if not ctx.needs_input_grad[0]:  # the logits are fixed (no query/key gradient)
            return None, g_value, None, None, None, None, None, None
        # of W̄ ⊙ W: V_j · V̄_j = (v_j V_j) · (Kᵀ Ō/s)_j
        row_sums, col_sums = (g_out * out).sum(-1), (v_value * KTu).sum(-1)
        right = v_value.transpose(-2, -1)
        if ctx.implicit:
            eps = ctx.eps
            if ctx.rows:  # softmax's pull-back (see _ImplicitWeights)
                w, gf = row_sums, torch.zeros_like(row_sums)
                gg = (col_sums - _vecmat(row_sums * inv_s, K) * v) / eps
            else:
                w, gf, gg = torch.zeros_like(row_sums), row_sums / eps, col_sums / eps
            lam_f, lam_g = _plan_adjoint(K, a, b, eps, gf, gg, row_scale=a * inv_s, col_scale=v)
            left = torch.cat([u_out, (-(w + a * lam_f) * inv_s).unsqueeze(-1), (-a * inv_s).unsqueeze(-1)], -1)
            right = torch.cat([right, v.unsqueeze(-2), (v * lam_g).unsqueeze(-2)], -2)
        else:
            g_sR = -row_sums * inv_s
            X, Y = _step_adjoints(flat, ctx.R, K, a, b, g_sR, torch.where(v > 0, col_sums / v, 0.0))
            left, right = torch.cat([u_out, X], -1), torch.cat([right, Y], -2)
        g_L = torch.matmul(left, right).mul_(K)
        return g_L, g_value, None, None, None, None, None, None


def _closing_weights(L, f, g, log_b, log_r, eps):
    r"""``P = T_\text{live} \cdot`` the plan after the closing normalisation. On the rows
    (``log_r`` is ``None``): :math:`P = \mathrm{softmax}_j(L_{ij} + g_j/\varepsilon + \log b_j)`
    (``f`` is the row update's and is not needed). On the columns: :math:`P_{ij} =
    e^{L_{ij} + f_i/\varepsilon + \log r_i + g_j/\varepsilon + \log b_j}`, where
    :math:`T_\text{live} a_i = r_i \in \{0, 1\}`."""
    col = (g / eps + log_b).unsqueeze(-2)
    if log_r is None:
        return torch.softmax(L + col, dim=-1)
    return torch.exp(L + (f / eps + log_r).unsqueeze(-1) + col)


class _ImplicitWeights(torch.autograd.Function):
    r"""The closing weights :math:`P` (:func:`_closing_weights`) with the gradient of the
    converged layer. Backward: the direct part with the potentials held fixed,
    :math:`\bar Z` (softmax's or exp's pull-back), gives :math:`\bar f = \bar Z 1/\varepsilon`
    (0 after a row normalisation: :math:`f` does not enter the softmax) and
    :math:`\bar g = \bar Z^\top 1/\varepsilon`; the potentials' dependence on the logits
    follows from the implicit function theorem on the plan :math:`\pi = \mathrm{diag}(a) P`,
    :math:`J\lambda = (\bar f, \bar g)` (:func:`_plan_adjoint`), pulled back in closed
    form, :math:`\bar L = \bar Z - \pi \odot (\lambda_f 1^\top + 1 \lambda_g^\top)`
    (as :class:`_LogitFixedPoint`). Only :math:`P` is saved (it is the output), the plan
    is not formed again, and backward allocates one :math:`n\times m` buffer at a time:
    with :math:`s = (P \odot \bar P)1`, :math:`\bar Z = P \odot (\bar P - s 1^\top)` after
    a row normalisation and :math:`P \odot \bar P` after a column one, so
    :math:`\bar L = P \odot (\bar P - w 1^\top - a \odot \lambda_f 1^\top - a\lambda_g^\top)`
    with :math:`w = s` or 0. ``P`` is computed by the caller without a graph (the closing
    weights of the log-domain loop, or the scaling form's :math:`W`, equal to rounding);
    ``rows`` says whether a row normalisation closed."""

    @staticmethod
    def forward(ctx, L, P, a, b, rows: bool, eps):
        ctx.eps, ctx.rows = eps, rows
        ctx.save_for_backward(P, a, b)
        return P

    @staticmethod
    @once_differentiable
    def backward(ctx, gP):
        P, a, b = ctx.saved_tensors
        eps = ctx.eps
        Q = P * gP
        s, col = Q.sum(-1), Q.sum(-2)
        del Q
        if ctx.rows:  # softmax's pull-back: Z̄ = P ⊙ (P̄ - s 1ᵀ)
            w, gf = s, torch.zeros_like(s)
            gg = (col - torch.matmul(s.unsqueeze(-2), P).squeeze(-2)) / eps
        else:  # exp's pull-back: Z̄ = P ⊙ P̄
            w, gf, gg = torch.zeros_like(s), s / eps, col / eps
        lam_f, lam_g = _plan_adjoint(P, a, b, eps, gf, gg, row_scale=a)
        gL = gP - (w + a * lam_f).unsqueeze(-1)
        gL.addcmul_(a.unsqueeze(-1), lam_g.unsqueeze(-2), value=-1.0)
        return gL.mul_(P), None, None, None, None, None


class SinkhornAttention(torch.nn.Module):
    """Module form of :func:`sinkhorn_attention` (no projections: it maps
    ``(query, key, value)`` to the attended values, like
    :func:`~torch.nn.functional.scaled_dot_product_attention`).

    Args:
        n_iter: normalisations (rows, columns, rows, ...), Sinkformer's count; 1 is softmax.
        tol: iterate to this L1 marginal error instead (``n_iter`` is then ignored).
        grad: ``"unroll"`` (autograd through the iterations) or ``"implicit"``
            (implicit differentiation at the fixed point; memory independent of
            ``n_iter``).
        eps: temperature (Sinkformer: 1).
        dropout_p: dropout on the attention weights, in training mode only.
        max_iter: loop iterations allowed with ``tol``.

    Example:
        >>> import torch
        >>> from entrokit.nn.attention import SinkhornAttention
        >>> attn = SinkhornAttention(n_iter=3)
        >>> x = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(0))
        >>> attn(x, x, x).shape
        torch.Size([2, 4, 16, 8])
    """

    def __init__(
        self,
        n_iter: int = 3,
        tol: float | None = None,
        grad: str = "unroll",
        eps: float = 1.0,
        dropout_p: float = 0.0,
        max_iter: int = 1000,
    ):
        super().__init__()
        self.n_iter, self.tol, self.max_iter, self.grad, self.eps, self.dropout_p = check_options(
            n_iter, tol, max_iter, grad, eps, dropout_p
        )

    def extra_repr(self) -> str:
        it = f"tol={self.tol:g}, max_iter={self.max_iter}" if self.tol is not None else f"n_iter={self.n_iter}"
        return f"{it}, grad={self.grad!r}, eps={self.eps:g}, dropout_p={self.dropout_p:g}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """The attended values ``(N, ..., T, Ev)``, always a tensor (arguments as in
        :func:`sinkhorn_attention`). For the attention weights too, call
        :meth:`forward_with_weights`.

        ``need_weights`` is a former flag: a flag never changes the return type, so only
        ``False`` is accepted (``True`` raises :class:`~entrokit.InputError`).
        """
        _no_flag("need_weights", need_weights, "Call attn.forward_with_weights(q, k, v) for (output, weights).")
        return self._attend(query, key, value, attn_mask, key_padding_mask, is_causal, scale, False)

    def forward_with_weights(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, weights)``: the attended values and the attention weights
        ``(N, ..., T, S)`` before dropout (:func:`sinkhorn_attention_with_weights`); the
        arguments of :meth:`forward` (``need_weights`` excepted). Module hooks run only
        around :meth:`forward`."""
        return self._attend(query, key, value, attn_mask, key_padding_mask, is_causal, scale, True)

    def _attend(self, query, key, value, attn_mask, key_padding_mask, is_causal, scale, return_weights):
        # the options were validated at construction
        opts = LayerOptions(self.n_iter, self.tol, self.max_iter, self.grad, self.eps,
                            self.dropout_p if self.training else 0.0)
        return _attention(query, key, value, attn_mask, key_padding_mask, is_causal, scale, opts, return_weights)

