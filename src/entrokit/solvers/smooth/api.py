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

**Negligible weights.** For ``"l2"``/``"topk"`` with the dual, zero weights are removed
exactly and the smallest weights summing to at most ``tol/20`` per side (e.g. Gaussian
tails of 1e-56) are solved as zeros (the rest rescaled), which keeps Newton well-posed at
a cost of at most ``tol/5`` of marginal error. A warm start ``init`` in the internal
layout has rows and columns swapped for ``sparse_axis="rows"`` (e.g. ``result.info["x"]``
of a nearby problem).

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
from typing import Callable

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import check_choice, check_positive, check_solver_options
from entrokit.problem import OTProblem, make_problem
from entrokit.solvers._entropic import warn_not_converged
from entrokit.solvers._io import numpy_in_out
from entrokit.solvers._numerics import continuation_schedule
from entrokit.solvers.omega import Regularizer, SquaredL2, make_regularizer
from entrokit.solvers.smooth.adam import adam
from entrokit.solvers.smooth.lbfgs import lbfgs
from entrokit.solvers.smooth.newton import newton_dual, newton_semi_dual
from entrokit.solvers.smooth.objectives import (
    _dual,
    _l1,
    _semi_dual,
    _topk_dual_compact,
    _topk_semi_dual_compact,
)
from entrokit.solvers.smooth.result import smooth_result

__all__ = ["smooth_ot", "smooth_ot_problem", "FORMULATIONS", "SOLVERS"]

FORMULATIONS = ("semi_dual", "dual")
SOLVERS = ("auto", "newton", "lbfgs", "adam")
_SPARSE_AXES = ("columns", "rows")
_STAGE_TOL = 1e-2  # marginal tolerance of intermediate gamma-continuation stages


def _gamma_stages(reg: Regularizer, L: torch.Tensor) -> list[float]:
    """gamma-continuation for Newton (l2, entropy): from gamma0 = cost range down by a
    factor 4 (:func:`~entrokit.solvers._numerics.continuation_schedule`), target excluded;
    each stage warm-starts the next at a loose tolerance."""
    if reg.name not in ("l2", "entropy"):
        return []
    gamma0 = float((L.amax((-2, -1)) - L.amin((-2, -1))).max())
    return continuation_schedule(reg.gamma, gamma0, 0.25)[:-1]


def _continue(eps_scaling, init) -> bool:
    return eps_scaling is True or (eps_scaling == "auto" and init is None)


