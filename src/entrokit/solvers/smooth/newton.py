r"""Globalised, regularised semismooth Newton on the semi-dual and on the dual.

Both minimise the negated concave objective (:mod:`~entrokit.solvers.smooth.objectives`)
with steps :math:`(H + \mu I)\,d = -\nabla`, :math:`H` the generalised Hessian and
:math:`\mu \propto \min(\|\nabla\|, 1)/\gamma`, followed by the shared Armijo line search
(:func:`~entrokit.solvers._numerics.armijo_backtracking`). The semi-dual system is solved by
:func:`~entrokit.solvers._numerics.pcg`; the dual one, a shifted bipartite system, by
:func:`~entrokit.solvers._numerics.solve_bipartite`.
"""

from __future__ import annotations

import torch

from entrokit.solvers._numerics import (
    DenseBlock,
    SparseBlock,
    armijo_backtracking,
    pcg,
    solve_bipartite,
)
from entrokit.solvers.omega import Regularizer
from entrokit.solvers.smooth.objectives import _dual, _l1, _l2_dual_fused, _semi_dual

MU_FACTOR = 0.1  # dual Hessian shift mu = MU_FACTOR * min(|grad|, 1) / gamma


def semi_dual_hessian(reg: Regularizer, T, b):
    """Generalised Hessian of -S at the plan T (B, K, R): returns (matvec, diagonal)."""
    gamma = reg.gamma
    Bsz, K, R = T.shape
    if reg.sparse:
        # w_j = support indicator, sigma_j = support size (Liu et al. 2023, Sec. 3.3)
        nz = (T > 0).nonzero()  # (nnz, 3): batch, column, row
        bi, cj, ri = nz[:, 0], nz[:, 1], nz[:, 2]
        col = bi * K + cj
        row = bi * R + ri
        cnt = torch.zeros(Bsz * K, dtype=T.dtype, device=T.device).index_add_(
            0, col, torch.ones_like(col, dtype=T.dtype)
        )
        inv_cnt = torch.where(cnt > 0, 1.0 / cnt.clamp_min(1.0), torch.zeros_like(cnt))
        diag = torch.zeros(Bsz * R, dtype=T.dtype, device=T.device).index_add_(
            0, row, torch.ones_like(row, dtype=T.dtype)
        ) / gamma

        def mv(v):
            vf = v.reshape(-1)
            cs = torch.zeros(Bsz * K, dtype=v.dtype, device=v.device).index_add_(0, col, vf[row]) * inv_cnt
            back = torch.zeros_like(vf).index_add_(0, row, cs[col])
            return (diag * vf - back / gamma).reshape(Bsz, R)

        return mv, diag.reshape(Bsz, R)
    # entropic: w_j = t_j, sigma_j = b_j
    inv_b = torch.where(b > 0, 1.0 / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(b))
    diag_full = T.sum(-2) / gamma
    W = T

    def mv_dense(v):
        cs = torch.bmm(W, v.unsqueeze(-1)).squeeze(-1) * inv_b  # (B, K)
        back = torch.bmm(cs.unsqueeze(-2), W).squeeze(-2)
        return diag_full * v - back / gamma

    return mv_dense, diag_full  # the rank-one parts' diagonal is left out of the preconditioner


def _newton_loop(evaluate, direction, x, tol, max_iter, moved=None):
    """The globalised loop both solvers share: from ``x`` (B, N), ``evaluate(x, trial)``
    gives ``(F, grad, plan)`` of the minimised objective, ``direction(plan, grad, active)``
    gives ``(d, cg_iterations)``; each step is the shared Armijo search along ``d``. A
    problem stops once its L1 gradient (the marginal error) is ``<= tol`` or its search
    fails. ``moved(bool)`` is told after each search whether a trial point was accepted.
    Returns ``(x, n_iter, converged, errors, info)``."""
    fine = 8 * torch.finfo(x.dtype).eps
    F, g, T = evaluate(x, False)
    err = _l1(g)
    errs = [err]
    n_iter = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    active = err > tol
    cg_total = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d, cg_it = direction(T, g, active)
        cg_total += cg_it

        def trial(t, x=x, d=d):
            x_t = x + t.unsqueeze(-1) * d
            F_t, g_t, T_t = evaluate(x_t, True)
            return F_t, (x_t, g_t, T_t)

        search = armijo_backtracking(trial, F, (g * d).sum(-1), (x, g, T), active, rel_slack=fine)
        if moved is not None:
            moved(search.state[2] is not T)
        F, (x, g, T) = search.value, search.state
        err = _l1(g)
        n_iter += active.long()
        errs.append(err)
        active = active & (err > tol) & search.accepted
    return x, n_iter, err <= tol, torch.stack(errs, 0), {"cg_iterations": cg_total}


