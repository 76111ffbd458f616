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

1. *Warm-up*: log-domain Sinkhorn from zero potentials (or ``init``). ``"sns"`` switches
   adaptively: once the L1 marginal error is below ``switch_tol``, or when Sinkhorn
   stalls (error ratio over 5 iterations above 0.95), or after ``warmup_max_iter``
   iterations (the paper uses a fixed :math:`N_1 = 20`). ``"ssns"`` needs no warm-up
   for convergence; it runs ``warmup_max_iter`` (default 3) cheap Sinkhorn sweeps.
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
  :math:`\|K - K_s\|_2 \le \delta`; the shift :math:`\sigma = \varepsilon\mu
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
:math:`\varepsilon`-continuation: it solves :math:`\varepsilon_k = 4^k\varepsilon`,
from about a tenth of the cost range down, to L1 error :math:`10^{-3}`, each stage
warm-started with the previous potentials :math:`(f, g)` and one Sinkhorn sweep, and
ends at the target :math:`\varepsilon` (``eps_scaling``; schedule in
``info["eps_schedule"]``). The SSNS shift factor :math:`\mu` is capped at
:math:`10^3`. ``"sns"`` additionally doubles its density :math:`\lambda` whenever a
step is damped below 1/4, fails, or 5 steps fail to halve the error
(``info["density_increases"]``).

**Safeguards.** A failed line search (no Armijo step down to :math:`2^{-12}`), a CG
solve that stalls or any non-finite value triggers ``fallback_steps`` Sinkhorn
sweeps instead of the Newton step; the count is reported in
``info["fallbacks"]``. Near convergence, where :math:`\Phi` differences drop below
floating-point resolution, a step is also accepted when it reduces the marginal
error.

**Numerics.** The Newton stage always runs in float64 on a copy of the cost, and the
exponent is clamped at :math:`-700` (no denormals: they are 10x slower and below any
tolerance); the potentials are cast back to the input dtype. Rows or columns with zero
weight are removed from the Newton problem and their potentials are filled in by the
soft :math:`c`-transform, as in :func:`~entrokit.sinkhorn`.

**Cost per Newton iteration.** One dense :math:`O(nm)` pass to form :math:`T`, its
marginals and the objective (the same order as one Sinkhorn iteration), one pass to
select the sparse pattern, and a sparse solve of cost :math:`O(\mathrm{nnz})` per CG
iteration.

**Devices.** Every operation is device-agnostic torch code (gathers and
``index_add_`` for the sparse products); ``linear_solver="direct"`` uses SciPy and runs
on CPU only; ``"auto"`` picks it for CPU tensors and CG elsewhere. The CUDA path is
untested on GPU hardware.

**Batches** are solved problem by problem (each has its own Newton path and
iteration count); ``n_iter`` and ``converged`` are per problem.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import check_choice, check_positive, check_positive_int
from entrokit.problem import log_weights, make_problem
from entrokit.solvers._entropic import entropic_result, warn_not_converged
from entrokit.solvers._newton_linalg import (
    schur_solve,
    sparse_adjoint_solve,
    threshold_density,
    threshold_safe,
)
from entrokit.solvers.sinkhorn import _check_init

__all__ = ["sinkhorn_newton", "sns", "ssns", "NEWTON_VARIANTS"]

NEWTON_VARIANTS = ("ssns", "sns")
_LINEAR_SOLVERS = ("auto", "cg", "direct")
_GRADS = ("envelope", "implicit", "unroll")
_MIN_EXP = -700.0  # exp(-700) ~ 1e-304: smallest exponent kept out of the denormal range


class _Dual:
    """The dual objective of one problem on its support, in float64."""

    def __init__(self, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float):
        self.C, self.a, self.b, self.eps = C, a, b, eps
        self.log_a, self.log_b = a.log(), b.log()

    def plan(self, al: torch.Tensor, be: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        T = torch.empty_like(self.C) if out is None else out
        torch.sub(al.unsqueeze(1), self.C, out=T)
        T.add_(be.unsqueeze(0)).mul_(1.0 / self.eps).clamp_(_MIN_EXP, -_MIN_EXP).exp_()
        return T

    def evaluate(self, al, be, out=None):
        """Return ``(T, r, c, phi, err)`` at ``(al, be)``."""
        T = self.plan(al, be, out)
        r, c = T.sum(1), T.sum(0)
        phi = float(torch.dot(self.a, al) + torch.dot(self.b, be) - self.eps * r.sum())
        err = float((r - self.a).abs().sum() + (c - self.b).abs().sum())
        return T, r, c, phi, err

    def sinkhorn_sweep(self, al, be, T, c):
        """One Sinkhorn iteration (column then row scaling) from the plan ``T`` at
        ``(al, be)`` with column sums ``c``: one exponential pass. Returns the new
        ``(al, be, T, r, c, phi, err)``; ``T`` is overwritten."""
        eps = self.eps
        be = be + eps * (self.log_b - c.log())  # column update: T^T 1 = b
        T = self.plan(al, be, T)
        r = T.sum(1)
        al = al + eps * (self.log_a - r.log())  # row update: T 1 = a
        T.mul_((self.a / r).unsqueeze(1))
        c = T.sum(0)
        r = self.a
        phi = float(torch.dot(self.a, al) + torch.dot(self.b, be) - eps * self.a.sum())
        err = float((c - self.b).abs().sum())
        return al, be, T, r, c, phi, err


class _Run:
    """Histories and counters shared by the stages of one solve."""

    def __init__(self, t_start: float, callback):
        self.t_start, self.callback = t_start, callback
        self.obj: list[float] = []
        self.err: list[float] = []
        self.time: list[float] = []
        self.phase: list[str] = []
        self.steps = 0  # Newton steps + fallback rounds, all stages (the max_iter budget)
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


def _newton_stage(dual: _Dual, al, be, run: _Run, opt: dict, tol: float, stall_check: bool):
    """Newton iterations on ``dual`` from ``(al, be)`` until the L1 error is <= ``tol``.

    Returns ``(al, be, err, status)`` with status ``"converged"``, ``"budget"``,
    ``"timeout"`` or ``"stalled"`` (only with ``stall_check``: four poor steps, i.e.
    accepted step sizes below 1/4 or fallbacks, mean the iterate is far outside the
    region where the quadratic model is good).
    """
    eps, a, b, info = dual.eps, dual.a, dual.b, run.info
    variant, lin = opt["variant"], opt["linear_solver"]
    T, r, c, phi, err = dual.evaluate(al, be)
    T_try = torch.empty_like(T)
    mu, density = opt["mu0"], opt["density"]
    dy_prev = None
    poor = 0
    err_mark, steps_mark = err, 0  # SNS: progress since the last density change
    while err > tol:
        if run.steps >= opt["max_iter"]:
            return al, be, err, "budget"
        if opt["deadline"] is not None and time.perf_counter() > opt["deadline"]:
            info["timed_out"] = True
            return al, be, err, "timeout"
        if stall_check and poor >= 4:
            return al, be, err, "stalled"
        run.steps += 1
        gx, gy = a - r, b - c
        gnorm = float(torch.sqrt(gx.dot(gx) + gy.dot(gy)))
        if variant == "ssns":
            sp = threshold_safe(T, r, c, opt["nu"] * gnorm)
            shift = eps * mu * gnorm
        else:
            sp = threshold_density(T, r, c, density)
            shift = 1e-10 * float(r.max())
        rtol = min(opt["cg_rtol_max"], max(opt["cg_rtol"], err))
        dx, dy, cg_it, ok = schur_solve(
            sp, eps * gx, eps * gy, shift, method=lin, rtol=rtol, max_iter=opt["cg_max_iter"], y0=dy_prev,
        )
        info["cg_iters"].append(cg_it)
        info["density"].append(sp.density)
        info["shift"].append(shift)
        step_ok = False
        if ok:
            slope = float(gx.dot(dx) + gy.dot(dy))  # > 0: ascent direction
            t = 1.0
            while t >= opt["min_step"] and slope > 0:
                al_t, be_t = al + t * dx, be + t * dy
                T_t, r_t, c_t, phi_t, err_t = dual.evaluate(al_t, be_t, T_try)
                gain = phi_t - phi
                # Armijo (SNS Alg. 1 line 7); near the optimum, where differences of Phi
                # fall below its rounding error, a decrease of the error is accepted
                if math.isfinite(phi_t) and math.isfinite(err_t) and (
                    gain >= opt["c1"] * t * slope or (err < 1e-4 and err_t < err)
                ):
                    step_ok = True
                    break
                t *= 0.5
            if step_ok and variant == "ssns":
                # trust-region ratio of actual to predicted increase adapts the shift
                Kx, Ky = sp.hess_mv(dx, dy, 0.0)
                curv = float(dx.dot(Kx) + dy.dot(Ky)) / eps
                pred = t * slope - 0.5 * t * t * curv
                rho = gain / pred if pred > 0 else 1.0
                if rho < 0.25:
                    mu = min(4.0 * mu, opt["mu_max"])
                elif rho > 0.75:
                    mu = max(0.5 * mu, opt["mu_min"])
        else:
            info["cg_failures"] += 1
        if step_ok:
            al, be = al_t, be_t
            T, T_try = T_t, T
            r, c, phi, err = r_t, c_t, phi_t, err_t
            dy_prev = dy if lin == "cg" else None
            info["step_size"].append(t)
            run.record(phi, err, "newton")
            steps_mark += 1
            if t < 0.25:
                poor += 1
            # SNS: a damped step, or less than a halving of the error over 5 steps,
            # means the sparsified Hessian is too coarse: keep twice as many entries
            if variant == "sns" and density < 1.0 and (t < 0.25 or (steps_mark >= 5 and err > 0.5 * err_mark)):
                density = min(1.0, 2.0 * density)
                info["density_increases"] += 1
                err_mark, steps_mark = err, 0
            elif steps_mark >= 5:
                err_mark, steps_mark = err, 0
            continue
        # fallback: damp harder / densify and take Sinkhorn sweeps instead of the step
        if ok:
            info["line_search_failures"] += 1
        info["fallbacks"] += 1
        poor += 1
        mu = min(4.0 * mu, opt["mu_max"])
        if variant == "sns" and density < 1.0:
            density = min(1.0, 2.0 * density)
            info["density_increases"] += 1
        dy_prev = None
        for _ in range(opt["fallback_steps"]):
            al, be, T, r, c, phi, err = dual.sinkhorn_sweep(al, be, T, c)
            run.record(phi, err, "sinkhorn")
            if err <= tol:
                break
    return al, be, err, "converged"


def _solve_one(C, a, b, eps, al, be, opt: dict, t_start: float):
    """Warm-up + Newton (+ eps-continuation if Newton stalls) on one problem with
    positive weights. Returns ``(al, be, err, n_iter, info)``."""
    run = _Run(t_start, opt["callback"])
    info = run.info
    tol, variant = opt["tol"], opt["variant"]
    dual = _Dual(C, a, b, eps)

    # -- warm-up: log-domain Sinkhorn with an adaptive switch -----------------------
    n_warm = 0
    T, r, c, phi, err = dual.evaluate(al, be)
    if opt["init_given"]:
        run.record(phi, err, "init")
    while err > tol and n_warm < opt["warmup_max_iter"]:
        al, be, T, r, c, phi, err = dual.sinkhorn_sweep(al, be, T, c)
        n_warm += 1
        run.record(phi, err, "sinkhorn")
        if err <= opt["switch_tol"]:
            break
        if variant == "sns" and n_warm >= 6 and err > 0.95 * run.err[-6]:
            break  # stalled: Sinkhorn's linear rate has degraded, switch to Newton
    info["n_warmup"] = n_warm
    del T

    # -- Newton stage at the target eps ------------------------------------------------
    schedule = _continuation_schedule(C, eps, opt) if opt["eps_scaling"] != "off" else []
    status = "converged"
    if err > tol:
        if opt["eps_scaling"] == "on" and schedule:
            status = "stalled"
        else:
            al, be, err, status = _newton_stage(dual, al, be, run, opt, tol, stall_check=bool(schedule))
    # -- eps-continuation: far from the optimum at small eps the quadratic model is
    # poor (Newton steps are damped to a few percent); solve a sequence eps_k = 4^k eps
    # to a loose error, each warm-started from the previous, then the target eps.
    if status == "stalled":
        log_a, log_b = a.log(), b.log()
        e_prev = eps
        stage_tol = max(tol, opt["stage_tol"] * float(a.sum()))
        for e_k in schedule + [eps]:
            info["eps_schedule"].append(e_k)
            al = al + (e_k - e_prev) * log_a  # same potentials f = al - eps log a
            be = be + (e_k - e_prev) * log_b
            e_prev = e_k
            d_k = dual if e_k == eps else _Dual(C, a, b, e_k)
            T, r, c, phi, err = d_k.evaluate(al, be)
            al, be, T, r, c, phi, err = d_k.sinkhorn_sweep(al, be, T, c)
            run.record(phi, err, "sinkhorn")
            del T
            al, be, err, status = _newton_stage(
                d_k, al, be, run, opt, tol if e_k == eps else stage_tol, stall_check=False
            )
            if status in ("budget", "timeout"):
                break
        if e_prev != eps:  # stopped inside a continuation stage: back to the target eps
            al = al + (eps - e_prev) * log_a
            be = be + (eps - e_prev) * log_b
            T, r, c, phi, err = dual.evaluate(al, be)
            al, be, T, r, c, phi, err = dual.sinkhorn_sweep(al, be, T, c)  # renormalise
            run.record(phi, err, "sinkhorn")
            del T
    n_newton = sum(1 for p in run.phase if p == "newton")
    n_sink = sum(1 for p in run.phase if p == "sinkhorn")
    info["n_newton"], info["n_sinkhorn"] = n_newton, n_sink
    info["status"] = status
    info.update(objective=run.obj, marginal_error=run.err, time=run.time, phase=run.phase)
    return al, be, err, n_sink + n_newton, info


def _continuation_schedule(C: torch.Tensor, eps: float, opt: dict) -> list[float]:
    """Decreasing ``eps * 4^k`` (k >= 1) from about a tenth of the cost range down to
    ``4 eps`` (empty when eps is already that large)."""
    span = float(C.max() - C.min())
    top = 0.1 * span
    out = []
    e = eps * 4.0
    while e <= top:
        out.append(e)
        e *= 4.0
    if out and out[-1] < top / 2:
        out.append(top)
    return out[::-1]


def _fill_potentials(C, a, b, eps, al, be, ia, ib):
    """Full-size f, g (float64): f = al - eps log a on the support, soft c-transform
    elsewhere (rows/columns of zero weight)."""
    n, m = C.shape
    f = torch.empty(n, dtype=C.dtype, device=C.device)
    g = torch.empty(m, dtype=C.dtype, device=C.device)
    f[ia] = al - eps * a[ia].log()
    g[ib] = be - eps * b[ib].log()
    log_a, log_b = log_weights(a), log_weights(b)
    if len(ia) < n:
        rest = torch.ones(n, dtype=torch.bool, device=C.device)
        rest[ia] = False
        Z = (g.unsqueeze(0) + eps * log_b.unsqueeze(0) - C[rest]) / eps
        f[rest] = -eps * torch.logsumexp(Z, 1)
    if len(ib) < m:
        rest = torch.ones(m, dtype=torch.bool, device=C.device)
        rest[ib] = False
        Z = (f.unsqueeze(1) + eps * log_a.unsqueeze(1) - C[:, rest]) / eps
        g[rest] = -eps * torch.logsumexp(Z, 0)
    return f, g


class _SparseImplicit(torch.autograd.Function):
    """Implicit-function-theorem gradients of the potentials (see
    :mod:`entrokit.solvers.implicit`), with the adjoint system solved by
    :func:`~entrokit.solvers._newton_linalg.sparse_adjoint_solve` (the Newton stage's
    sparse Hessian + Schur-complement CG / direct solver) in float64."""

    @staticmethod
    def forward(ctx, f, g, eps, geom, linear_solver, a, b, *geom_tensors):
        ctx.eps, ctx.geom, ctx.linear_solver = eps, geom, linear_solver
        ctx.save_for_backward(f, g, a, b, *geom_tensors)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, gf, gg):
        f, g, a, b, *gt = ctx.saved_tensors
        eps = ctx.eps
        gf = torch.zeros_like(f) if gf is None else gf
        gg = torch.zeros_like(g) if gg is None else gg
        needs = ctx.needs_input_grad[5:]
        if not any(needs):
            return (None,) * (7 + len(gt))
        with torch.no_grad():
            geom_d = ctx.geom.rebuild(*[t.detach() for t in gt])
            P = geom_d.plan(f, g, a.detach(), b.detach(), eps).to(torch.float64)
            lam_f = torch.empty_like(f, dtype=torch.float64)
            lam_g = torch.empty_like(g, dtype=torch.float64)
            for k in range(P.shape[0]):
                lam_f[k], lam_g[k], _ = sparse_adjoint_solve(
                    P[k], gf[k].to(torch.float64), gg[k].to(torch.float64), eps, method=ctx.linear_solver
                )
            lam_f, lam_g = lam_f.to(f.dtype), lam_g.to(g.dtype)
        leaves = [t.detach().requires_grad_(need) for t, need in zip([a, b, *gt], needs)]
        with torch.enable_grad():
            geom = ctx.geom.rebuild(*leaves[2:])
            row, col, _ = geom.plan_reduce(f, g, leaves[0], leaves[1], eps)
            H = torch.cat([row - leaves[0], col - leaves[1]], -1)  # optimality residual
            lam = torch.cat([lam_f, lam_g], -1)
            wanted = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad(H, wanted, grad_outputs=-lam, allow_unused=True)
        it = iter(grads)
        out = [next(it) if t.requires_grad else None for t in leaves]
        return (None, None, None, None, None, *out)


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
    eps_scaling: bool | None = None,
    time_limit: float | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad: str = "envelope",
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
        cost: cost ``[n, m]`` / ``[B, n, m]`` or a geometry (point clouds are
            materialised: the Newton stage needs the dense plan).
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
            (sparse LU through SciPy, CPU) or ``"auto"`` (direct on CPU, CG otherwise).
        cg_rtol: floor of the CG relative tolerance; the tolerance used at each step
            is :math:`\min(10^{-2}, \max(\texttt{cg\_rtol}, \text{error}))` (inexact
            Newton with a superlinear forcing term).
        cg_max_iter: CG iteration cap per Newton step (default :math:`\max(200, m)`).
        fallback_steps: Sinkhorn sweeps taken when a Newton step fails.
        eps_scaling: :math:`\varepsilon`-continuation. ``None`` (default): automatic,
            Newton starts at the target ``eps`` and switches to continuation only if it
            stalls (four poor steps: accepted step sizes below 1/4 or fallbacks);
            ``True``: always; ``False``: never. The schedule is
            :math:`\varepsilon_k = 4^k\varepsilon` from about a tenth of the cost range
            down, each stage solved to L1 error :math:`10^{-3}` and warm-started with the
            previous potentials (``info["eps_schedule"]``).
        time_limit: optional wall-clock budget in seconds (the run stops with
            ``converged=False`` and ``info["timed_out"]=True``).
        init: warm start ``(f, g)``.
        grad: ``"envelope"`` (default) or ``"implicit"`` (implicit function theorem,
            see :mod:`entrokit.solvers.implicit`; its adjoint system is solved with the
            Newton stage's sparse Hessian and Schur-complement solver
            (``linear_solver``) plus iterative refinement against the exact Hessian,
            :func:`~entrokit.solvers._newton_linalg.sparse_adjoint_solve`). ``"unroll"`` raises
            :class:`~entrokit.InputError`: Newton iterations contain discrete choices
            (sparsity pattern, line search) and run on detached float64 copies, so there is
            no graph to unroll; at convergence ``"implicit"`` gives the exact derivative
            that unrolling would approach.
        normalize: rescale ``a`` and ``b`` to unit mass.
        check_inputs: run value checks on the inputs.
        callback: ``callback(iteration, error)`` after every iteration (single problems
            and each problem of a batch in turn).

    Returns:
        :class:`~entrokit.OTResult` with ``method="sns"`` or ``"ssns"``; ``n_iter`` counts
        Sinkhorn (warm-up and fallback) plus Newton iterations. ``info`` holds, per
        problem (lists for batches), the histories ``objective``, ``marginal_error``,
        ``time`` (seconds since the start) and ``phase`` of every iteration, plus
        ``n_warmup``, ``n_newton``, ``n_sinkhorn``, ``cg_iters``, ``density``,
        ``step_size``, ``shift``, ``fallbacks``, ``line_search_failures``,
        ``cg_failures``, ``density_increases`` (SNS), ``eps_schedule`` (the
        continuation stages actually run, empty if none) and ``status``
        (``"converged"``, ``"budget"``, ``"timeout"``).

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
    tol = check_positive(tol, "tol")
    check_choice(variant, "variant", NEWTON_VARIANTS)
    check_choice(linear_solver, "linear_solver", _LINEAR_SOLVERS)
    check_choice(grad, "grad", _GRADS)
    if grad == "unroll":
        raise InputError(
            "grad='unroll' is not available for the Newton solvers: their steps contain "
            "discrete choices (sparsity pattern, line search) and run on detached float64 "
            "copies. Use grad='implicit' (exact derivative at the solution) or 'envelope', "
            "or method='sinkhorn' with grad='unroll'."
        )
    max_iter = check_positive_int(max_iter, "max_iter", allow_none=True) or 200
    if eps_scaling is None:
        eps_scaling = "auto"
    elif eps_scaling is True or eps_scaling is False:
        eps_scaling = "on" if eps_scaling else "off"
    else:
        raise InputError(
            f"eps_scaling must be None (automatic), True or False, got {eps_scaling!r}."
        )
    if warmup_max_iter is None:
        warmup_max_iter = 20 if variant == "sns" else 3
    elif isinstance(warmup_max_iter, bool) or not isinstance(warmup_max_iter, int) or warmup_max_iter < 0:
        raise InputError(f"warmup_max_iter must be an int >= 0, got {warmup_max_iter!r}.")
    switch_tol = check_positive(switch_tol, "switch_tol") if switch_tol is not None else (
        1e-2 if variant == "sns" else 0.5
    )
    if density is not None:
        density = check_positive(density, "density")
        if density > 1:
            raise InputError(f"density must lie in (0, 1], got {density!r}; the paper uses 2/n.")
    cg_rtol = check_positive(cg_rtol, "cg_rtol")
    if cg_max_iter is not None:
        check_positive_int(cg_max_iter, "cg_max_iter")
    fallback_steps = check_positive_int(fallback_steps, "fallback_steps")
    if time_limit is not None:
        time_limit = check_positive(time_limit, "time_limit")
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    user_batched = problem.batched
    pb = problem.with_batch()
    if init is not None:
        init = _check_init(init, pb)
    dtype, device = pb.a.dtype, pb.a.device
    if linear_solver == "auto":
        linear_solver = "cg"
    elif linear_solver == "direct" and device.type != "cpu":
        raise InputError(
            f"linear_solver='direct' runs on CPU only (SciPy), but the inputs are on {device}; "
            "use linear_solver='cg' (or 'auto')."
        )

    t0 = time.perf_counter()
    geom = pb.geometry.detach()
    Cb = geom.cost_matrix().to(torch.float64)
    A, Bw = pb.a.detach().to(torch.float64), pb.b.detach().to(torch.float64)
    nb = A.shape[0]
    fs, gs, n_iter, conv, errs, infos = [], [], [], [], [], []
    for k in range(nb):
        C, ak, bk = Cb[k], A[k], Bw[k]
        ia, ib = (ak > 0).nonzero().squeeze(1), (bk > 0).nonzero().squeeze(1)
        full = len(ia) == ak.numel() and len(ib) == bk.numel()
        Cs = C if full else C[ia][:, ib].contiguous()
        a_s, b_s = ak[ia], bk[ib]
        if init is not None:
            al0 = init[0][k].detach().to(torch.float64)[ia] + eps * a_s.log()
            be0 = init[1][k].detach().to(torch.float64)[ib] + eps * b_s.log()
        else:
            al0 = torch.zeros_like(a_s)
            be0 = torch.zeros_like(b_s)
        n_s, m_s = Cs.shape
        opt = dict(
            tol=tol, variant=variant, callback=callback, init_given=init is not None,
            warmup_max_iter=warmup_max_iter, switch_tol=switch_tol,
            density=density if density is not None else min(1.0, 2.0 / min(n_s, m_s)),
            max_iter=max_iter, linear_solver=linear_solver, cg_rtol=cg_rtol, cg_rtol_max=1e-2,
            cg_max_iter=cg_max_iter or max(200, m_s), fallback_steps=fallback_steps,
            mu0=1.0, mu_min=1e-3, mu_max=1e3, nu=1e-2, eps_scaling=eps_scaling, stage_tol=1e-3, c1=1e-4, min_step=2.0 ** -12,
            deadline=None if time_limit is None else t0 + time_limit,
        )
        al, be, err, it, info = _solve_one(Cs, a_s, b_s, eps, al0, be0, opt, time.perf_counter())
        f, g = _fill_potentials(C, ak, bk, eps, al, be, ia, ib)
        fs.append(f)
        gs.append(g)
        n_iter.append(it)
        conv.append(err <= tol)
        errs.append(info["marginal_error"])
        infos.append(info)
    f = torch.stack(fs).to(dtype)
    g = torch.stack(gs).to(dtype)
    L = max(1, max(len(e) for e in errs))
    err_hist = torch.tensor(
        [[(e[i] if i < len(e) else (e[-1] if e else float("nan"))) for e in errs] for i in range(L)],
        dtype=dtype, device=device,
    )
    n_iter_t = torch.tensor(n_iter, dtype=torch.long, device=device)
    conv_t = torch.tensor(conv, dtype=torch.bool, device=device)
    info_out = infos[0] if not user_batched else {
        key: [inf.get(key) for inf in infos] for key in infos[0]
    }
    info_out = dict(info_out)
    info_out["linear_solver"] = linear_solver
    info_out["total_time"] = time.perf_counter() - t0
    core_grad = grad
    if grad == "implicit":
        # attach the sparse-Hessian adjoint; the builder then passes (f, g) through as is
        f, g = _SparseImplicit.apply(
            f, g, eps, pb.geometry, linear_solver, pb.a, pb.b, *pb.geometry.tensors()
        )
        core_grad = "unroll"
    res = entropic_result(
        pb, f, g, eps, grad=core_grad, n_iter=n_iter_t, converged=conv_t, errors=err_hist,
        method=variant, user_batched=user_batched, info=info_out,
    )
    if grad == "implicit":
        res = dataclasses.replace(res, grad="implicit")
    warn_not_converged(
        conv_t, torch.tensor([e[-1] if e else float("nan") for e in errs]), tol, variant,
        f"Raise max_iter (now {max_iter}) or time_limit, loosen tol, or increase eps (now {eps:g}); "
        "with variant='sns' try variant='ssns'.",
    )
    return res


def sns(a, b, cost, eps, **options) -> OTResult:
    """:func:`sinkhorn_newton` with ``variant="sns"`` (``entrokit.solve(method="sns")``)."""
    return sinkhorn_newton(a, b, cost, eps, variant="sns", **options)


def ssns(a, b, cost, eps, **options) -> OTResult:
    """:func:`sinkhorn_newton` with ``variant="ssns"`` (``entrokit.solve(method="ssns")``)."""
    return sinkhorn_newton(a, b, cost, eps, variant="ssns", **options)
