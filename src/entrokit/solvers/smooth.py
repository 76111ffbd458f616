r"""Smooth and sparsity-constrained OT: dual and semi-dual solvers (batched, differentiable).

Solves, for a column regularizer :math:`\Omega` (:mod:`entrokit.solvers.omega`),

.. math::

    \min_{T \ge 0,\ T\mathbf 1 = a,\ T^\top\mathbf 1 = b}\ \langle T, C\rangle + \sum_j \Omega(t_j)

through one of two concave maximisations (Blondel, Seguy & Rolet 2018, eqs. (5)-(6);
Liu, Puigcerver & Blondel 2023, Sec. 3):

* **dual**: :math:`D(\alpha,\beta) = \langle\alpha,a\rangle + \langle\beta,b\rangle -
  \sum_j\delta_\Omega(\alpha + \beta_j\mathbf 1 - c_j)`, plan
  :math:`t_j = \nabla\delta_\Omega(\alpha+\beta_j\mathbf 1-c_j)`, gradient
  :math:`(a - T\mathbf 1,\ b - T^\top\mathbf 1)`;
* **semi-dual**: :math:`S(\alpha) = \langle\alpha,a\rangle - \sum_j\max_\Omega(\alpha - c_j;
  b_j)`, plan :math:`t_j = \nabla\max_\Omega(\alpha - c_j; b_j)`, gradient
  :math:`a - T\mathbf 1`. Column marginals hold exactly by construction.

With ``reg="topk"`` every column (row with ``sparse_axis="rows"``) of the returned plan
has at most ``k`` nonzeros, exactly, whatever the solver state: the plan is always the
gradient of a top-k operator.

**Top-k marginals are not guaranteed.** :math:`\delta_k` and :math:`\max_k` are the
conjugates of the convex envelope :math:`\Omega_k^{**}`, so both concave problems are
duals of the *convexified* primal. Their optimum is generically a kink (the k-th and
(k+1)-th entries of some columns tie), where :math:`0 \in a - \mathrm{conv}\{T\mathbf
1\}` over the k-sparse maximisers :math:`T`, but no single k-sparse gradient need have
:math:`T\mathbf 1 = a`. Example: with ``k = 1`` every column sends all of ``b_j`` to one
row, so the row-marginal error is at least
:math:`\min_{\sigma}\sum_i|a_i - \sum_{j:\sigma(j)=i} b_j| > 0` whenever ``a`` is not a
sum of subsets of ``b`` (tested by brute force). The top-k solver therefore first
solves the quadratic problem (``k = infinity``) by dual Newton: when that plan already has
at most ``k`` nonzeros per column it *is* the top-k optimum and is returned (converged to
``tol``). Otherwise its potentials warm-start L-BFGS on the top-k objective (evaluated in
O(km) memory from one ``torch.topk`` pass over the cost), which stops when its best
marginal error has not improved by 1% for 15 iterations and returns that best iterate,
reporting ``converged=False`` with one ``ConvergenceWarning`` unless the L1 marginal
error really is ``<= tol``; the semi-dual keeps the column marginals exact in all cases. ``k = 1`` is unregularized OT (up to the constant
:math:`\frac\gamma2\sum_j b_j^2` in the value), ``k >= n`` is quadratic OT.

**Solvers.**

* ``"newton"`` (default for ``"l2"`` and ``"entropy"``): globalised, regularised
  semismooth Newton on either formulation. Dual: the generalised Hessian of :math:`-D` is
  :math:`\frac1\gamma\begin{pmatrix}\mathrm{diag}(W\mathbf 1) & W\\ W^\top &
  \mathrm{diag}(W^\top\mathbf 1)\end{pmatrix}` with :math:`W` the active set of the plan
  (sparse) or the plan itself (entropy). Semi-dual: The generalised Hessian of
  :math:`-S` is :math:`H = \frac1\gamma\sum_j(\mathrm{diag}(w_j) - w_jw_j^\top/\sigma_j)`
  with :math:`w_j` the support indicator of :math:`t_j` and :math:`\sigma_j = |w_j|`
  (quadratic and top-k; sparse), or :math:`w_j = t_j`, :math:`\sigma_j = b_j`
  (entropic). The dual Newton runs a :math:`\gamma`-continuation (start at the
  cost range, divide by 4, warm start; loose tolerance on intermediate stages); the
  semi-dual Newton (same optimum, worse-posed: its Hessian couples whole columns) starts
  from the dual Newton's :math:`\alpha` and polishes it. Newton systems :math:`(H + \mu I)d = -\nabla`, :math:`\mu = 0.1\min(\|\nabla\|,1)/\gamma`,
  are solved, for the quadratic/top-k dual, through the Schur complement on the column
  block (the active set has ~n+m entries): dense Cholesky accumulated from the active
  pairs for up to 512 columns (batched, any device), sparse LU on CPU beyond, otherwise
  Jacobi-PCG with sparse mat-vecs; then an Armijo line search. Warm starts (``init``)
  skip the continuation.
* ``"lbfgs"`` (default for ``"topk"``): batched L-BFGS in compact form (Byrd, Nocedal &
  Schnabel 1994; a constant number of batched operations per iteration) with an Armijo
  backtracking line search. Both objectives are concave, so curvature pairs are always
  usable; a finished problem keeps its memory while the rest of the batch goes on.
* ``"adam"``: a fixed number of Adam steps (``max_iter`` steps at ``lr``), the recipe of
  the reference MoE router (20 steps, lr 1e-2); for use inside networks, it never warns.

``newton`` and ``lbfgs`` run in ``float64`` (``solve_dtype``) and return tensors in the
input dtype. All solvers are batched with per-problem convergence masks, device-agnostic,
and stop on the L1 marginal error :math:`\|T\mathbf 1 - a\|_1 + \|T^\top\mathbf 1 - b\|_1
\le` ``tol``.

**Gradients** (envelope/Danskin): ``value`` is the dual objective re-evaluated at the
frozen optimal potentials with the inputs' autograd graph, so :math:`\partial\,
\mathrm{value}/\partial C = T`, :math:`\partial\,\mathrm{value}/\partial a = \alpha` and
:math:`\partial\,\mathrm{value}/\partial b = \beta` (dual) hold exactly at the optimum.
"""