def smooth_ot_problem(
    problem: OTProblem,
    reg: Regularizer,
    *,
    formulation: str,
    sparse_axis: str,
    solver: str,
    tol: float,
    solve_dtype: torch.dtype | None,
    max_iter: int | None = None,
    lr: float = 1e-2,
    init: torch.Tensor | None = None,
    eps_scaling: bool | str = "auto",
):
    """Solve a validated *batched* problem with checked options; returns the pieces of an
    :class:`OTResult`. The caller decides the formulation, axis, solver, tolerance and
    working dtype (:func:`smooth_ot`'s defaults resolved); ``max_iter=None`` is the
    solver's own budget, ``lr`` is Adam's step.

    ``eps_scaling`` drives the gamma-continuation of the Newton solvers: ``"auto"`` runs it
    unless ``init`` is given, ``True`` always, ``False`` never.

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
        warm = _topk_warm_start(problem, reg, formulation, sparse_axis, tol, solve_dtype)
        if warm.pop("solved_as_l2", False):
            return warm
    work_dtype = a.dtype if (solver == "adam" or solve_dtype is None) else solve_dtype
    cost_work = L.detach().to(work_dtype).contiguous()
    a_work, b_work = ar.detach().to(work_dtype), bc.detach().to(work_dtype)
    Bsz, K, R = cost_work.shape
    state: dict = {}
    t0 = time.perf_counter()
    info = {"solver": solver, "formulation": formulation, "reg": reg.name, "gamma": reg.gamma,
            "k": getattr(reg, "k", None), "sparse_axis": sparse_axis, "solve_dtype": str(work_dtype)}
    with torch.no_grad():
        solve = _solve_semi_dual if formulation == "semi_dual" else _solve_dual
        alpha, beta, T, n_iter, conv, errs = solve(
            problem, reg, solver=solver, sparse_axis=sparse_axis, tol=tol, max_iter=max_iter, lr=lr,
            solve_dtype=solve_dtype, init=init, eps_scaling=eps_scaling, warm=warm,
            work=(cost_work, a_work, b_work), info=info, state=state,
        )
    info["time"] = time.perf_counter() - t0
    dt = a.dtype
    return {
        "alpha": alpha.to(dt), "beta": beta.to(dt), "plan": T.to(dt), "n_iter": n_iter,
        "converged": conv, "errors": errs.to(dt), "info": info, "L": L, "ar": ar, "bc": bc,
        "solver": solver,
    }


def _solve_semi_dual(problem, reg, *, solver, sparse_axis, tol, max_iter, lr, solve_dtype, init, eps_scaling, warm, work, info, state):
    """The semi-dual branch of :func:`smooth_ot_problem`: ``(alpha, beta, T, n_iter,
    converged, errors)`` in the internal layout (``work = (cost, a, b)`` in the solve dtype)."""
    cost_work, a_work, b_work = work
    Bsz, K, R = cost_work.shape
    work_dtype = cost_work.dtype
    x0 = torch.zeros(Bsz, R, dtype=work_dtype, device=cost_work.device)
    if init is not None:
        x0 = init.detach().to(work_dtype).reshape(Bsz, R).clone()

    def fun(x):
        obj, g, _, _ = _semi_dual(reg, x, a_work, b_work, cost_work, state)
        return -obj, g, _l1(g)

    if solver == "newton" and init is None and reg.name in ("l2", "entropy"):
        # same optimum, better-posed problem: dual Newton (direct Schur solves,
        # negligible weights handled), then semi-dual Newton polishes from its alpha
        t0_warm = time.perf_counter()
        warm = smooth_ot_problem(problem, reg, formulation="dual", sparse_axis=sparse_axis,
                                 solver="newton", tol=tol, max_iter=max_iter, solve_dtype=solve_dtype)
        x0 = warm["alpha"].to(work_dtype)
        info.update(warm_start="dual", warm_start_time=time.perf_counter() - t0_warm,
                    gamma_stages=warm["info"].get("gamma_stages"))
        x, n_iter, conv, errs, extra = newton_semi_dual(reg, x0, a_work, b_work, cost_work, tol, max_iter, state)
        n_iter = n_iter + warm["n_iter"]
        errs = torch.cat([warm["errors"].to(errs), errs], 0)
        info.update(extra)
    elif solver == "newton":
        stages = _gamma_stages(reg, cost_work) if _continue(eps_scaling, init) else []  # warm starts skip it

        def newton(r, x, t):
            return newton_semi_dual(r, x, a_work, b_work, cost_work, t, max_iter, state if r is reg else {})

        x, n_iter, conv, errs = _continued_newton(newton, reg, x0, stages, max(tol, 1e-3), tol, info)
    else:
        if reg.name == "topk" and warm is not None:
            x0 = _from_warm(warm, work_dtype, info)[0]
        x, n_iter, conv, errs = _first_order_run(solver, fun, reg, _topk_semi_dual_compact, x0, tol,
                                                 max_iter, lr, a_work, b_work, cost_work)
    _, _, T, beta = _semi_dual(reg, x, a_work, b_work, cost_work, state)
    alpha = x
    return alpha, beta, T, n_iter, conv, errs


def _solve_dual(problem, reg, *, solver, sparse_axis, tol, max_iter, lr, solve_dtype, init, eps_scaling, warm, work, info, state):
    """The dual branch of :func:`smooth_ot_problem` (same interface as
    :func:`_solve_semi_dual`)."""
    cost_work, a_work, b_work = work
    Bsz, K, R = cost_work.shape
    work_dtype = cost_work.dtype
    if reg.sparse and solver == "newton":
        # c-transform pair (beta_j = min_i c_ij, alpha_i = min_j c_ij - beta_j: a
        # feasible unregularized dual, tight on every row and column) lifted by
        # gamma0 * weights / 2, gamma0 the first continuation stage
        g0 = (_gamma_stages(reg, cost_work) or [reg.gamma])[0]
        beta0 = cost_work.amin(-1)
        alpha0 = (cost_work - beta0.unsqueeze(-1)).amin(-2)
        x0 = torch.cat([alpha0 + 0.5 * g0 * a_work, beta0 + 0.5 * g0 * b_work], -1)
    else:
        # alpha = 0, beta_j = min_i c_ij + gamma b_j: every column starts with its
        # cheapest row active and (for l2) its exact mass
        beta0 = cost_work.amin(-1) + reg.gamma * b_work
        x0 = torch.cat([torch.zeros(Bsz, R, dtype=work_dtype, device=cost_work.device), beta0], -1)
    if init is not None:
        x0 = init.detach().to(work_dtype).reshape(Bsz, R + K).clone()

    # zero weights: their rows/columns are removed exactly (infinite cost) and
    # their potentials pinned below every active threshold afterwards. Negligible
    # weights (the smallest ones, summing to <= tol/20 per side, e.g. Gaussian
    # tails of 1e-56) are treated as zeros, the rest rescaled to the same mass:
    # they cost at most tol/5 of L1 error but otherwise stall Newton.
    tol_solve = tol
    if solver != "adam" and reg.sparse:
        a_solve, b_solve = _drop_negligible(a_work, tol / 20), _drop_negligible(b_work, tol / 20)
        tol_solve = tol / 2
    else:
        a_solve, b_solve = a_work, b_work
    zr, zc = a_solve == 0, b_solve == 0
    cost_solve = cost_work
    if reg.sparse and (bool(zr.any()) or bool(zc.any())):
        cost_solve = cost_work.masked_fill(zr.unsqueeze(-2) | zc.unsqueeze(-1), math.inf)

    def fun(x):
        obj, grad_alpha, grad_beta, _ = _dual(reg, x[:, :R], x[:, R:], a_solve, b_solve, cost_solve)
        return -obj, torch.cat([grad_alpha, grad_beta], -1), _l1(grad_alpha) + _l1(grad_beta)

    if solver == "newton":
        stages = _gamma_stages(reg, cost_work) if _continue(eps_scaling, init) else []  # warm starts skip it

        def newton(r, x, t):
            return newton_dual(r, x, a_solve, b_solve, cost_solve, t, max_iter)

        x, n_iter, conv, errs = _continued_newton(newton, reg, x0, stages, max(tol_solve, _STAGE_TOL),
                                                  tol_solve, info)
    else:
        if reg.name == "topk" and warm is not None:
            x0 = torch.cat(_from_warm(warm, work_dtype, info), -1)
        x, n_iter, conv, errs = _first_order_run(solver, fun, reg, _topk_dual_compact, x0, tol_solve,
                                                 max_iter, lr, a_solve, b_solve, cost_solve)
    alpha, beta = x[:, :R], x[:, R:]
    if reg.sparse:  # entropic plans are never exactly zero: nothing to pin
        alpha, beta = _pin_zero_weights(alpha, beta, a_solve, b_solve, cost_work)
    _, _, _, T = _dual(reg, alpha, beta, a_work, b_work, cost_work)
    # convergence is judged on the original weights
    conv = (_l1(T.sum(-2) - a_work) + _l1(T.sum(-1) - b_work)) <= tol
    return alpha, beta, T, n_iter, conv, errs


def _topk_warm_start(problem, reg, formulation: str, sparse_axis: str, tol: float, solve_dtype):
    """Top-k by L-BFGS starts from the quadratic solution: if its plan is already k-sparse it
    solves the top-k problem exactly (feasible, and optimal for the convexified problem,
    marked ``solved_as_l2``); otherwise its potentials warm-start L-BFGS."""
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
        warm["solved_as_l2"] = True
        return warm
    warm["time"] = time.perf_counter() - t0
    return warm


def _continued_newton(newton, reg, x0, stages, stage_tol, tol, info):
    """``newton(reg_k, x, tol_k)`` on each gamma-continuation stage (warm-started, loose
    tolerance ``stage_tol``), then on ``reg`` itself to ``tol``."""
    for gamma_k in stages:
        x0 = newton(type(reg)(gamma_k), x0, stage_tol)[0]
    info["gamma_stages"] = len(stages) + 1
    x, n_iter, conv, errs, extra = newton(reg, x0, tol)
    info.update(extra)
    return x, n_iter, conv, errs


def _first_order_run(solver, fun, reg, topk_compact, x0, tol, max_iter, lr, a, b, cost):
    """:func:`_first_order` on ``fun``; for top-k, with the compact O(km) evaluator
    ``topk_compact(gamma, k, x, a, b, cost, workspace)`` (one ``torch.topk`` pass)."""
    fun_k = None
    if reg.name == "topk":
        workspace = torch.empty_like(cost)

        def fun_k(x):
            F, g, _ = topk_compact(reg.gamma, reg.k, x, a, b, cost, workspace)
            return F, g, _l1(g)

    return _first_order(solver, fun, fun_k, x0, tol, max_iter, lr)


def _first_order(solver, fun, fun_topk, x0, tol, max_iter, lr):
    """L-BFGS (top-k: on its compact objective, stopping on patience) or fixed-step Adam."""
    if solver == "lbfgs" and fun_topk is not None:
        return lbfgs(fun_topk, x0, tol, max_iter, patience=_TOPK_PATIENCE)
    if solver == "lbfgs":
        return lbfgs(fun, x0, tol, max_iter)
    return adam(fun, x0, max_iter, lr, tol)


_TOPK_PATIENCE = 15  # top-k L-BFGS: stop after this many iterations without a 1% better error
_WARM_TOL = 1e-3  # marginal tolerance of the quadratic warm start of top-k


def _from_warm(warm, work_dtype, info):
    """Potentials (alpha, beta) of the quadratic warm start (top-k with k = infinity at the
    same gamma): the top-k potentials differ only through the columns where the
    cardinality constraint binds."""
    info["warm_start"] = "l2"
    info["warm_start_time"] = warm["time"]
    return warm["alpha"].to(work_dtype), warm["beta"].to(work_dtype)


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


@numpy_in_out
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
    grad: str = "implicit",
    eps_scaling: bool | str = "auto",
    callback: Callable[[int, float], None] | None = None,
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
        gamma: regularization strength :math:`\gamma > 0` (cost units, summed over the plan).
        k: maximum nonzeros per column (row), only for ``reg="topk"``.
        formulation: ``"semi_dual"`` (exact marginals on the sparse axis, ``n`` variables)
            or ``"dual"`` (``n + m`` variables). Default (``None``): ``"dual"`` for
            ``"l2"`` and ``"entropy"``, ``"semi_dual"`` for ``"topk"`` (module docstring).
        sparse_axis: ``"columns"`` (k sources per target) or ``"rows"`` (k targets per source).
        solver: ``"auto"`` (``"newton"`` for ``"l2"``/``"entropy"``, ``"lbfgs"`` for ``"topk"``,
            after the quadratic solution: module docstring), ``"newton"``, ``"lbfgs"`` or
            ``"adam"`` (``max_iter`` fixed steps at ``lr``).
        tol: L1 marginal-error tolerance :math:`\|T1-a\|_1 + \|T^\top 1-b\|_1`, always
            checked on the original weights (negligible weights: module docstring).
        max_iter: iteration budget (default 300 Newton, 2000 L-BFGS, 20 Adam steps).
        lr: Adam step size.
        solve_dtype: working dtype of ``newton``/``lbfgs`` (``None``: the inputs'; outputs
            follow the inputs' dtype).
        init: warm start: potentials ``(f, g)`` or a previous result, or ``alpha``
            (semi-dual) / ``cat(alpha, beta)`` (dual) in the internal layout.
        normalize, check_inputs: rescale ``a`` and ``b`` to unit mass; run value checks.
        grad: ``"implicit"`` (default: implicit differentiation of the optimality
            conditions, the top-k support held fixed) or ``"envelope"`` (frozen plan).
        eps_scaling: the gamma-continuation of the Newton solvers: ``"auto"`` (unless
            ``init`` is given), ``True`` or ``False``.
        callback: ``callback(check, max_error)`` for every recorded error, after the solve.
        sparse_plan: return ``plan`` as a sparse COO tensor (default: for ``"l2"`` and
            ``"topk"``, decided by ``reg``, never by the data).

    Returns:
        :class:`~entrokit.OTResult` with ``f`` (:math:`\alpha`), ``g`` (:math:`\beta`),
        ``value`` (dual objective; for ``"topk"`` the value of the convexified primal,
        a lower bound of the nonconvex one), ``transport_cost`` :math:`\langle C,T\rangle`,
        ``marginal_error``, ``eps = gamma`` and ``info`` with ``primal_value``,
        ``max_nnz``, ``nnz``, the solver name and time.

    Raises:
        InputError: bad options (``gamma <= 0``, ``k < 1``, unknown names) or data;
            ``TypeError`` for non-tensor inputs or a non-integer ``k``.

    Example:
        >>> import torch, entrokit
        >>> g = torch.Generator().manual_seed(0)
        >>> C = torch.rand(6, 5, generator=g, dtype=torch.float64)
        >>> a, b = torch.full((6,), 1 / 6, dtype=torch.float64), torch.full((5,), 0.2, dtype=torch.float64)
        >>> res = entrokit.smooth_ot(a, b, C, reg="l2", gamma=0.1)
        >>> bool(res.converged), res.plan.is_sparse
        (True, True)
        >>> import warnings
        >>> with warnings.catch_warnings():  # top-k marginals may be unreachable (see above)
        ...     warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        ...     res = entrokit.smooth_ot(a, b, C, reg="topk", gamma=0.1, k=2)
        >>> int((res.plan.to_dense() > 0).sum(0).max()) <= 2
        True
    """
    options = _smooth_options(eps, reg=reg, gamma=gamma, k=k, formulation=formulation, sparse_axis=sparse_axis,
                              solver=solver, tol=tol, max_iter=max_iter, lr=lr, solve_dtype=solve_dtype, grad=grad,
                              eps_scaling=eps_scaling, callback=callback)
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    return _smooth_solve(problem, init=init, sparse_plan=sparse_plan, **options)


