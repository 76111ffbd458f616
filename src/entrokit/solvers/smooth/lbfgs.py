r"""Batched L-BFGS in compact form (minimisation) with the shared Armijo line search."""

from __future__ import annotations

import torch

from entrokit.solvers._numerics import armijo_backtracking


def lbfgs_direction(g, mem):
    r"""-H g for the L-BFGS inverse Hessian in compact form (Byrd, Nocedal & Schnabel
    1994, Thm 2.2): :math:`H = \theta I + [S\ \theta Y]\begin{pmatrix}R^{-\top}(D +
    \theta Y^\top Y)R^{-1} & -R^{-\top}\\ -R^{-1} & 0\end{pmatrix}[S\ \theta Y]^\top`,
    with :math:`R` the upper triangle of :math:`S^\top Y`, :math:`D` its diagonal and
    :math:`\theta = s^\top y / y^\top y` of the newest pair. A constant number of
    batched operations per iteration, whatever the history length."""
    if mem is None:
        return -g
    Z, R, D, YY, theta = mem
    h = R.shape[-1]
    w = torch.bmm(Z, g.unsqueeze(-1))  # (B, 2h, 1): S^T g, Y^T g
    v = torch.linalg.solve_triangular(R, w[:, :h], upper=True)
    rhs = D.unsqueeze(-1) * v + theta * torch.bmm(YY, v) - theta * w[:, h:]
    top = torch.linalg.solve_triangular(R.mT, rhs, upper=False)
    coef = torch.cat([top, -theta * v], 1)
    return -(theta.squeeze(-1) * g + torch.bmm(Z.mT, coef).squeeze(-1))


def lbfgs_memory(S, Y):
    """Compact-form pieces (Z = [S; Y], R, D, Y^T Y, theta) of the stored pairs."""
    Sm, Ym = torch.stack(S, 1), torch.stack(Y, 1)  # (B, h, n)
    SY = torch.bmm(Sm, Ym.mT)
    R = torch.triu(SY)
    D = torch.diagonal(SY, dim1=-2, dim2=-1)
    YY = torch.bmm(Ym, Ym.mT)
    theta = (SY[:, -1, -1] / YY[:, -1, -1]).reshape(-1, 1, 1)
    return torch.cat([Sm, Ym], 1), R, D, YY, theta


def lbfgs(fun, x, tol, max_iter, history=10, patience=None):
    """Minimise a batch of convex functions. ``fun(x) -> (F, g, err)``, all batched; Armijo
    backtracking (:func:`~entrokit.solvers._numerics.armijo_backtracking`) on every step.

    ``patience`` (nonsmooth objectives, e.g. top-k): also stop a problem once its best
    marginal error has not improved by 1% for ``patience`` iterations, and return the
    iterate with the smallest error seen (its plan is the best one the run produced)."""
    B = x.shape[0]
    F, g, err = fun(x)
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    mem = None
    errs = [err]
    n_iter = torch.zeros(B, dtype=torch.long, device=x.device)
    active = err > tol
    fine = 8 * torch.finfo(x.dtype).eps
    flat = torch.zeros(B, dtype=torch.long, device=x.device)  # iterations without progress
    best_x, best_err = x, err
    since_best = torch.zeros(B, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d = lbfgs_direction(g, mem)
        gd = (g * d).sum(-1)
        bad = ~(gd < 0)
        if bool(bad.any()):  # not a descent direction: fall back to steepest descent
            d = torch.where(bad.unsqueeze(-1), -g, d)
            gd = (g * d).sum(-1)
        t = torch.ones_like(F)
        if not S:  # first step: unit step along -g / |g|_inf
            t = 1.0 / g.abs().amax(-1).clamp_min(torch.finfo(x.dtype).tiny)

        def trial(t, x=x, d=d):
            x_t = x + t.unsqueeze(-1) * d
            F_t, g_t, err_t = fun(x_t)
            return F_t, (x_t, g_t, err_t)

        search = armijo_backtracking(trial, F, gd, (x, g, err), active, step=t, rel_slack=fine)
        Fn, (xn, gn, errn) = search.value, search.state
        moved = search.accepted
        s_new, y_new = xn - x, gn - g
        good = moved & ((s_new * y_new).sum(-1) > 1e-300)
        if bool(good.any()):
            # problems without a usable pair (finished, or no curvature) repeat their newest
            # pair, which leaves their BFGS matrix unchanged; before any pair, s = y = e/sqrt(n)
            if S:
                s_old, y_old = S[-1], Y[-1]
            else:
                s_old = y_old = torch.full_like(x, x.shape[-1] ** -0.5)
            S.append(torch.where(good.unsqueeze(-1), s_new, s_old))
            Y.append(torch.where(good.unsqueeze(-1), y_new, y_old))
            if len(S) > history:
                S.pop(0)
                Y.pop(0)
            mem = lbfgs_memory(S, Y)
        # nonsmooth (top-k) optima: stop once the objective has stopped decreasing
        flat = torch.where(Fn < F - 1e-13 * F.abs(), torch.zeros_like(flat), flat + 1)
        stalled = active & (~moved | (flat >= 30))
        x, F, g, err = xn, Fn, gn, errn
        n_iter += active.long()
        errs.append(err)
        if patience is not None:
            better = err < best_err
            best_x = torch.where(better.unsqueeze(-1), x, best_x)
            since_best = torch.where(err < 0.99 * best_err, torch.zeros_like(since_best), since_best + 1)
            best_err = torch.where(better, err, best_err)
            stalled = stalled | (active & (since_best >= patience))
        active = active & (err > tol) & ~stalled
    if patience is not None:
        x, err = best_x, best_err
    return x, n_iter, err <= tol, torch.stack(errs, 0)