from __future__ import annotations

import math
import time

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import check_choice, check_positive, check_positive_int
from entrokit.problem import OTProblem, make_problem
from entrokit.solvers._entropic import warn_not_converged
from entrokit.solvers.omega import Regularizer, SquaredL2, make_regularizer
from entrokit.solvers.omega import simplex_projection_sorted as _simplex_sorted

__all__ = ["smooth_ot", "smooth_ot_problem", "FORMULATIONS", "SOLVERS"]

FORMULATIONS = ("semi_dual", "dual")
SOLVERS = ("auto", "newton", "lbfgs", "adam")
_SPARSE_AXES = ("columns", "rows")


# --------------------------------------------------------------------------------------
# objectives on the internal layout: L[b, j, i] = cost of (row i, constrained column j)
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# batched L-BFGS (minimisation), Armijo backtracking
# --------------------------------------------------------------------------------------
def _lbfgs_direction(g, mem):
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


def _lbfgs_memory(S, Y):
    """Compact-form pieces (Z = [S; Y], R, D, Y^T Y, theta) of the stored pairs."""
    Sm, Ym = torch.stack(S, 1), torch.stack(Y, 1)  # (B, h, n)
    SY = torch.bmm(Sm, Ym.mT)
    R = torch.triu(SY)
    D = torch.diagonal(SY, dim1=-2, dim2=-1)
    YY = torch.bmm(Ym, Ym.mT)
    theta = (SY[:, -1, -1] / YY[:, -1, -1]).reshape(-1, 1, 1)
    return torch.cat([Sm, Ym], 1), R, D, YY, theta


def _lbfgs(fun, x, tol, max_iter, history=10, patience=None):
    """Minimise a batch of convex functions. ``fun(x) -> (F, g, err)``, all batched.

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
        d = _lbfgs_direction(g, mem)
        gd = (g * d).sum(-1)
        bad = ~(gd < 0)
        if bool(bad.any()):  # not a descent direction: fall back to steepest descent
            d = torch.where(bad.unsqueeze(-1), -g, d)
            gd = (g * d).sum(-1)
        t = torch.ones_like(F)
        if not S:  # first step: unit step along -g / |g|_inf
            t = 1.0 / g.abs().amax(-1).clamp_min(torch.finfo(x.dtype).tiny)
        todo = active.clone()
        xn, Fn, gn, errn = x, F, g, err
        for _ls in range(50):
            xt = x + t.unsqueeze(-1) * d
            Ft, gt, errt = fun(xt)
            ok = Ft <= F + 1e-4 * t * gd + fine * F.abs()
            upd = todo & ok
            xn = torch.where(upd.unsqueeze(-1), xt, xn)
            Fn = torch.where(upd, Ft, Fn)
            gn = torch.where(upd.unsqueeze(-1), gt, gn)
            errn = torch.where(upd, errt, errn)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, 0.5 * t, t)
        moved = active & ~todo
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
            mem = _lbfgs_memory(S, Y)
        # nonsmooth (top-k) optima: stop once the objective has stopped decreasing
        flat = torch.where(Fn < F - 1e-13 * F.abs(), torch.zeros_like(flat), flat + 1)
        stalled = active & (todo | (flat >= 30))
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


# --------------------------------------------------------------------------------------
# semismooth Newton on the semi-dual
# --------------------------------------------------------------------------------------
def _hessian_op(reg: Regularizer, T, b):
    """Generalised Hessian of -S at the plan T (B, K, R): returns (matvec, diagonal)."""
    g = reg.gamma
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
        ) / g

        def mv(v):
            vf = v.reshape(-1)
            cs = torch.zeros(Bsz * K, dtype=v.dtype, device=v.device).index_add_(0, col, vf[row]) * inv_cnt
            back = torch.zeros_like(vf).index_add_(0, row, cs[col])
            return (diag * vf - back / g).reshape(Bsz, R)

        return mv, diag.reshape(Bsz, R)
    # entropic: w_j = t_j, sigma_j = b_j
    inv_b = torch.where(b > 0, 1.0 / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(b))
    diag_full = T.sum(-2) / g
    W = T

    def mv_dense(v):
        cs = torch.bmm(W, v.unsqueeze(-1)).squeeze(-1) * inv_b  # (B, K)
        back = torch.bmm(cs.unsqueeze(-2), W).squeeze(-2)
        return diag_full * v - back / g

    sq = (T * T).sum(-2) * 0  # diagonal of the rank-one parts is dropped in the preconditioner
    return mv_dense, diag_full + sq


def _pcg(mv, rhs, diag, mu, rtol, max_iter):
    """Batched Jacobi-PCG for (H + mu I) x = rhs."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    Minv = 1.0 / (diag + mu)
    z = Minv * r
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    bnorm = rhs.norm(dim=-1, keepdim=True)
    it = 0
    for _it in range(1, max_iter + 1):
        Ap = mv(p) + mu * p
        pAp = (p * Ap).sum(-1, keepdim=True)
        step = torch.where(pAp > 0, rz / pAp.clamp_min(1e-300), torch.zeros_like(pAp))
        x = x + step * p
        r = r - step * Ap
        if bool((r.norm(dim=-1, keepdim=True) <= rtol * bnorm).all()):
            break
        z = Minv * r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return x, it