def newton_semi_dual(reg, alpha, a, b, L, tol, max_iter, state):
    """Semismooth Newton on -S from ``alpha`` (B, R); returns ``(alpha, n_iter, converged,
    errors, info)``."""

    def evaluate(alpha, trial):
        obj, g, T, _ = _semi_dual(reg, alpha, a, b, L, state)
        return -obj, g, T

    def direction(T, g, active):
        mv, diag = semi_dual_hessian(reg, T, b)
        gnorm = g.norm(dim=-1, keepdim=True)
        # regularised semismooth Newton shift, in Hessian units (1/gamma)
        mu = (gnorm.clamp_max(1.0) / reg.gamma).clamp_min(1e-10 / reg.gamma)
        rtol = float(min(0.1, max(float(gnorm.max()) ** 0.5, 1e-6)))
        cg = pcg(lambda v: mv(v) + mu * v, -g, 1.0 / (diag + mu), rtol=rtol, max_iter=500, active=active)
        return cg.x, int(cg.n_iter.max())

    return _newton_loop(evaluate, direction, alpha, tol, max_iter)


def dual_newton_step(reg: Regularizer, T: torch.Tensor, g: torch.Tensor, mu: torch.Tensor, method: str = "auto",
                     rtol: float = 1e-8, active: torch.Tensor | None = None):
    r"""Newton direction :math:`(H + \mu I)^{-1}(-g)` of the dual at the plan ``T`` (B, K, R).

    With :math:`W_{ij}` the active set :math:`1\{t_{ji} > 0\}` (quadratic, top-k; sparse,
    ~n+m entries) or the plan :math:`t_{ji}` itself (entropy), the generalised Hessian of
    :math:`-D` in the variables :math:`(\alpha, \beta)` is

    .. math::

        H = \frac1\gamma\begin{pmatrix}\mathrm{diag}(W\mathbf 1) & W\\ W^\top &
            \mathrm{diag}(W^\top\mathbf 1)\end{pmatrix},

    a bipartite system solved by :func:`~entrokit.solvers._numerics.solve_bipartite`
    (``method``). Returns ``(d, cg_iterations)``.
    """
    Bsz, K, R = T.shape
    inv_gamma = 1.0 / reg.gamma
    if reg.sparse:
        batch, col, row = (T > 0).nonzero(as_tuple=True)
        vals = torch.full(batch.shape, inv_gamma, dtype=g.dtype, device=g.device)
        block = SparseBlock(batch, row, col, vals, (Bsz, R, K))
        row_diag = torch.zeros(Bsz * R, dtype=g.dtype, device=g.device).index_add_(0, batch * R + row, vals)
        col_diag = torch.zeros(Bsz * K, dtype=g.dtype, device=g.device).index_add_(0, batch * K + col, vals)
        row_diag, col_diag = row_diag.reshape(Bsz, R), col_diag.reshape(Bsz, K)
    else:
        W = T.mT * inv_gamma  # (B, R, K)
        block = DenseBlock(W)
        row_diag, col_diag = W.sum(-1), W.sum(-2)
    dx, dy, n_iter, _ = solve_bipartite(
        block, row_diag, col_diag, mu.reshape(-1), -g[:, :R], -g[:, R:], method=method, rtol=rtol,
        max_iter=1000, active=active,
    )
    return torch.cat([dx, dy], -1), int(n_iter.max())


def newton_dual(reg, x, a, b, L, tol, max_iter):
    """Globalised regularised semismooth Newton on -D from ``x = (alpha, beta)`` (Hessian
    shift mu ~ |grad|); returns ``(x, n_iter, converged, errors, info)``."""
    Bsz, K, R = L.shape

    # two scratch plans (current / trial) reused across iterations, single problems only
    buffers = [torch.empty_like(L), torch.empty_like(L)] if (reg.name == "l2" and Bsz == 1) else None
    slot = [0]

    def evaluate(x, trial=False):
        if reg.name == "l2":
            out = None if buffers is None else buffers[slot[0] ^ int(trial)]
            return _l2_dual_fused(x, a, b, L, reg.gamma, out=out)
        obj, grad_alpha, grad_beta, T = _dual(reg, x[:, :R], x[:, R:], a, b, L)
        return -obj, torch.cat([grad_alpha, grad_beta], -1), T

    def direction(T, g, active):
        gnorm = g.norm(dim=-1, keepdim=True)
        mu = (MU_FACTOR * gnorm.clamp_max(1.0) / reg.gamma).clamp_min(1e-12 / reg.gamma)
        rtol = float(min(0.1, max(float(gnorm.max()) ** 0.5, 1e-8)))
        return dual_newton_step(reg, T, g, mu, rtol=rtol, active=active)

    def moved(accepted_trial):
        if buffers is not None and accepted_trial:
            slot[0] ^= 1  # the trial buffer now holds the current plan

    return _newton_loop(evaluate, direction, x, tol, max_iter, moved)