def smooth_ot_on_problem(problem: OTProblem, eps=None, *, init=None, sparse_plan=None, **options) -> OTResult:
    """:func:`smooth_ot` on a validated problem (what :func:`entrokit.solve` calls): the
    options are checked here, the problem is not built again."""
    return _smooth_solve(problem, init=init, sparse_plan=sparse_plan, **_smooth_options(eps, **options))


def _smooth_options(eps=None, *, reg="l2", gamma=None, k=None, formulation=None, sparse_axis="columns",
                    solver="auto", tol=1e-6, max_iter=None, lr=1e-2, solve_dtype=torch.float64, grad="implicit",
                    eps_scaling="auto", callback=None) -> dict:
    """The options of :func:`smooth_ot`, checked; ``regul`` is the regularizer object."""
    if gamma is None and eps is None:
        raise InputError("smooth_ot needs gamma, the regularization strength; pass e.g. gamma=0.1.")
    if gamma is not None and eps is not None and float(gamma) != float(eps):
        raise InputError(
            f"gamma={gamma!r} and eps={eps!r} disagree: both name the regularization strength "
            "(solve(method='smooth') passes eps as gamma); pass only one of them."
        )
    gamma = check_positive(gamma if gamma is not None else eps, "gamma")
    regul = make_regularizer(reg, gamma, k)
    if isinstance(reg, Regularizer):
        gamma = regul.gamma
    if formulation is None:
        formulation = "semi_dual" if regul.name == "topk" else "dual"
    check_choice(formulation, "formulation", FORMULATIONS)
    check_choice(sparse_axis, "sparse_axis", _SPARSE_AXES)
    check_choice(solver, "solver", SOLVERS)
    if grad == "unroll":
        raise InputError(
            "grad='unroll' is not available for smooth_ot: its Newton/L-BFGS steps contain "
            "discrete choices (active sets, line search). Use grad='implicit' (the exact "
            "derivative at the solution, default) or 'envelope'."
        )
    check_choice(grad, "grad", ("implicit", "envelope"))
    o = check_solver_options("smooth", eps_scaling=eps_scaling, callback=callback, tol=tol, max_iter=max_iter)
    eps_scaling, tol, max_iter = o["eps_scaling"], o["tol"], o["max_iter"]
    lr = check_positive(lr, "lr")
    if solve_dtype is not None and solve_dtype not in (torch.float32, torch.float64):
        raise InputError(f"solve_dtype must be torch.float64, torch.float32 or None; got {solve_dtype!r}.")
    return dict(regul=regul, gamma=gamma, formulation=formulation, sparse_axis=sparse_axis, solver=solver, tol=tol,
                max_iter=max_iter, lr=lr, solve_dtype=solve_dtype, grad=grad, eps_scaling=eps_scaling,
                callback=callback)