def _newton(reg, alpha, a, b, L, tol, max_iter, state):
    Bsz = alpha.shape[0]
    fine = 8 * torch.finfo(alpha.dtype).eps
    obj, g, T, _ = _semi_dual(reg, alpha, a, b, L, state)
    F = -obj
    err = _l1(g)
    errs = [err]
    n_iter = torch.zeros(Bsz, dtype=torch.long, device=alpha.device)
    active = err > tol
    cg_total = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        mv, diag = _hessian_op(reg, T, b)
        gn2 = g.norm(dim=-1, keepdim=True)
        # regularised semismooth Newton shift, in Hessian units (1/gamma)
        mu = (gn2.clamp_max(1.0) / reg.gamma).clamp_min(1e-10 / reg.gamma)
        rtol = float(min(0.1, max(float(gn2.max()) ** 0.5, 1e-6)))
        d, cg_it = _pcg(mv, -g, diag, mu, rtol, 500)
        cg_total += cg_it
        gd = (g * d).sum(-1)
        t = torch.ones_like(F)
        todo = active.clone()
        an, Fn, gnew, Tn = alpha, F, g, T
        for _ls in range(40):
            at = alpha + t.unsqueeze(-1) * d
            ot, gt, Tt, _ = _semi_dual(reg, at, a, b, L, state)
            Ft = -ot
            ok = Ft <= F + 1e-4 * t * gd + fine * F.abs()
            upd = todo & ok
            an = torch.where(upd.unsqueeze(-1), at, an)
            Fn = torch.where(upd, Ft, Fn)
            gnew = torch.where(upd.unsqueeze(-1), gt, gnew)
            if bool(upd.all()):
                Tn = Tt
            elif bool(upd.any()):  # no full-size copies when nothing is accepted
                Tn = torch.where(upd.view(-1, 1, 1), Tt, Tn)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, 0.5 * t, t)
        stalled = active & todo
        alpha, F, g, T = an, Fn, gnew, Tn
        err = _l1(g)
        n_iter += active.long()
        errs.append(err)
        active = active & (err > tol) & ~stalled
    return alpha, n_iter, err <= tol, torch.stack(errs, 0), {"cg_iterations": cg_total}


def _dual_hessian_op(reg: Regularizer, X, T):
    """Generalised Hessian of -D at X = alpha + beta - c (B, K, R): (matvec, diagonal) on
    the stacked variable (alpha (R), beta (K)). For quadratic/top-k the weights are the
    active set 1{t_ij > 0}; for entropy they are the plan itself (all scaled by 1/gamma)."""
    g = reg.gamma
    Bsz, K, R = T.shape
    if reg.sparse:
        nz = (T > 0).nonzero()
        bi, cj, ri = nz[:, 0], nz[:, 1], nz[:, 2]
        col = bi * K + cj
        row = bi * R + ri
        one = torch.ones(col.shape[0], dtype=T.dtype, device=T.device)
        dr = torch.zeros(Bsz * R, dtype=T.dtype, device=T.device).index_add_(0, row, one)
        dc = torch.zeros(Bsz * K, dtype=T.dtype, device=T.device).index_add_(0, col, one)
        diag = torch.cat([dr.reshape(Bsz, R), dc.reshape(Bsz, K)], -1) / g

        def mv(v):
            va, vb = v[:, :R].reshape(-1), v[:, R:].reshape(-1)
            oa = torch.zeros_like(va).index_add_(0, row, vb[col])
            ob = torch.zeros_like(vb).index_add_(0, col, va[row])
            return diag * v + torch.cat([oa.reshape(Bsz, R), ob.reshape(Bsz, K)], -1) / g

        return mv, diag
    W = T
    diag = torch.cat([T.sum(-2), T.sum(-1)], -1) / g

    def mv_dense(v):
        va, vb = v[:, :R], v[:, R:]
        oa = torch.bmm(vb.unsqueeze(-2), W).squeeze(-2)
        ob = torch.bmm(W, va.unsqueeze(-1)).squeeze(-1)
        return diag * v + torch.cat([oa, ob], -1) / g

    return mv_dense, diag


_STAGE_TOL = 1e-2  # marginal tolerance of intermediate gamma-continuation stages
_MU_C = 0.1  # Hessian shift mu = _MU_C * min(|grad|, 1) / gamma


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


