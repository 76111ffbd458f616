r"""Newton-accelerated Sinkhorn: SNS (Tang et al., ICLR 2024) and a safe variant (SSNS).

Both solvers maximise the concave entropic dual (the Lyapunov potential of Sinkhorn).
With log-scalings :math:`\alpha = f + \varepsilon\log a`, :math:`\beta = g + \varepsilon
\log b` and :math:`T_{ij} = \exp((\alpha_i+\beta_j-C_{ij})/\varepsilon)` it reads

.. math::

    \Phi(\alpha,\beta) = \langle a,\alpha\rangle + \langle b,\beta\rangle
        - \varepsilon\sum_{ij} T_{ij},\qquad
    \nabla\Phi = (a - T\mathbf 1,\; b - T^\top\mathbf 1),\qquad
    \nabla^2\Phi = -\varepsilon^{-1}\begin{pmatrix}\mathrm{diag}(T\mathbf 1) & T\\
        T^\top & \mathrm{diag}(T^\top\mathbf 1)\end{pmatrix} .

The gradient is the marginal violation, so the L1 marginal error is
:math:`\|\nabla\Phi\|_1`. The Hessian is negative semidefinite with the gauge
direction :math:`(\mathbf 1, -\mathbf 1)` in its null space (SNS paper, Sec. 3, with
the sign fixed). Sinkhorn is exact block-coordinate ascent on :math:`\Phi`.

**Algorithm** (both variants):

1. *Warm-up*: the library's Sinkhorn loop (:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`,
   no eps-scaling) from ``init`` or from the exact :math:`\varepsilon\to 0`
   c-transforms :math:`f_i = \min_j C_{ij}`, :math:`g_j = \min_i(C_{ij} - f_i)` (every row
   and column of the first plan then holds an entry :math:`a_ib_j`, whatever the cost
   scale). It stops once the L1 marginal error is below ``switch_tol``, after
   ``warmup_max_iter`` iterations (``"sns"``: the paper's :math:`N_1 = 20`, checked every
   5 iterations; ``"ssns"`` needs no warm-up for convergence and runs at most 3,
   checking the exact error of the plan after each), or, for ``"sns"``, when Sinkhorn
   stalls (error ratio over 5 iterations above 0.95).
2. *Newton stage* in float64: sparsify the coupling block of the Hessian (the exact
   diagonal is kept), solve :math:`(K_s + \sigma I)\,d = \varepsilon\nabla\Phi` by the
   Schur complement on the column block (Jacobi-PCG, or a sparse direct factorisation
   on CPU), then backtrack :math:`\alpha_k \in \{1, \tfrac12, \tfrac14, \dots\}` until the
   Armijo condition :math:`\Phi(z + \alpha_k d) \ge \Phi(z) + c_1\alpha_k\nabla\Phi^\top d`
   holds (SNS Alg. 1, lines 5-8).

* ``"sns"``: keep the :math:`\lceil\lambda nm\rceil` largest entries of :math:`T`
  (``density`` :math:`\lambda`, default :math:`2/n` as in the paper; plus each row's
  maximum) and a tiny shift :math:`\sigma = 10^{-10}\max_i r_i` that only removes the
  gauge null space.
* ``"ssns"`` (the idea of Tang, Qiu et al., NeurIPS 2024): the sparsification drops
  every entry below :math:`\delta/\max(n,m)` with :math:`\delta = \nu\|\nabla\Phi\|_2`,
  so each row and column loses at most :math:`\delta` of mass and
  :math:`\|K - K_s\|_2 \le \delta`; the shift :math:`\sigma = (\varepsilon/\Delta C)\,\mu
  \|\nabla\Phi\|_2` makes :math:`K_s + \sigma I` positive definite, and :math:`\mu` is
  adapted by the ratio :math:`\rho` of actual to predicted increase (increase
  :math:`\mu` (at most :math:`10^3`) when :math:`\rho < 1/4`, decrease when :math:`\rho > 3/4`). Both the density
  and the shift therefore adapt to the residual: large and damped far from the
  optimum, vanishing near it, which gives global convergence and a locally quadratic
  rate without tuning.

**Globalisation at small** :math:`\varepsilon`. Far from the optimum the quadratic
model of :math:`\Phi` is poor when :math:`\varepsilon` is small (its curvature changes by
a factor :math:`e` per :math:`\varepsilon` of potential), so Newton steps are damped to a
few percent; this happens on W1 grid problems, whose OT solution is not unique. After
four poor steps (accepted step below 1/4, or a fallback) the solver switches to
:math:`\varepsilon`-continuation: it solves a geometric sequence :math:`\varepsilon_k`
(equal jumps of at most 4, from a twentieth of the cost range down,
:func:`~entrokit.solvers._numerics.continuation_schedule`) to L1 error :math:`10^{-3}`,
each stage warm-started with the previous potentials :math:`(f, g)` and three Sinkhorn
iterations, and ends at the target :math:`\varepsilon` (``eps_scaling``; schedule in
``info["eps_schedule"]``). The SSNS shift factor :math:`\mu` is capped at
:math:`10^3`. ``"sns"`` additionally doubles its density :math:`\lambda` whenever a
step is damped below 1/4, fails, or 5 steps fail to halve the error
(``info["density_increases"]``).

**Safeguards.** A failed line search (no Armijo step down to :math:`2^{-12}`), a CG
solve that stalls or any non-finite value triggers ``fallback_steps`` Sinkhorn
iterations (again :func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`) instead of the
Newton step; the count is reported in
``info["fallbacks"]``. Near convergence, where :math:`\Phi` differences drop below
floating-point resolution, a step is also accepted when it reduces the marginal
error.

**Numerics.** The Newton stage always runs in float64 on a copy of the cost (for a point
cloud, online or not, the cost of its points in float64: a float32 rounding of
:math:`\|x-y\|^2` alone moves the marginals by about :math:`10^{-7}\,C/\varepsilon`). Exponents
are floored at :func:`~entrokit.geometry.exp_floor` (no denormals: they are 10x slower
and far below any tolerance) and never clamped from above (an overflow is a rejected
step, not a truncated plan). The potentials are cast back to the input dtype. Rows or
columns with zero weight are removed from the Newton problem and their potentials are
filled in by the soft :math:`c`-transform of the geometry, as in :func:`~entrokit.sinkhorn`.

**Certification.** ``converged=True`` only if the plan
:math:`P_{ij} = a_ib_je^{(f_i+g_j-C_{ij})/\varepsilon}` of the *returned* potentials, as
the result materialises it and recomputed in float64, meets both marginals to ``tol``
(L1) and :math:`\langle C, P\rangle` equals ``transport_cost`` (the one result builder,
:mod:`entrokit.solvers._entropic`). The plan is formed from the float64 potentials of the
Newton stage and rounded to the input dtype, so float32 results keep float64 accuracy;
``marginal_error`` is the certified error.

**Inexact Newton.** The CG tolerance of each step is
:math:`\eta = \min(10^{-2}, \max(\texttt{cg\_rtol}, e, 0.1\,\texttt{tol}/e))` at L1 error
:math:`e`: the forcing term :math:`O(e)` keeps the quadratic rate, and the last step is
solved no tighter than it needs, since it reaches about :math:`\eta e + O(e^2)`.

**Cost per Newton iteration.** One dense :math:`O(nm)` pass to form :math:`T`, its
marginals and the objective (the same order as one Sinkhorn iteration), one pass to
select the sparse pattern, and a sparse solve of cost :math:`O(\mathrm{nnz})` per CG
iteration.

**Devices.** Every operation is device-agnostic torch code (gathers and
``index_add_`` for the sparse products); the Schur systems are solved by
:func:`~entrokit.solvers._numerics.solve_bipartite`: ``linear_solver="direct"`` uses
SciPy and runs on CPU only; ``"auto"`` is CG (warm-started from the previous step, the
fastest choice in ``benchmarks/bench_newton.py``). The CUDA path is
untested on GPU hardware.

**Diagnostics.** ``info`` holds, per problem (lists for batches), the histories
``objective``, ``marginal_error``, ``time`` (seconds since the start) and ``phase`` of
every iteration, plus ``n_warmup``, ``n_newton``, ``n_sinkhorn``, ``cg_iters``,
``density``, ``step_size``, ``shift``, ``fallbacks``, ``line_search_failures``,
``cg_failures``, ``density_increases`` (SNS), ``eps_schedule`` (the continuation stages
actually run, empty if none) and ``status`` (``"converged"``, ``"budget"``,
``"timeout"``).

**Batches** are solved problem by problem (each has its own Newton path and
iteration count); ``n_iter`` and ``converged`` are per problem.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from typing import Any, Callable

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._threads import small_problem_threads
from entrokit._validation import check_positive, check_solver_options
from entrokit.geometry import DenseCost, exp_floor
from entrokit.problem import OTProblem, log_weights, make_problem
from entrokit.solvers._entropic import entropic_result, warn_not_converged
from entrokit.solvers._newton_linalg import schur_solve, threshold_density, threshold_safe
from entrokit.solvers._numerics import armijo_backtracking, continuation_schedule
from entrokit.solvers.sinkhorn import SinkhornOptions, check_init, sinkhorn_problem

__all__ = ["sinkhorn_newton", "newton_result", "newton_problem", "sns", "ssns", "NEWTON_VARIANTS"]

NEWTON_VARIANTS = ("ssns", "sns")
_GRADS = ("envelope", "implicit", "unroll")
_EXP_FLOOR = exp_floor(torch.float64)
_STAGE_SINKHORN = 3  # Sinkhorn iterations that start each eps-continuation stage


class _Dual:
    """The dual objective of one problem on its support (positive weights), in float64,
    in the log-scalings :math:`\\alpha = f + \\varepsilon\\log a`, :math:`\\beta = g +
    \\varepsilon\\log b`, for which the plan :math:`T = e^{(\\alpha+\\beta-C)/\\varepsilon}`
    is :math:`P` itself."""

    def __init__(self, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, cost_range: float):
        self.C, self.a, self.b, self.eps = C, a, b, eps
        self.log_a, self.log_b = a.log(), b.log()
        # eps relative to the cost range: makes the SSNS shift invariant to the cost scale
        self.relative_eps = eps / max(cost_range, eps)
        self.cost_range = cost_range
        self.problem = OTProblem(a.unsqueeze(0), b.unsqueeze(0), DenseCost(C.unsqueeze(0)))
        self._neg_C_over_eps = C * (-1.0 / eps)  # the plan's exponent in 4 passes, not 5

    def plan(self, alpha: torch.Tensor, beta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        T = torch.empty_like(self.C) if out is None else out
        inv = 1.0 / self.eps
        torch.add(self._neg_C_over_eps, (alpha * inv).unsqueeze(1), out=T)
        # floored (no denormals), never clamped above: an overflow must show as inf
        T.add_((beta * inv).unsqueeze(0)).clamp_(min=_EXP_FLOOR).exp_()
        return T

    def evaluate(self, alpha, beta, out=None):
        """Return ``(T, r, c, phi, err)`` at ``(alpha, beta)``: plan, its marginals, the dual
        objective and the L1 marginal error (module docstring)."""
        T = self.plan(alpha, beta, out)
        r, c = T.sum(1), T.sum(0)
        phi = float(torch.dot(self.a, alpha) + torch.dot(self.b, beta) - self.eps * r.sum())
        err = float((r - self.a).abs().sum() + (c - self.b).abs().sum())
        return T, r, c, phi, err

    def sinkhorn(self, alpha, beta, max_iter: int, tol: float):
        """Up to ``max_iter`` iterations of the library's Sinkhorn loop from ``(alpha,
        beta)`` (``None``: Sinkhorn's own exact eps -> 0 c-transform start), stopping at L1
        error ``tol``; returns ``(alpha, beta, iterations)``."""
        eps = self.eps
        init = None if alpha is None else (
            (alpha - eps * self.log_a).unsqueeze(0), (beta - eps * self.log_b).unsqueeze(0)
        )
        options = SinkhornOptions(tol=tol, max_iter=max_iter, eps_scaling=False, check_every=1)
        f, g, n_iter, _, _, _ = sinkhorn_problem(self.problem, eps, options, init=init)
        return f[0] + eps * self.log_a, g[0] + eps * self.log_b, int(n_iter[0])


class _Run:
    """Histories and counters shared by the stages of one solve (one history entry per
    Newton step and per Sinkhorn run)."""

    def __init__(self, t_start: float, callback):
        self.t_start, self.callback = t_start, callback
        self.obj: list[float] = []
        self.err: list[float] = []
        self.time: list[float] = []
        self.phase: list[str] = []
        self.steps = 0  # Newton steps + fallback rounds, all stages (the max_iter budget)
        self.n_sinkhorn = 0  # Sinkhorn iterations (warm-up, stage starts, fallbacks)
        self.info: dict[str, Any] = {
            "fallbacks": 0, "line_search_failures": 0, "cg_failures": 0, "density_increases": 0,
            "cg_iters": [], "density": [], "step_size": [], "shift": [], "eps_schedule": [],
        }

    def record(self, phi: float, err: float, phase: str) -> None:
        self.obj.append(phi)
        self.err.append(err)
        self.time.append(time.perf_counter() - self.t_start)
        self.phase.append(phase)
        if self.callback is not None:
            self.callback(len(self.err), err)

    def sinkhorn(self, dual: _Dual, alpha, beta, max_iter: int, tol: float, out=None):
        """Sinkhorn iterations, recorded; returns ``(alpha, beta, T, r, c, phi, err)``."""
        alpha, beta, k = dual.sinkhorn(alpha, beta, max_iter, tol)
        self.n_sinkhorn += k
        T, r, c, phi, err = dual.evaluate(alpha, beta, out)
        self.record(phi, err, "sinkhorn")
        return alpha, beta, T, r, c, phi, err


def _line_search(dual: _Dual, state, dx, dy, slope: float, out, opt: dict):
    r"""Armijo backtracking on :math:`-\Phi` from ``state = (alpha, beta, T, r, c, err, phi)``
    along ``(dx, dy)`` (SNS Alg. 1, lines 5-8: :math:`\Phi(z + t d) \ge \Phi(z) + c_1 t
    \nabla\Phi^\top d`); returns ``(accepted, t, state at the step)``."""
    alpha, beta, err, phi = state[0], state[1], state[5], state[6]

    def trial(t):
        t = float(t)
        alpha_t, beta_t = alpha + t * dx, beta + t * dy
        T_t, r_t, c_t, phi_t, err_t = dual.evaluate(alpha_t, beta_t, out)
        return torch.tensor([-phi_t], dtype=torch.float64), (alpha_t, beta_t, T_t, r_t, c_t, err_t, phi_t)

    def error_decrease(F_t, state_t):
        # near the optimum, where differences of Phi fall below its rounding error, a
        # decrease of the marginal error is accepted as well
        return torch.tensor([err < 1e-4 and state_t[5] < err])

    search = armijo_backtracking(
        trial, torch.tensor([-phi], dtype=torch.float64), torch.tensor([-slope], dtype=torch.float64),
        state, torch.ones(1, dtype=torch.bool), c1=opt["c1"], max_backtracks=opt["max_backtracks"],
        also_accept=error_decrease,
    )
    return bool(search.accepted[0]), float(search.step[0]), search.state


def _adapt_shift(mu: float, coupling, dx, dy, eps: float, t: float, slope: float, gain: float, opt: dict) -> float:
    r"""SSNS: the trust-region ratio :math:`\rho` of actual to predicted increase adapts the
    shift factor :math:`\mu` (up 4x below 1/4, down 2x above 3/4)."""
    Kx, Ky = coupling.hess_mv(dx, dy, 0.0)
    curv = float(dx.dot(Kx) + dy.dot(Ky)) / eps
    pred = t * slope - 0.5 * t * t * curv
    rho = gain / pred if pred > 0 else 1.0
    if rho < 0.25:
        return min(4.0 * mu, opt["mu_max"])
    if rho > 0.75:
        return max(0.5 * mu, opt["mu_min"])
    return mu


def _newton_stage(dual: _Dual, alpha, beta, run: _Run, opt: dict, tol: float, stall_check: bool, evaluated=None):
    """Newton iterations on ``dual`` from ``(alpha, beta)`` until the L1 error is <= ``tol``;
    ``evaluated``: ``dual.evaluate(alpha, beta)`` if the caller already has it.

    Returns ``(alpha, beta, err, status)`` with status ``"converged"``, ``"budget"``,
    ``"timeout"`` or ``"stalled"`` (only with ``stall_check``: four poor steps, i.e.
    accepted step sizes below 1/4 or fallbacks, mean the iterate is far outside the
    region where the quadratic model is good).
    """
    eps, a, b, info = dual.eps, dual.a, dual.b, run.info
    safe = opt["variant"] == "ssns"
    linear_solver = opt["linear_solver"]
    T, r, c, phi, err = dual.evaluate(alpha, beta) if evaluated is None else evaluated
    T_trial = torch.empty_like(T)
    mu, density = opt["mu0"], opt["density"]
    dy_prev = None
    poor = 0
    err_mark, steps_mark = err, 0  # SNS: progress since the last density change
    while err > tol:
        if run.steps >= opt["max_iter"]:
            return alpha, beta, err, "budget"
        if opt["deadline"] is not None and time.perf_counter() > opt["deadline"]:
            info["timed_out"] = True
            return alpha, beta, err, "timeout"
        if stall_check and poor >= 4:
            return alpha, beta, err, "stalled"
        run.steps += 1
        gx, gy = a - r, b - c  # gradient of Phi
        gnorm = float(torch.sqrt(gx.dot(gx) + gy.dot(gy)))
        if safe:
            coupling = threshold_safe(T, r, c, opt["nu"] * gnorm)
            shift = dual.relative_eps * mu * gnorm  # eps mu |grad| for a cost range of 1
        else:
            coupling = threshold_density(T, r, c, density)
            shift = 1e-10 * float(r.max())
        # inexact Newton: forcing term O(err) (quadratic rate), but no tighter than the last
        # step needs: from error err, residual eta reaches about eta*err + O(err^2) <= tol
        rtol = min(opt["cg_rtol_max"], max(opt["cg_rtol"], err, 0.1 * tol / err))
        dx, dy, cg_it, ok = schur_solve(
            coupling, eps * gx, eps * gy, shift, method=linear_solver, rtol=rtol,
            max_iter=opt["cg_max_iter"], y0=dy_prev,
        )
        info["cg_iters"].append(cg_it)
        info["density"].append(coupling.density)
        info["shift"].append(shift)
        slope = float(gx.dot(dx) + gy.dot(dy)) if ok else 0.0  # > 0: ascent direction
        step_ok = False
        if ok and slope > 0:
            step_ok, t, state = _line_search(dual, (alpha, beta, T, r, c, err, phi), dx, dy, slope, T_trial, opt)
            if step_ok:
                alpha_t, beta_t, T_t, r_t, c_t, err_t, phi_t = state
                if safe:
                    mu = _adapt_shift(mu, coupling, dx, dy, eps, t, slope, phi_t - phi, opt)
        elif not ok:
            info["cg_failures"] += 1
        if step_ok:
            alpha, beta = alpha_t, beta_t
            T, T_trial = T_t, T
            r, c, phi, err = r_t, c_t, phi_t, err_t
            dy_prev = dy if linear_solver == "cg" else None
            info["step_size"].append(t)
            run.record(phi, err, "newton")
            steps_mark += 1
            if t < 0.25:
                poor += 1
            # SNS: a damped step, or less than a halving of the error over 5 steps,
            # means the sparsified Hessian is too coarse: keep twice as many entries
            if not safe and density < 1.0 and (t < 0.25 or (steps_mark >= 5 and err > 0.5 * err_mark)):
                density = min(1.0, 2.0 * density)
                info["density_increases"] += 1
                err_mark, steps_mark = err, 0
            elif steps_mark >= 5:
                err_mark, steps_mark = err, 0
            continue
        # fallback: damp harder / densify and take Sinkhorn iterations instead of the step
        if ok:
            info["line_search_failures"] += 1
        info["fallbacks"] += 1
        poor += 1
        mu = min(4.0 * mu, opt["mu_max"])
        if not safe and density < 1.0:
            density = min(1.0, 2.0 * density)
            info["density_increases"] += 1
        dy_prev = None
        alpha, beta, T, r, c, phi, err = run.sinkhorn(dual, alpha, beta, opt["fallback_steps"], tol, out=T)
    return alpha, beta, err, "converged"


def _solve_one(C, a, b, eps, cost_range, alpha, beta, opt: dict, t_start: float):
    """Warm-up + Newton (+ eps-continuation if Newton stalls) on one problem with
    positive weights, from ``(alpha, beta)`` or, when they are ``None``, from the exact
    eps -> 0 c-transforms. Returns ``(alpha, beta, err, n_iter, info)``."""
    run = _Run(t_start, opt["callback"])
    info = run.info
    tol = opt["tol"]
    dual = _Dual(C, a, b, eps, cost_range)

    # -- warm-up: Sinkhorn until the error is below switch_tol ---------------------------
    switch = max(tol, opt["switch_tol"])
    # "sns" also switches when Sinkhorn stalls: error ratio over 5 iterations above 0.95.
    # "ssns" checks the exact error of the evaluated plan after every iteration (Sinkhorn's
    # own check reads the plan before the last column update and would cost an iteration).
    sns_variant = opt["variant"] == "sns"
    chunk = 5 if sns_variant else 1
    evaluated = None  # dual.evaluate at the current (alpha, beta), handed to Newton
    if alpha is None and opt["warmup_max_iter"] > 0:
        err = math.inf  # Sinkhorn starts from the c-transforms itself
    else:
        if alpha is None:
            f, g = _c_transform_start(C)
            alpha, beta = f + eps * dual.log_a, g + eps * dual.log_b
        evaluated = dual.evaluate(alpha, beta)
        err = evaluated[4]
        if opt["init_given"]:
            run.record(evaluated[3], err, "init")
    while err > switch and run.n_sinkhorn < opt["warmup_max_iter"]:
        err_before = err
        k = min(chunk, opt["warmup_max_iter"] - run.n_sinkhorn)
        alpha, beta, *evaluated = run.sinkhorn(dual, alpha, beta, k, switch)
        err = evaluated[4]
        if sns_variant and err > 0.95 * err_before:
            break
    info["n_warmup"] = run.n_sinkhorn

    # -- Newton stage at the target eps ------------------------------------------------
    schedule = _continuation_stages(cost_range, eps) if opt["eps_scaling"] != "off" else []
    status = "converged"
    if err > tol:
        if opt["eps_scaling"] == "on" and schedule:
            status = "stalled"
        else:
            alpha, beta, err, status = _newton_stage(
                dual, alpha, beta, run, opt, tol, stall_check=bool(schedule), evaluated=evaluated
            )
    # -- eps-continuation: far from the optimum at small eps the quadratic model is
    # poor (Newton steps are damped to a few percent); solve a decreasing sequence of
    # eps to a loose error, each warm-started from the previous, then the target eps.
    if status == "stalled":
        e_prev = eps
        stage_tol = max(tol, opt["stage_tol"] * float(a.sum()))
        for e_k in schedule + [eps]:
            info["eps_schedule"].append(e_k)
            alpha = alpha + (e_k - e_prev) * dual.log_a  # same potentials f = alpha - eps log a
            beta = beta + (e_k - e_prev) * dual.log_b
            e_prev = e_k
            dual_k = dual if e_k == eps else _Dual(C, a, b, e_k, cost_range)
            alpha, beta, *_ = run.sinkhorn(dual_k, alpha, beta, _STAGE_SINKHORN, 0.0)
            alpha, beta, err, status = _newton_stage(
                dual_k, alpha, beta, run, opt, tol if e_k == eps else stage_tol, stall_check=False
            )
            if status in ("budget", "timeout"):
                break
        if e_prev != eps:  # stopped inside a continuation stage: back to the target eps
            alpha = alpha + (eps - e_prev) * dual.log_a
            beta = beta + (eps - e_prev) * dual.log_b
            alpha, beta, _, _, _, _, err = run.sinkhorn(dual, alpha, beta, 1, 0.0)  # renormalise
    n_newton = sum(1 for p in run.phase if p == "newton")
    info["n_newton"], info["n_sinkhorn"] = n_newton, run.n_sinkhorn
    info["status"] = status
    info.update(objective=run.obj, marginal_error=run.err, time=run.time, phase=run.phase)
    return alpha, beta, err, run.n_sinkhorn + n_newton, info


def _continuation_stages(cost_range: float, eps: float) -> list[float]:
    """Intermediate eps of the continuation: geometric, jumps of at most 4, from a twentieth
    of the cost range (:func:`~entrokit.solvers._numerics.continuation_schedule`), target
    excluded; empty when the target is within a factor 4 of that start."""
    return continuation_schedule(eps, 0.05 * cost_range, 0.25, even=True)[:-1]


def _c_transform_start(C: torch.Tensor):
    """The exact eps -> 0 c-transforms f_i = min_j C_ij, g_j = min_i (C_ij - f_i): every row
    and column of the plan a_i b_j exp((f_i + g_j - C_ij)/eps) holds an entry a_i b_j."""
    f = C.amin(1)
    return f, (C - f.unsqueeze(1)).amin(0)


def _fill_potentials(C, a, b, eps, f_support, g_support, ia, ib):
    """Full-size f, g (float64): the support's potentials, and the geometry's soft
    c-transform for rows/columns of zero weight (as in Sinkhorn)."""
    n, m = C.shape
    f = torch.zeros(n, dtype=C.dtype, device=C.device)
    g = torch.zeros(m, dtype=C.dtype, device=C.device)
    f[ia], g[ib] = f_support, g_support
    log_a, log_b = log_weights(a), log_weights(b)  # -inf on zero weights: excluded below
    if len(ia) < n:
        rest = torch.ones(n, dtype=torch.bool, device=C.device)
        rest[ia] = False
        f[rest] = DenseCost(C[rest].unsqueeze(0)).softmin(g.unsqueeze(0), log_b.unsqueeze(0), eps, axis=1)[0]
    if len(ib) < m:
        rest = torch.ones(m, dtype=torch.bool, device=C.device)
        rest[ib] = False
        g[rest] = DenseCost(C[:, rest].unsqueeze(0)).softmin(f.unsqueeze(0), log_a.unsqueeze(0), eps, axis=0)[0]
    return f, g


@small_problem_threads
def sinkhorn_newton(
    a: torch.Tensor,
    b: torch.Tensor,
    cost,
    eps: float,
    *,
    variant: str = "ssns",
    tol: float = 1e-8,
    max_iter: int | None = None,
    warmup_max_iter: int | None = None,
    switch_tol: float | None = None,
    density: float | None = None,
    linear_solver: str = "auto",
    cg_rtol: float = 1e-10,
    cg_max_iter: int | None = None,
    fallback_steps: int = 10,
    eps_scaling: bool | str | None = "auto",
    time_limit: float | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad: str = "implicit",
    normalize: bool = False,
    check_inputs: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> OTResult:
    r"""Entropic OT by Sinkhorn warm-up + sparse Newton (SNS) or safe sparse Newton (SSNS).

    Solves :math:`\min_{P\in U(a,b)}\langle C,P\rangle + \varepsilon\,\mathrm{KL}(P\|a\otimes
    b)` through its dual; see the module docstring for the algorithm and the math.

    Args:
        a: source weights ``[n]`` or ``[B, n]`` (nonnegative, zeros allowed).
        b: target weights ``[m]`` or ``[B, m]``.
        cost: cost ``[n, m]`` / ``[B, n, m]`` or a geometry (point clouds, online ones
            too, are materialised in float64 from their points: the Newton stage needs the
            dense plan).
        eps: regularization :math:`\varepsilon > 0` (RegOT's ``reg``, POT's ``reg``; the
            SNS paper's :math:`1/\eta`).
        variant: ``"ssns"`` (default: safe, adaptive, no tuning) or ``"sns"`` (the paper's
            algorithm: fixed-density sparsification, Armijo, adaptive warm-up switch).
        tol: stop when the L1 marginal error :math:`\|P\mathbf 1-a\|_1 + \|P^\top\mathbf
            1-b\|_1 \le` ``tol``.
        max_iter: budget of Newton iterations over all stages (fallback Sinkhorn
            rounds count as one each); default 200.
        warmup_max_iter: cap on Sinkhorn warm-up iterations (default 20 for ``"sns"``,
            3 for ``"ssns"``).
        switch_tol: warm-up stops once the marginal error is below this (default
            ``1e-2`` for ``"sns"``; ``"ssns"`` uses ``0.5``).
        density: SNS target density :math:`\lambda` of the sparsified coupling block
            (default :math:`2/\min(n,m)`, the paper's :math:`2/n`).
        linear_solver: ``"cg"`` (matrix-free Jacobi-PCG, any device), ``"direct"``
            (sparse LU through SciPy, CPU) or ``"auto"`` (CG) for the Newton systems
            (:func:`~entrokit.solvers._numerics.solve_bipartite`).
        cg_rtol: floor of the CG relative tolerance :math:`\eta` (module docstring,
            *Inexact Newton*).
        cg_max_iter: CG iteration cap per Newton step (default :math:`\max(200, m)`).
        fallback_steps: Sinkhorn iterations taken when a Newton step fails.
        eps_scaling: :math:`\varepsilon`-continuation (module docstring, *Globalisation*):
            ``"auto"`` (default; ``None`` too) only once Newton stalls, ``True`` always,
            ``False`` never (``info["eps_schedule"]``).
        time_limit: optional wall-clock budget in seconds (the run stops with
            ``converged=False`` and ``info["timed_out"]=True``).
        init: warm start ``(f, g)``.
        grad: ``"implicit"`` (default: exact gradients of every output, as for Sinkhorn,
            :mod:`entrokit.solvers.implicit`) or ``"envelope"``. ``"unroll"`` raises
            :class:`~entrokit.InputError`: the steps contain discrete choices and run on
            detached float64 copies; ``"implicit"`` is the derivative unrolling approaches.
        normalize: rescale ``a`` and ``b`` to unit mass.
        check_inputs: run value checks on the inputs.
        callback: ``callback(iteration, error)`` after every iteration (single problems
            and each problem of a batch in turn).

    Returns:
        :class:`~entrokit.OTResult` with ``method="sns"`` or ``"ssns"``; ``n_iter`` counts
        Sinkhorn (warm-up and fallback) plus Newton iterations; ``info`` as in the module
        docstring (*Diagnostics*).

    Raises:
        InputError: bad options or inputs (see :func:`~entrokit.sinkhorn`).
        TypeError: non-tensor inputs.

    Example:
        >>> import torch, entrokit
        >>> g = torch.Generator().manual_seed(0)
        >>> C = torch.rand(50, 50, generator=g, dtype=torch.float64)
        >>> a = torch.full((50,), 1 / 50, dtype=torch.float64)
        >>> res = entrokit.sinkhorn_newton(a, a, C, eps=1e-2)
        >>> bool(res.marginal_error < 1e-8)
        True
    """
    eps = check_positive(eps, "eps")
    options = check_solver_options(
        variant if variant in NEWTON_VARIANTS else "ssns", variant=variant, tol=tol, max_iter=max_iter,
        warmup_max_iter=warmup_max_iter, switch_tol=switch_tol, density=density, linear_solver=linear_solver,
        cg_rtol=cg_rtol, cg_max_iter=cg_max_iter, fallback_steps=fallback_steps, eps_scaling=eps_scaling,
        time_limit=time_limit, grad=grad, callback=callback,
    )
    _refuse_unroll(grad)
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    return newton_result(problem, eps, init=init, **options)


def _refuse_unroll(grad: str) -> None:
    if grad == "unroll":
        raise InputError(
            "grad='unroll' is not available for the Newton solvers: their steps contain "
            "discrete choices (sparsity pattern, line search) and run on detached float64 "
            "copies. Use grad='implicit' (exact derivative at the solution) or 'envelope', "
            "or method='sinkhorn' with grad='unroll'."
        )


def newton_result(problem: OTProblem, eps: float, *, variant: str = "ssns", tol: float = 1e-8, grad: str = "implicit",
                  init=None, **options) -> OTResult:
    """:func:`sinkhorn_newton` on a validated problem with checked options
    (:data:`~entrokit._validation.SOLVER_OPTIONS`): what :func:`sinkhorn_newton`,
    :func:`entrokit.solve` and the divergence call after their one boundary check."""
    _refuse_unroll(grad)
    problem.geometry.check_grad_mode(grad, problem.a, problem.b)
    pb = problem.with_batch()
    if init is not None:
        init = check_init(init, pb)
    f, g, n_iter, converged, errors, info = newton_problem(pb, eps, variant=variant, tol=tol, init=init, **options)
    # certified by the builder on the returned plan (float64 sums); it warns when the plan
    # misses tol although the Newton stage reached it
    res = entropic_result(
        pb, f, g, eps, grad=grad, n_iter=n_iter, converged=converged, errors=errors,
        method=variant, tol=tol, info=info, user_problem=problem,
    )
    warn_not_converged(
        converged, errors[-1].to(torch.float64), tol, variant,
        f"Raise max_iter (now {info['max_iter']}) or time_limit, loosen tol, or increase eps (now {eps:g}); "
        "with variant='sns' try variant='ssns'"
        + ("; float32 potentials may not carry the solution to this tol, use float64."
           if pb.dtype != torch.float64 else "."),
    )
    return res


def _newton_options(o: dict, device: torch.device) -> dict:
    """The defaults that depend on the variant and the device, from the options ``o``."""
    if o["linear_solver"] == "direct" and device.type != "cpu":
        raise InputError(
            f"linear_solver='direct' runs on CPU only (SciPy), but the inputs are on {device}; "
            "use linear_solver='cg' (or 'auto')."
        )
    sns_variant = o["variant"] == "sns"
    return dict(
        tol=o["tol"], variant=o["variant"], max_iter=o["max_iter"] or 200,
        warmup_max_iter=(20 if sns_variant else 3) if o["warmup_max_iter"] is None else o["warmup_max_iter"],
        switch_tol=(1e-2 if sns_variant else 0.5) if o["switch_tol"] is None else o["switch_tol"],
        linear_solver="cg" if o["linear_solver"] == "auto" else o["linear_solver"],
        eps_scaling={True: "on", False: "off"}.get(o["eps_scaling"], "auto"),
        cg_rtol_max=1e-2, mu0=1.0, mu_min=1e-3, mu_max=1e3, nu=1e-2, stage_tol=1e-3,
        c1=1e-4, max_backtracks=12,  # smallest step 2^-12
    )


#: the solver options of :func:`sinkhorn_newton` and their defaults (its signature is the one
#: place they are written; the internal entry points fill in the options they are not given)
_OPTION_DEFAULTS = {
    name: p.default for name, p in inspect.signature(sinkhorn_newton).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("init", "grad", "normalize", "check_inputs")
}


def newton_problem(pb: OTProblem, eps: float, *, init: tuple[torch.Tensor, torch.Tensor] | None = None, **options):
    """Run SNS/SSNS on a validated, *batched* problem, problem by problem; returns
    ``(f, g, n_iter, converged, errors, info)`` like
    :func:`~entrokit.solvers.sinkhorn.sinkhorn_problem` (float64 potentials, the Newton
    stage's precision: the result builder forms the plan from them and rounds it to the
    input dtype, so float32 plans keep float64 accuracy).

    ``options`` are solver options of :func:`sinkhorn_newton`, already checked
    (:func:`~entrokit._validation.check_solver_options`); those not given take its defaults."""
    unknown = sorted(options.keys() - _OPTION_DEFAULTS.keys())
    if unknown:
        raise TypeError(f"newton_problem got unknown option(s) {unknown}; its options are {sorted(_OPTION_DEFAULTS)}.")
    o = {**_OPTION_DEFAULTS, **options}
    tol, time_limit, density, callback = o["tol"], o["time_limit"], o["density"], o["callback"]
    dtype, device = pb.a.dtype, pb.a.device
    base = _newton_options(o, device)
    t0 = time.perf_counter()
    base["deadline"] = None if time_limit is None else t0 + time_limit
    # the float64 cost of the geometry (a float32 point cloud's exact cost, the one the
    # result is certified on, not its float32 rounding: 1e-6 relative off at cost/eps ~ 300)
    geom = pb.geometry
    cost64 = (geom.to_dtype(torch.float64) if geom.dtype != torch.float64 else geom.detach()).cost_matrix()
    cost_ranges = pb.geometry.cost_range().tolist()
    a64, b64 = pb.a.detach().to(torch.float64), pb.b.detach().to(torch.float64)
    fs, gs, n_iter, final_errors, histories, infos = [], [], [], [], [], []
    for k in range(a64.shape[0]):
        C, a_k, b_k = cost64[k], a64[k], b64[k]
        ia, ib = (a_k > 0).nonzero().squeeze(1), (b_k > 0).nonzero().squeeze(1)
        full = len(ia) == a_k.numel() and len(ib) == b_k.numel()
        C_support = C if full else C[ia][:, ib].contiguous()
        a_s, b_s = a_k[ia], b_k[ib]
        alpha0 = beta0 = None
        if init is not None:
            alpha0 = init[0][k].detach().to(torch.float64)[ia] + eps * a_s.log()
            beta0 = init[1][k].detach().to(torch.float64)[ib] + eps * b_s.log()
        n_s, m_s = C_support.shape
        opt = dict(
            base, callback=callback, init_given=init is not None,
            density=density if density is not None else min(1.0, 2.0 / min(n_s, m_s)),
            cg_rtol=o["cg_rtol"], cg_max_iter=o["cg_max_iter"] or max(200, m_s), fallback_steps=o["fallback_steps"],
        )
        alpha, beta, err, it, info = _solve_one(
            C_support, a_s, b_s, eps, float(cost_ranges[k]), alpha0, beta0, opt, time.perf_counter()
        )
        f, g = _fill_potentials(C, a_k, b_k, eps, alpha - eps * a_s.log(), beta - eps * b_s.log(), ia, ib)
        fs.append(f)
        gs.append(g)
        n_iter.append(it)
        final_errors.append(err)
        histories.append(info["marginal_error"] or [err])
        infos.append(info)
    L = max(1, max(len(e) for e in histories))
    err_hist = torch.tensor(
        [[(e[i] if i < len(e) else (e[-1] if e else float("nan"))) for e in histories] for i in range(L)],
        dtype=dtype, device=device,
    )
    n_iter_t = torch.tensor(n_iter, dtype=torch.long, device=device)
    # provisional; certified on the returned plan by the result builder
    conv_t = torch.tensor([e <= tol for e in final_errors], dtype=torch.bool, device=device)
    info_out = dict(infos[0] if pb.user_batch_shape in (None, ()) else {key: [inf.get(key) for inf in infos]
                                                                        for key in infos[0]})
    info_out["linear_solver"] = base["linear_solver"]
    info_out["max_iter"] = base["max_iter"]
    info_out["total_time"] = time.perf_counter() - t0
    return torch.stack(fs), torch.stack(gs), n_iter_t, conv_t, err_hist, info_out


def sns(a, b, cost, eps, **options) -> OTResult:
    """:func:`sinkhorn_newton` with ``variant="sns"`` (``entrokit.solve(method="sns")``)."""
    return sinkhorn_newton(a, b, cost, eps, variant="sns", **options)


def ssns(a, b, cost, eps, **options) -> OTResult:
    """:func:`sinkhorn_newton` with ``variant="ssns"`` (``entrokit.solve(method="ssns")``)."""
    return sinkhorn_newton(a, b, cost, eps, variant="ssns", **options)


# entrokit.solve checks options against the option spec (SOLVER_OPTIONS) and calls these
# on its validated problem
sns.__wrapped_solver__ = ssns.__wrapped_solver__ = sinkhorn_newton
sns.__problem_solver__ = functools.partial(newton_result, variant="sns")
ssns.__problem_solver__ = functools.partial(newton_result, variant="ssns")