def _smooth_solve(problem: OTProblem, *, regul, gamma, formulation, sparse_axis, solver, tol, max_iter, lr,
                  solve_dtype, grad, eps_scaling, callback, init, sparse_plan) -> OTResult:
    """Solve, assemble the result, report non-convergence."""
    pb = problem.with_batch()
    if init is not None:
        init = _check_init(init, pb, formulation, sparse_axis)
    out = smooth_ot_problem(
        pb, regul, formulation=formulation, sparse_axis=sparse_axis, solver=solver, tol=tol,
        max_iter=max_iter, lr=lr, solve_dtype=solve_dtype, init=init, eps_scaling=eps_scaling,
    )
    res = smooth_result(
        pb, regul, out, formulation=formulation, sparse_axis=sparse_axis, tol=tol,
        sparse_plan=sparse_plan, grad=grad,
    )
    if callback is not None:
        for i, err in enumerate(out["errors"].reshape(out["errors"].shape[0], -1).amax(-1).tolist()):
            callback(i + 1, err)
    if out["solver"] != "adam":
        hint = (
            f"Raise max_iter, loosen tol (now {tol:g}), increase gamma (now {gamma:g})"
            + (", increase k" if regul.name == "topk" else "")
            + (", or try formulation='semi_dual'" if formulation == "dual"
               # the other semi-dual solver than the one that ran (never the same one)
               else ", or try solver='newton'" if out["solver"] == "lbfgs" else ", or try solver='lbfgs'")
            + "."
        )
        warn_not_converged(torch.as_tensor(res.converged).reshape(-1), torch.as_tensor(res.marginal_error).reshape(-1),
                           tol, "smooth_ot", hint)
    return res