def _direct_dual_step(T, g, mu, gamma):
    r"""Newton direction :math:`(H + \mu I)^{-1}(-g)` for the quadratic dual by a sparse
    direct solve (CPU). With :math:`W` the active set of the plan (nnz ~ n + m),
    :math:`H = \frac1\gamma\begin{pmatrix}D_r & W^\top\\ W & D_c\end{pmatrix}`;
    eliminating the diagonal row block leaves the SPD Schur complement
    :math:`S = D_c/\gamma + \mu - W (D_r/\gamma+\mu)^{-1} W^\top/\gamma^2` on the
    columns, factorised by sparse LU (``scipy.sparse.linalg.splu``)."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    Bsz, K, R = T.shape
    out = torch.empty_like(g)
    gn = g.cpu().numpy()
    mun = mu.reshape(-1).cpu().numpy()
    ig = 1.0 / gamma
    for bi in range(Bsz):
        e = torch.nonzero(T[bi].reshape(-1)).reshape(-1).cpu().numpy()  # T >= 0: active entries
        order = np.argsort(e % R, kind="stable")
        ii, jj = e[order] % R, e[order] // R  # active (row i, column j), sorted by row
        m_ = float(mun[bi])
        cr = np.bincount(ii, minlength=R)
        da = cr * ig + m_  # alpha block diagonal
        dc = np.bincount(jj, minlength=K) * ig + m_  # beta block diagonal
        ra, rb = -gn[bi, :R], -gn[bi, R:]
        # Schur complement S = diag(dc) - W^T diag(1/(gamma^2 da)) W, W the (R, K) active
        # pattern; one sparse product (canonical CSC output, no duplicate summing)
        W = sp.csr_matrix((np.ones(ii.shape[0]), (ii, jj)), shape=(R, K))
        S = (sp.diags(dc) - W.T @ sp.diags(ig * ig / da) @ W).tocsc()
        wa = ra / da
        rhs = rb - ig * np.bincount(jj, weights=wa[ii], minlength=K)
        lu = splu(S, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        db = lu.solve(rhs)
        dA = (ra - ig * np.bincount(ii, weights=db[jj], minlength=R)) / da
        out[bi] = torch.from_numpy(np.concatenate([dA, db])).to(g)
    return out


_DENSE_SCHUR_MAX = 512  # columns up to which the Schur complement is factorised densely


def _dense_dual_step(T, g, mu, gamma):
    r"""Same Newton direction as :func:`_direct_dual_step` (batched, any device): the
    column Schur complement :math:`S = D_c/\gamma + \mu - \sum_i w_i w_i^\top /
    (\gamma^2 (D_r/\gamma + \mu)_i)`, :math:`w_i` the active pattern of row i, is
    accumulated densely from the active pairs only (O(sum_i |w_i|^2) work) and solved by
    Cholesky; S is SPD because mu > 0."""
    Bsz, K, R = T.shape
    ig = 1.0 / gamma
    mu = mu.reshape(-1, 1)
    nz = (T > 0).nonzero()  # (nnz, 3): batch, column, row
    key = nz[:, 0] * R + nz[:, 2]
    key, order = torch.sort(key, stable=True)
    cj = nz[order, 1]
    cnt = torch.bincount(key, minlength=Bsz * R)  # active entries per (batch, row)
    one = torch.ones_like(cj, dtype=g.dtype)
    da = (cnt.to(g.dtype).reshape(Bsz, R) * ig + mu)  # row block diagonal
    dc = torch.zeros(Bsz * K, dtype=g.dtype, device=g.device).index_add_(0, nz[:, 0] * K + nz[:, 1], one)
    dc = dc.reshape(Bsz, K) * ig + mu  # column block diagonal
    # all (j, j') pairs sharing a row: entry e pairs with the c_row(e) entries of its row
    c_e = cnt[key]
    start = torch.cumsum(cnt, 0) - cnt
    left = torch.repeat_interleave(cj, c_e)
    base = torch.repeat_interleave(start[key], c_e)
    pos = torch.arange(left.shape[0], device=g.device) - torch.repeat_interleave(torch.cumsum(c_e, 0) - c_e, c_e)
    right = cj[base + pos]
    rowkey = torch.repeat_interleave(key, c_e)
    w = (ig * ig) / da.reshape(-1)[rowkey]
    S = torch.diag_embed(dc)
    S.index_put_((rowkey // R, left, right), -w, accumulate=True)
    ra, rb = -g[:, :R], -g[:, R:]
    wa = (ra / da).reshape(-1)
    rhs = rb - ig * torch.zeros(Bsz * K, dtype=g.dtype, device=g.device).index_add_(
        0, (key // R) * K + cj, wa[key]).reshape(Bsz, K)
    Lc, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):  # numerically indefinite: fall back to LU
        db = torch.linalg.solve(S, rhs)
    else:
        db = torch.cholesky_solve(rhs.unsqueeze(-1), Lc).squeeze(-1)
    back = torch.zeros(Bsz * R, dtype=g.dtype, device=g.device).index_add_(
        0, key, db.reshape(-1)[(key // R) * K + cj])
    dA = (ra - ig * back.reshape(Bsz, R)) / da
    return torch.cat([dA, db], -1)


def _newton_dual(reg, x, a, b, L, tol, max_iter):
    """Globalised regularised semismooth Newton on -D (Hessian shift mu ~ |grad|)."""
    Bsz, K, R = L.shape
    # small problems: dense Cholesky of the Schur complement (batched, any device);
    # larger ones on CPU: sparse LU; otherwise PCG
    dense = reg.sparse and K <= _DENSE_SCHUR_MAX
    direct = reg.sparse and x.device.type == "cpu"
    fine = 8 * torch.finfo(x.dtype).eps

    # two scratch plans (current / trial) reused across iterations, single problems only
    bufs = [torch.empty_like(L), torch.empty_like(L)] if (reg.name == "l2" and Bsz == 1) else None
    slot = [0]

    def ev(x, trial=False):
        if reg.name == "l2":
            out = None if bufs is None else bufs[slot[0] ^ int(trial)]
            return _l2_dual_fused(x, a, b, L, reg.gamma, out=out)
        obj, ga, gb, T = _dual(reg, x[:, :R], x[:, R:], a, b, L)
        return -obj, torch.cat([ga, gb], -1), T

    F, g, T = ev(x)
    err = _l1(g)
    errs = [err]
    n_iter = torch.zeros(Bsz, dtype=torch.long, device=x.device)
    active = err > tol
    cg_total = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        gn = g.norm(dim=-1, keepdim=True)
        mu = (_MU_C * gn.clamp_max(1.0) / reg.gamma).clamp_min(1e-12 / reg.gamma)
        if dense:
            d = _dense_dual_step(T, g, mu, reg.gamma)
        elif direct:
            d = _direct_dual_step(T, g, mu, reg.gamma)
        else:
            mv, diag = _dual_hessian_op(reg, None, T)
            rtol = float(min(0.1, max(float(gn.max()) ** 0.5, 1e-8)))
            d, cg_it = _pcg(mv, -g, diag, mu, rtol, 1000)
            cg_total += cg_it
        gd = (g * d).sum(-1)
        t = torch.ones_like(F)
        todo = active.clone()
        xn, Fn, gnew, Tn = x, F, g, T
        for _ls in range(40):
            xt = x + t.unsqueeze(-1) * d
            Ft, gt, Tt = ev(xt, trial=True)
            ok = Ft <= F + 1e-4 * t * gd + fine * F.abs()
            upd = todo & ok
            xn = torch.where(upd.unsqueeze(-1), xt, xn)
            Fn = torch.where(upd, Ft, Fn)
            gnew = torch.where(upd.unsqueeze(-1), gt, gnew)
            if bool(upd.all()):
                Tn = Tt
                slot[0] ^= 1 if bufs is not None else 0
            elif bool(upd.any()):  # no full-size copies when nothing is accepted
                Tn = torch.where(upd.view(-1, 1, 1), Tt, Tn)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, 0.5 * t, t)
        stalled = active & todo
        x, F, g, T = xn, Fn, gnew, Tn
        err = _l1(g)
        n_iter += active.long()
        errs.append(err)
        active = active & (err > tol) & ~stalled
    return x, n_iter, err <= tol, torch.stack(errs, 0), {"cg_iterations": cg_total}


# --------------------------------------------------------------------------------------
# fixed-step Adam (first-order mode for use inside networks)
# --------------------------------------------------------------------------------------
def _adam(fun, x, n_steps, lr, tol, betas=(0.9, 0.999), adam_eps=1e-8):
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    errs = []
    _, g, err = fun(x)
    errs.append(err)
    for t in range(1, n_steps + 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mh = m / (1 - betas[0] ** t)
        vh = v / (1 - betas[1] ** t)
        x = x - lr * mh / (vh.sqrt() + adam_eps)
        _, g, err = fun(x)
        errs.append(err)
    n_iter = torch.full((x.shape[0],), n_steps, dtype=torch.long, device=x.device)
    return x, n_iter, err <= tol, torch.stack(errs, 0)


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _gamma_stages(reg: Regularizer, L: torch.Tensor) -> list[float]:
    """gamma-continuation for Newton (l2, entropy): gamma0 = cost range, divided by 4 per
    stage while above 4 * gamma; each stage warm-starts the next at a loose tolerance."""
    if reg.name not in ("l2", "entropy"):
        return []
    g0 = float((L.amax((-2, -1)) - L.amin((-2, -1))).max())
    out = []
    while g0 > 4 * reg.gamma:
        out.append(g0)
        g0 /= 4
    return out


def smooth_ot_problem(
    problem: OTProblem,
    reg: Regularizer,
    *,
    formulation: str = "semi_dual",
    sparse_axis: str = "columns",
    solver: str = "auto",
    tol: float = 1e-6,
    max_iter: int | None = None,
    lr: float = 1e-2,
    solve_dtype: torch.dtype | None = torch.float64,
    init: torch.Tensor | None = None,
):
    """Solve a validated *batched* problem; returns the pieces of an :class:`OTResult`.

    Returns:
        dict with ``alpha`` (internal rows), ``beta`` (internal columns), ``plan``
        (internal layout ``(B, K, R)``, detached), ``n_iter``, ``converged``, ``errors``
        and ``info``; ``L`` is the internal cost layout (with the inputs' graph).
    """
    C = problem.geometry.cost_matrix()
    a, b = problem.a, problem.b
    if sparse_axis == "columns":
        L, ar, bc = C.transpose(-1, -2), a, b
    else:
        L, ar, bc = C, b, a
    if solver == "auto":
        # top-k objectives are nonsmooth at their optimum: quasi-Newton (warm-started from
        # the quadratic solution) is more robust there than semismooth Newton
        solver = "lbfgs" if reg.name == "topk" else "newton"
    if max_iter is None:
        max_iter = {"newton": 300, "lbfgs": 2000, "adam": 20}[solver]
    warm = None
    if reg.name == "topk" and solver == "lbfgs" and init is None:
        # quadratic solution first: if its plan is already k-sparse it solves the top-k
        # problem exactly (feasible, and optimal for the convexified problem); otherwise
        # its potentials warm-start L-BFGS
        t0 = time.perf_counter()
        l2 = SquaredL2(reg.gamma)
        warm = smooth_ot_problem(problem, l2, formulation="dual", sparse_axis=sparse_axis, solver="newton",
                                 tol=max(tol, _WARM_TOL), solve_dtype=solve_dtype)
        if int((warm["plan"] != 0).sum(-1).max()) <= reg.k and tol < _WARM_TOL:
            warm = smooth_ot_problem(problem, l2, formulation="dual", sparse_axis=sparse_axis, solver="newton",
                                     tol=tol, solve_dtype=solve_dtype, init=torch.cat([warm["alpha"], warm["beta"]], -1))
        if int((warm["plan"] != 0).sum(-1).max()) <= reg.k:
            warm["info"].update(reg="topk", k=reg.k, formulation=formulation,
                                solved_as="l2 dual (its plan is k-sparse)")
            return warm
        warm["time"] = time.perf_counter() - t0
    wdt = a.dtype if (solver == "adam" or solve_dtype is None) else solve_dtype
    Ld = L.detach().to(wdt).contiguous()
    ad, bd = ar.detach().to(wdt), bc.detach().to(wdt)
    Bsz, K, R = Ld.shape
    state: dict = {}
    t0 = time.perf_counter()
    info = {"solver": solver, "formulation": formulation, "reg": reg.name, "gamma": reg.gamma,
            "k": getattr(reg, "k", None), "sparse_axis": sparse_axis, "solve_dtype": str(wdt)}
    with torch.no_grad():
        if formulation == "semi_dual":
            x0 = torch.zeros(Bsz, R, dtype=wdt, device=Ld.device)
            if init is not None:
                x0 = init.detach().to(wdt).reshape(Bsz, R).clone()

            def fun(x):
                obj, g, _, _ = _semi_dual(reg, x, ad, bd, Ld, state)
                return -obj, g, _l1(g)

            if solver == "newton" and init is None and reg.name in ("l2", "entropy"):
                # same optimum, better-posed problem: dual Newton (direct Schur solves,
                # negligible weights handled), then semi-dual Newton polishes from its alpha
                t0w = time.perf_counter()
                warm = smooth_ot_problem(problem, reg, formulation="dual", sparse_axis=sparse_axis,
                                         solver="newton", tol=tol, max_iter=max_iter, solve_dtype=solve_dtype)
                x0 = warm["alpha"].to(wdt)
                info.update(warm_start="dual", warm_start_time=time.perf_counter() - t0w,
                            gamma_stages=warm["info"].get("gamma_stages"))
                x, n_iter, conv, errs, extra = _newton(reg, x0, ad, bd, Ld, tol, max_iter, state)
                n_iter = n_iter + warm["n_iter"]
                errs = torch.cat([warm["errors"].to(errs), errs], 0)
                info.update(extra)
            elif solver == "newton":
                stages = [] if init is not None else _gamma_stages(reg, Ld)  # warm starts skip continuation
                for gs in stages:
                    xs, _, _, _, _ = _newton(type(reg)(gs), x0, ad, bd, Ld, max(tol, 1e-3), max_iter, {})
                    x0 = xs
                info["gamma_stages"] = len(stages) + 1
                x, n_iter, conv, errs, extra = _newton(reg, x0, ad, bd, Ld, tol, max_iter, state)
                info.update(extra)
            elif solver == "lbfgs" and reg.name == "topk":
                if warm is not None:
                    x0 = _from_warm(warm, wdt, info)[0]
                buf = torch.empty_like(Ld)

                def fun_k(x):
                    F, g, _ = _topk_semi_dual_compact(reg.gamma, reg.k, x, ad, bd, Ld, buf)
                    return F, g, _l1(g)

                x, n_iter, conv, errs = _lbfgs(fun_k, x0, tol, max_iter, patience=_TOPK_PATIENCE)
            elif solver == "lbfgs":
                x, n_iter, conv, errs = _lbfgs(fun, x0, tol, max_iter)
            else:
                x, n_iter, conv, errs = _adam(fun, x0, max_iter, lr, tol)
            _, _, T, beta = _semi_dual(reg, x, ad, bd, Ld, state)
            alpha = x
        else:
            if reg.sparse and solver == "newton":
                # c-transform pair (beta_j = min_i c_ij, alpha_i = min_j c_ij - beta_j: a
                # feasible unregularized dual, tight on every row and column) lifted by
                # gamma0 * weights / 2, gamma0 the first continuation stage
                g0 = (_gamma_stages(reg, Ld) or [reg.gamma])[0]
                beta0 = Ld.amin(-1)
                alpha0 = (Ld - beta0.unsqueeze(-1)).amin(-2)
                x0 = torch.cat([alpha0 + 0.5 * g0 * ad, beta0 + 0.5 * g0 * bd], -1)
            else:
                # alpha = 0, beta_j = min_i c_ij + gamma b_j: every column starts with its
                # cheapest row active and (for l2) its exact mass
                beta0 = Ld.amin(-1) + reg.gamma * bd
                x0 = torch.cat([torch.zeros(Bsz, R, dtype=wdt, device=Ld.device), beta0], -1)
            if init is not None:
                x0 = init.detach().to(wdt).reshape(Bsz, R + K).clone()

            # zero weights: their rows/columns are removed exactly (infinite cost) and
            # their potentials pinned below every active threshold afterwards. Negligible
            # weights (the smallest ones, summing to <= tol/20 per side, e.g. Gaussian
            # tails of 1e-56) are treated as zeros, the rest rescaled to the same mass:
            # they cost at most tol/5 of L1 error but otherwise stall Newton.
            tol_s = tol
            if solver != "adam" and reg.sparse:
                ad_s, bd_s = _drop_negligible(ad, tol / 20), _drop_negligible(bd, tol / 20)
                tol_s = tol / 2
            else:
                ad_s, bd_s = ad, bd
            zr, zc = ad_s == 0, bd_s == 0
            Lz = Ld
            if reg.sparse and (bool(zr.any()) or bool(zc.any())):
                Lz = Ld.masked_fill(zr.unsqueeze(-2) | zc.unsqueeze(-1), math.inf)

            def fun(x):
                obj, ga, gb, _ = _dual(reg, x[:, :R], x[:, R:], ad_s, bd_s, Lz)
                return -obj, torch.cat([ga, gb], -1), _l1(ga) + _l1(gb)

            if solver == "newton":
                stages = [] if init is not None else _gamma_stages(reg, Ld)  # warm starts skip continuation
                for gs in stages:
                    rs = type(reg)(gs)
                    xs, _, _, _, _ = _newton_dual(rs, x0, ad_s, bd_s, Lz, max(tol_s, _STAGE_TOL), max_iter)
                    x0 = xs
                info["gamma_stages"] = len(stages) + 1
                x, n_iter, conv, errs, extra = _newton_dual(reg, x0, ad_s, bd_s, Lz, tol_s, max_iter)
                info.update(extra)
            elif solver == "lbfgs" and reg.name == "topk":
                if warm is not None:
                    x0 = torch.cat(_from_warm(warm, wdt, info), -1)
                buf = torch.empty_like(Lz)

                def fun_k(x):
                    F, g, _ = _topk_dual_compact(reg.gamma, reg.k, x, ad_s, bd_s, Lz, buf)
                    return F, g, _l1(g)

                x, n_iter, conv, errs = _lbfgs(fun_k, x0, tol_s, max_iter, patience=_TOPK_PATIENCE)
            elif solver == "lbfgs":
                x, n_iter, conv, errs = _lbfgs(fun, x0, tol_s, max_iter)
            else:
                x, n_iter, conv, errs = _adam(fun, x0, max_iter, lr, tol_s)
            alpha, beta = x[:, :R], x[:, R:]
            if reg.sparse:  # entropic plans are never exactly zero: nothing to pin
                alpha, beta = _pin_zero_weights(alpha, beta, ad_s, bd_s, Ld)
            _, _, _, T = _dual(reg, alpha, beta, ad, bd, Ld)
            # convergence is judged on the original weights
            conv = (_l1(T.sum(-2) - ad) + _l1(T.sum(-1) - bd)) <= tol
    info["time"] = time.perf_counter() - t0
    dt = a.dtype
    return {
        "alpha": alpha.to(dt), "beta": beta.to(dt), "plan": T.to(dt), "n_iter": n_iter,
        "converged": conv, "errors": errs.to(dt), "info": info, "L": L, "ar": ar, "bc": bc,
        "solver": solver,
    }


_TOPK_PATIENCE = 15  # top-k L-BFGS: stop after this many iterations without a 1% better error
_WARM_TOL = 1e-3  # marginal tolerance of the quadratic warm start of top-k


def _from_warm(warm, wdt, info):
    """Potentials (alpha, beta) of the quadratic warm start (top-k with k = infinity at the
    same gamma): the top-k potentials differ only through the columns where the
    cardinality constraint binds."""
    info["warm_start"] = "l2"
    info["warm_start_time"] = warm["time"]
    return warm["alpha"].to(wdt), warm["beta"].to(wdt)


def _drop_negligible(w, budget):
    """Zero the smallest weights whose cumulative mass is <= budget; rescale the rest to
    the original total (no-op when nothing is dropped)."""
    sw, idx = torch.sort(w, dim=-1)
    drop_sorted = (torch.cumsum(sw, -1) <= budget) & (sw > 0)
    if not bool(drop_sorted.any()):
        return w
    drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
    w2 = w.masked_fill(drop, 0.0)
    return w2 * (w.sum(-1, keepdim=True) / w2.sum(-1, keepdim=True))


def _pin_zero_weights(alpha, beta, a, b, L):
    """Potentials of zero-weight rows/columns set just below their active threshold
    (alpha_i = min_j(c_ij - beta_j) - 1), so their plan rows/columns are exactly zero."""
    zr, zc = a == 0, b == 0
    if bool(zr.any()):
        Lm = L.masked_fill(zc.unsqueeze(-1), math.inf)
        alpha = torch.where(zr, (Lm - beta.unsqueeze(-1)).amin(-2) - 1.0, alpha)
    if bool(zc.any()):
        beta = torch.where(zc, (L - alpha.unsqueeze(-2)).amin(-1) - 1.0, beta)
    return alpha, beta


def _envelope_value(reg, formulation, alpha, beta, ar, bc, L):
    """Dual objective at frozen potentials, differentiable in (a, b, C) (Danskin)."""
    if formulation == "semi_dual":
        obj, _, _, _ = _semi_dual(reg, alpha, ar, bc, L)
        return obj
    beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
    obj, _, _, _ = _dual(reg, alpha, beta, ar, bc, L)
    return obj


def smooth_ot(
    a: torch.Tensor,
    b: torch.Tensor,
    cost,
    eps: float | None = None,
    *,
    reg: str | Regularizer = "l2",
    gamma: float | None = None,
    k: int | None = None,
    formulation: str | None = None,
    sparse_axis: str = "columns",
    solver: str = "auto",
    tol: float = 1e-6,
    max_iter: int | None = None,
    lr: float = 1e-2,
    solve_dtype: torch.dtype | None = torch.float64,
    init: torch.Tensor | None = None,
    normalize: bool = False,
    check_inputs: bool = True,
    sparse_plan: bool | None = None,
) -> OTResult:
    r"""Quadratically-regularized, sparsity-constrained or entropic OT by (semi-)dual ascent.

    Solves :math:`\min_{T\in U(a,b)} \langle T, C\rangle + \sum_j\Omega(t_j)` with

    * ``reg="l2"``: :math:`\Omega(t) = \frac\gamma2\|t\|^2` (sparse plans, POT's
      ``reg_type="l2"`` with ``reg=gamma``; RegOT's QROT with ``reg=gamma``);
    * ``reg="topk"``: :math:`\Omega(t) = \frac\gamma2\|t\|^2 + \iota\{\|t\|_0\le k\}`, at
      most ``k`` nonzeros per column (or per row, ``sparse_axis="rows"``), exactly;
    * ``reg="entropy"``: :math:`\Omega(t) = \gamma\sum t\log t` (dense plans);

    or any :class:`~entrokit.solvers.omega.Regularizer` object.

    Args:
        a: source weights ``[n]`` or ``[B, n]``.
        b: target weights ``[m]`` or ``[B, m]`` (same total mass as ``a``).
        cost: ``[n, m]`` / ``[B, n, m]`` tensor or a geometry (materialised).
        eps: alias of ``gamma`` (so that :func:`entrokit.solve` can dispatch here).
        reg: ``"l2"``, ``"topk"``, ``"entropy"`` or a ``Regularizer``.
        gamma: regularization strength :math:`\gamma > 0` (in cost units, summed over the
            plan: not averaged).
        k: maximum nonzeros per column (row), only for ``reg="topk"``; ``k >= n`` is
            quadratic OT and ``k = 1`` is unregularized OT.
        formulation: ``"semi_dual"`` (exact marginals on the sparse axis, ``n`` variables)
            or ``"dual"`` (``n + m`` variables). Default (``None``): ``"dual"`` for
            ``"l2"`` and ``"entropy"`` (its semismooth Newton system is a sparse bipartite
            Laplacian, solved directly; the semi-dual Hessian couples whole columns, so
            semi-dual Newton is warm-started from the dual solution),
            ``"semi_dual"`` for ``"topk"`` (column marginals and cardinality exact).
        sparse_axis: ``"columns"`` (each target receives from at most k sources) or
            ``"rows"`` (each source sends to at most k targets; the problem is transposed).
        solver: ``"auto"`` (``"newton"`` for ``"l2"``/``"entropy"``, ``"lbfgs"`` for ``"topk"``),
            ``"newton"``, ``"lbfgs"`` or ``"adam"`` (``max_iter`` fixed steps at ``lr``).
            For ``"topk"`` with ``"lbfgs"`` and no ``init``, the quadratic solution comes
            first (returned as is when already k-sparse, ``info["solved_as"]``; otherwise
            the warm start, ``info["warm_start_time"]``).
        tol: L1 marginal-error tolerance :math:`\|T1-a\|_1 + \|T^\top 1-b\|_1`, always
            checked on the original weights. For ``"l2"``/``"topk"`` with the dual,
            zero weights are removed exactly and the smallest weights summing to at
            most ``tol/20`` per side (e.g. Gaussian tails of 1e-56) are solved as zeros
            (the rest rescaled), which keeps Newton well-posed at a cost of at most
            ``tol/5`` of marginal error.
        max_iter: iteration budget (default 300 Newton, 2000 L-BFGS, 20 Adam steps).
        lr: Adam step size.
        solve_dtype: working dtype of ``newton``/``lbfgs`` (default ``float64``; ``None``
            keeps the input dtype). Outputs always follow the inputs' dtype.
        init: warm start: ``alpha`` (semi-dual, ``[B, n]``) or ``cat(alpha, beta)``
            (dual) in the internal layout (rows and columns swapped for
            ``sparse_axis="rows"``), e.g. ``result.info["x"]`` of a nearby problem.
        normalize: rescale ``a`` and ``b`` to unit mass.
        check_inputs: run value checks (signs, NaN, masses).
        sparse_plan: return ``plan`` as a sparse COO tensor. Default: ``True`` for
            ``"l2"`` and ``"topk"``, ``False`` for ``"entropy"`` (decided by ``reg``,
            never by the data).

    Returns:
        :class:`~entrokit.OTResult` with ``f`` (:math:`\alpha`), ``g`` (:math:`\beta`),
        ``value`` (dual objective; for ``"topk"`` the value of the convexified primal,
        a lower bound of the nonconvex one), ``transport_cost`` :math:`\langle C,T\rangle`,
        ``marginal_error``, ``eps = gamma``, ``grad="envelope"`` and ``info`` with
        ``primal_value`` (:math:`\langle C,T\rangle + \sum_j\Omega(t_j)`),
        ``max_nnz`` (largest number of nonzeros along the sparse axis), ``nnz``, the
        solver name and time.

    Raises:
        InputError: bad options (``gamma <= 0``, ``k < 1``, unknown names) or data.
        TypeError: non-tensor inputs, non-integer ``k``.

    Example:
        >>> import torch, entrokit
        >>> g = torch.Generator().manual_seed(0)
        >>> C = torch.rand(6, 5, generator=g, dtype=torch.float64)
        >>> a, b = torch.full((6,), 1 / 6, dtype=torch.float64), torch.full((5,), 0.2, dtype=torch.float64)
        >>> res = entrokit.smooth_ot(a, b, C, reg="topk", gamma=0.1, k=2)
        >>> int((res.plan.to_dense() > 0).sum(0).max()) <= 2
        True
    """
    if gamma is None and eps is None:
        raise InputError("smooth_ot needs gamma, the regularization strength; pass e.g. gamma=0.1.")
    if gamma is not None and eps is not None and float(gamma) != float(eps):
        raise InputError(f"gamma={gamma!r} and eps={eps!r} disagree; pass only gamma.")
    gamma = check_positive(gamma if gamma is not None else eps, "gamma")
    regul = make_regularizer(reg, gamma, k)
    if isinstance(reg, Regularizer):
        gamma = regul.gamma
    if formulation is None:
        formulation = "semi_dual" if regul.name == "topk" else "dual"
    check_choice(formulation, "formulation", FORMULATIONS)
    check_choice(sparse_axis, "sparse_axis", _SPARSE_AXES)
    check_choice(solver, "solver", SOLVERS)
    tol = check_positive(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter", allow_none=True)
    lr = check_positive(lr, "lr")
    if solve_dtype is not None and solve_dtype not in (torch.float32, torch.float64):
        raise InputError(f"solve_dtype must be torch.float64, torch.float32 or None; got {solve_dtype!r}.")
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    user_batched = problem.batched
    pb = problem.with_batch()
    out = smooth_ot_problem(
        pb, regul, formulation=formulation, sparse_axis=sparse_axis, solver=solver, tol=tol,
        max_iter=max_iter, lr=lr, solve_dtype=solve_dtype, init=init,
    )
    res = _assemble(pb, regul, out, formulation, sparse_axis, user_batched, sparse_plan)
    if out["solver"] != "adam":
        hint = (
            f"Raise max_iter, loosen tol (now {tol:g}), increase gamma (now {gamma:g})"
            + (", increase k" if regul.name == "topk" else "")
            + (", or try formulation='semi_dual'" if formulation == "dual" else ", or try solver='lbfgs'")
            + "."
        )
        warn_not_converged(res.converged, res.marginal_error, tol, "smooth_ot", hint)
    return res


def _assemble(pb, regul, out, formulation, sparse_axis, user_batched, sparse_plan) -> OTResult:
    a, b = pb.a, pb.b
    alpha, beta, Tl = out["alpha"], out["beta"], out["plan"]
    # user layout (B, n, m)
    T = Tl.transpose(-1, -2) if sparse_axis == "columns" else Tl
    value = _envelope_value(regul, formulation, alpha, beta, out["ar"], out["bc"], out["L"])
    C = pb.geometry.cost_matrix()
    tc = (C * T).sum((-2, -1))
    with torch.no_grad():
        merr = _l1(T.sum(-1) - a) + _l1(T.sum(-2) - b)
        primal = tc.detach() + regul.omega(Tl).sum(-1)
        nnz_axis = (Tl != 0).sum(-1)  # per constrained column
        info = dict(out["info"])
        info.update(
            primal_value=primal if user_batched else primal.squeeze(0),
            max_nnz=int(nnz_axis.max()),
            nnz=int((Tl != 0).sum()),
            x=(torch.cat([alpha, beta], -1) if formulation == "dual" else alpha),
        )
    f, g = (alpha, beta) if sparse_axis == "columns" else (beta, alpha)
    use_sparse = regul.sparse if sparse_plan is None else bool(sparse_plan)
    squeeze = not user_batched

    def plan_fn(T=T):
        P = T.squeeze(0) if squeeze else T
        return P.to_sparse() if use_sparse else P

    sq = (lambda t: t.squeeze(0)) if squeeze else (lambda t: t)
    errors = out["errors"]
    return OTResult(
        f=sq(f), g=sq(g), value=sq(value), transport_cost=sq(tc), marginal_error=sq(merr),
        n_iter=sq(out["n_iter"]), converged=sq(out["converged"]),
        errors=errors[:, 0] if squeeze else errors,
        problem=pb.squeeze_batch() if squeeze else pb, eps=regul.gamma,
        method=f"smooth_{formulation}_{regul.name}", grad="envelope", info=info, plan_fn=plan_fn,
    )
