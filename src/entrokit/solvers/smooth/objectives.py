r"""Objectives of smooth and sparsity-constrained OT on the internal layout.

``L[b, j, i]`` is the cost of (row ``i``, constrained column ``j``); ``alpha`` (B, R) are the
row potentials and ``beta`` (B, K) the column potentials (Blondel, Seguy & Rolet 2018,
eqs. (5)-(6)). Every function returns quantities of the *minimised* objective (``-S`` or
``-D``) or the concave objective itself, as its docstring says.
"""

from __future__ import annotations

import torch

from entrokit.solvers.omega import Regularizer
from entrokit.solvers.omega import simplex_projection_sorted as _simplex_sorted


def _semi_dual(reg: Regularizer, alpha, a, b, L, state=None):
    """S(alpha), grad of -S, plan (B, K, R) and column multipliers beta (B, K)."""
    X = alpha.unsqueeze(-2) - L  # column j: alpha - c_j
    val, T, beta = reg.max_omega(X, b, state)
    obj = (alpha * a).sum(-1) - val.sum(-1)
    grad = T.sum(-2) - a  # gradient of -S
    return obj, grad, T, beta


def _dual(reg: Regularizer, alpha, beta, a, b, L):
    """D(alpha, beta), grads of -D and plan (B, K, R)."""
    X = alpha.unsqueeze(-2) + beta.unsqueeze(-1) - L
    val, T = reg.delta(X)
    obj = (alpha * a).sum(-1) + (beta * b).sum(-1) - val.sum(-1)
    return obj, T.sum(-2) - a, T.sum(-1) - b, T


def _l1(x):
    return x.abs().sum(-1)


def _topk_semi_dual_compact(gamma, k, alpha, a, b, L, buf=None):
    r"""-S, its gradient and the k-sparse plan in compact form for ``reg="topk"``.

    Same quantities as :func:`_semi_dual` but in O(km) memory after one pass over ``L``:
    column j keeps only :math:`\mathrm{top}_k(\alpha - c_j)` (values ``V``, rows ``I``),
    :math:`t_j = b_j\,\mathrm{Proj}_\Delta(V_j/(\gamma b_j))` on those rows and
    :math:`\max_k = b_j\langle p, V_j\rangle - \frac{\gamma b_j^2}2\|p\|^2`.
    Returns ``(F, grad, (t, I))`` with ``t`` and ``I`` of shape ``(B, K, k)``; ``buf``
    (like ``L``) is reused as scratch."""
    X = torch.sub(alpha.unsqueeze(-2), L, out=buf)
    V, I = torch.topk(X, min(k, X.shape[-1]), dim=-1, sorted=True)
    pos = b > 0
    bs = torch.where(pos, b, torch.ones_like(b)).unsqueeze(-1)
    p, _, _ = _simplex_sorted(V / (gamma * bs))
    p = p * pos.unsqueeze(-1)
    t = bs * p
    val = (t * V).sum(-1) - 0.5 * gamma * (t * t).sum(-1)
    rows = torch.zeros_like(alpha).scatter_add_(-1, I.reshape(I.shape[0], -1), t.reshape(t.shape[0], -1))
    F = val.sum(-1) - (alpha * a).sum(-1)
    return F, rows - a, (t, I)


def _topk_dual_compact(gamma, k, x, a, b, L, buf=None):
    r"""-D, its gradient and the compact k-sparse plan for ``reg="topk"`` (dual):
    :math:`\delta_k(s) = \frac1{2\gamma}\sum_{\mathrm{top}_k(s)}[s_i]_+^2`, plan entries
    :math:`[s_i]_+/\gamma` on the top-k rows of each column."""
    R = a.shape[-1]
    al, be = x[:, :R], x[:, R:]
    X = torch.sub(al.unsqueeze(-2), L, out=buf).add_(be.unsqueeze(-1))
    V, I = torch.topk(X, min(k, X.shape[-1]), dim=-1, sorted=False)
    t = V.clamp_min(0.0) / gamma
    val = 0.5 * gamma * (t * t).sum((-2, -1))
    rows = torch.zeros_like(al).scatter_add_(-1, I.reshape(I.shape[0], -1), t.reshape(t.shape[0], -1))
    F = val - (al * a).sum(-1) - (be * b).sum(-1)
    return F, torch.cat([rows - a, t.sum(-1) - b], -1), (t, I)


def _compact_to_dense(t, I, R):
    """Dense internal plan (B, K, R) from the compact (values, row indices) form."""
    return torch.zeros(*t.shape[:-1], R, dtype=t.dtype, device=t.device).scatter_(-1, I, t)


def _l2_dual_fused(x, a, b, L, gamma, out=None):
    """-D, its gradient and gamma * plan for the quadratic dual in few passes over L:
    X = beta 1^T + 1 alpha^T - L as one rank-2 update (into ``out`` when given), an
    in-place clamp, and BLAS reductions (dot and two mat-vecs)."""
    R = a.shape[-1]
    al, be = x[:, :R], x[:, R:]
    M1 = torch.stack([be, torch.ones_like(be)], -1)  # (B, K, 2)
    M2 = torch.stack([torch.ones_like(al), al], -2)  # (B, 2, R)
    P = torch.baddbmm(L, M1, M2, beta=-1.0, out=out).clamp_(min=0.0)  # gamma T
    flat = P.reshape(P.shape[0], 1, -1)
    val = torch.bmm(flat, flat.transpose(1, 2)).reshape(-1) / (2 * gamma)
    ga = torch.bmm(torch.ones_like(be).unsqueeze(1), P).squeeze(1) / gamma - a
    gb = torch.bmm(P, torch.ones_like(al).unsqueeze(-1)).squeeze(-1) / gamma - b
    F = val - (al * a).sum(-1) - (be * b).sum(-1)
    return F, torch.cat([ga, gb], -1), P


def _envelope_value(reg, formulation, alpha, beta, ar, bc, L):
    """Dual objective at frozen potentials, differentiable in (a, b, C) (Danskin)."""
    if formulation == "semi_dual":
        obj, _, _, _ = _semi_dual(reg, alpha, ar, bc, L)
        return obj
    beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
    obj, _, _, _ = _dual(reg, alpha, beta, ar, bc, L)
    return obj