def _check_init(init, pb: OTProblem, formulation: str, sparse_axis: str) -> torch.Tensor:
    """Validate ``smooth_ot(init=)``: a finite tensor of the internal layout, ``[R]`` or
    ``[B, R]`` for the semi-dual (``R`` rows of the internal layout) and ``[R + K]`` /
    ``[B, R + K]`` for the dual."""
    n, m = pb.shape
    rows, cols = (n, m) if sparse_axis == "columns" else (m, n)
    size = rows if formulation == "semi_dual" else rows + cols
    what = (f"alpha of length {size}" if formulation == "semi_dual"
            else f"cat(alpha, beta) of length {rows} + {cols} = {size}")
    hint = "e.g. result.info['x'] of a previous smooth_ot call with the same formulation and sparse_axis"
    if hasattr(init, "f") and hasattr(init, "g") and not isinstance(init, (tuple, list, torch.Tensor)):
        init = (init.f, init.g)
    if isinstance(init, (tuple, list)):
        # the common form: potentials (f, g) of the user's layout
        if len(init) != 2 or not all(isinstance(t, torch.Tensor) for t in init):
            raise TypeError(f"init must be a pair of tensors (f, g), an OTResult or a tensor; got {type(init).__name__}.")
        f0, g0 = (t.detach().reshape(-1, t.shape[-1]) for t in init)
        if f0.shape[-1] != n or g0.shape[-1] != m:
            raise InputError(f"init potentials must have {n} and {m} entries, got {f0.shape[-1]} and {g0.shape[-1]}.")
        internal_rows, internal_cols = (f0, g0) if sparse_axis == "columns" else (g0, f0)
        init = internal_rows if formulation == "semi_dual" else torch.cat([internal_rows, internal_cols], -1)
    if not isinstance(init, torch.Tensor):
        raise TypeError(
            f"init must be a torch.Tensor ({what}, formulation={formulation!r}, sparse_axis={sparse_axis!r}); "
            f"got {type(init).__name__}. Pass a tensor, {hint}."
        )
    B = pb.a.shape[0]
    if init.dim() == 0 or init.shape[-1] != size or init.numel() != B * size:
        expected = f"({size},)" if B == 1 else f"({B}, {size})"
        raise InputError(
            f"init has shape {tuple(init.shape)}, but formulation={formulation!r} with "
            f"sparse_axis={sparse_axis!r} expects {what}: shape {expected}. Pass {hint}."
        )
    if not init.is_floating_point():
        raise TypeError(f"init must be a floating-point tensor, got dtype {init.dtype}; pass init.to(a.dtype).")
    if not bool(torch.isfinite(init).all()):
        raise InputError(
            "init contains NaN or inf; expected finite potentials. Pass finite values, " + hint + "."
        )
    return init.reshape(B, size).to(device=pb.a.device)


# entrokit.solve calls this on its validated problem
smooth_ot.__problem_solver__ = smooth_ot_on_problem
