r"""Log-domain (stabilized) Sinkhorn with eps-scaling, warm starts and batch masking.

Solves, for each problem of a batch,

.. math::

    \min_{P \in U(a,b)} \langle C, P\rangle + \varepsilon\,\mathrm{KL}(P\|a\otimes b)
    \;=\; \max_{f,g}\ \langle a, f\rangle + \langle b, g\rangle
        - \varepsilon \sum_{ij} a_i b_j \big(e^{(f_i+g_j-C_{ij})/\varepsilon} - 1\big)

by alternating exact maximisation in ``f`` and ``g`` (the soft c-transforms)

.. math::

    f_i \leftarrow -\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},\qquad
    g_j \leftarrow -\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon}.

Two numerically equivalent engines run these updates:

* **stabilized kernel** (dense costs, default): potentials are kept in the log domain
  and *absorbed* into a kernel :math:`K_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}`
  (Schmitzer, 2019); between absorptions the updates are the scalings
  :math:`u \leftarrow 1/(K (b\odot v))`, :math:`v \leftarrow 1/(K^\top (a\odot u))`, two
  matrix-vector products per iteration, i.e. two passes over :math:`n m` numbers: the
  memory-bandwidth bound. Scalings are re-absorbed when :math:`|\log u|` or
  :math:`|\log v|` grows large, and any overflow falls back to the pure log-domain engine.
* **log-sum-exp** (online point clouds, ``unroll`` gradients, and fallback): every update
  is a stable log-sum-exp over the cost, computed in chunks for online geometries.

**Stopping rule.** After a ``g``-update the column marginal is exact, so the error is the
L1 row-marginal error :math:`\|P\mathbf 1 - a\|_1` (the L1 error of both marginals),
evaluated every ``check_every`` iterations from quantities the update already computed
(no extra pass, and no device sync in between). One problem on the CPU kernel engine
tests it at every iteration (an O(n) dot product on the mat-vec it needs anyway) and
stops at the first iteration that meets it; its full check (overflow, absorption,
history) runs every 10 iterations.

**Certification without an extra pass.** A float64 dense solve that stops on its own test
returns the row sums :math:`a\odot u\odot K(b\odot v)` and column sums
:math:`b\odot v\odot K^\top(a\odot u)` of its last iteration as the certified marginals
(they are the plan's, to :math:`10^{-16}\,\|C\|_\infty/\varepsilon` relative, checked
against ``tol`` by :mod:`entrokit.solvers._entropic`), and :math:`\langle C, P\rangle` in
one blocked pass over ``K`` and ``C``.

**Initialisation.** Without ``init`` the potentials start at the exact
:math:`\varepsilon \to 0` c-transforms :math:`f_i = \min_j C_{ij}`,
:math:`g_j = \min_i (C_{ij} - f_i)`, so every row and column of the first kernel holds an
entry equal to 1 and nothing underflows, whatever :math:`\varepsilon`. The dense engine
forms :math:`f`, the kernel :math:`e^{(f_i - C_{ij})/\varepsilon}` and the first column
update :math:`g = -\varepsilon\log(K^\top a)` (the soft c-transform of :math:`f`) in one
blocked pass over ``C`` while that update stays within the absorption threshold, and reuses
the kernel buffer of the previous CPU solve (up to 32 MiB; fresh memory costs a page fault
per 4 KiB).

**eps-scaling.** With ``eps_scaling=True`` the solver runs a geometric schedule
:math:`\varepsilon_k = \max(\varepsilon, \varepsilon_0 \rho^k)` starting from the cost
range :math:`\varepsilon_0 = \max C - \min C`, warm-starting each stage from the last;
intermediate stages stop at a loose tolerance. ``"auto"`` (default, when no ``init`` is
given and :math:`\varepsilon < \varepsilon_0/50`) first solves at the target
:math:`\varepsilon`; once 20 iterations have run, if the observed linear rate predicts
more than :math:`\max(200, 4k)` further iterations (``k`` done so far), it restarts with
the schedule. Random dense costs converge fast from the c-transform start and keep it;
costs with geometric structure (grids, point clouds) at small :math:`\varepsilon` switch,
which saves 20-40% of the iterations in our measurements.

**Why it may not converge.** Small ``eps`` relative to the cost range needs many
iterations (the contraction rate degrades like :math:`1 - e^{-\|C\|_\infty/\varepsilon}`);
float32 cannot reach tolerances below about ``1e-6 * n``. Remedies: raise ``max_iter``,
loosen ``tol``, use float64, keep eps-scaling on, or use the Newton solvers.

**Float32 point clouds** are solved for the exact cost of their points: the float32 loop
runs first, then :func:`sinkhorn` continues in float64 on the float64 points from its
potentials until ``tol`` (``info["float64_finish"]`` iterations, about ten at cost/eps =
300), since rounding :math:`\|x-y\|^2` to float32 alone moves the marginals by about
:math:`10^{-7}\,C/\varepsilon`. Not with ``grad="unroll"`` (its graph is the float32 loop).

**Online point clouds** (squared Euclidean, :math:`d \le 3`, ``eps_scaling="auto"``,
:math:`\varepsilon` below 1/50 of the cost range) start from
:func:`~entrokit.solvers.multiscale.multiscale_sinkhorn`'s potentials. Where their plan on
the whole cloud already meets ``tol`` (the certificate every result gets: one pass of
float64 sums), that is the result, and no online loop runs; ``n_iter`` then counts the
start's truncated iterations and ``info["multiscale_start"]`` is set. No certificate is
tried where ``tol`` lies below the error that rounding the start's potentials to the
cloud's dtype leaves (:data:`~entrokit.solvers.multiscale.ROUNDING_FLOOR`). Otherwise the loop
goes on from them: a float32 cloud whose start met ``tol`` on its kept pairs goes straight
to the float64 finish. As for every float32 result, the certificate sums in float64 the
plan rounded to float32, so ``marginal_error`` is the returned plan's own.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from entrokit._errors import ConvergenceWarning, InputError
from entrokit._result import OTResult, SinkhornInfo
from entrokit._threads import compiling as _compiling
from entrokit._threads import cost_entries, small_problem_threads, solver_threads
from entrokit._validation import as_float_tensor, check_positive, check_solver_options
from entrokit.geometry import Geometry
from entrokit.problem import OTProblem, log_weights, make_problem
from entrokit.solvers._entropic import entropic_result, warn_not_converged
from entrokit.solvers._io import numpy_in_out
from entrokit.solvers._numerics import continuation_schedule

__all__ = ["sinkhorn", "sinkhorn_result", "sinkhorn_problem", "SinkhornOptions", "eps_schedule"]


@dataclass(frozen=True)
class SinkhornOptions:
    """Numerical options of the Sinkhorn solver (see :func:`sinkhorn`)."""

    tol: float = 1e-6
    max_iter: int = 10_000
    eps_scaling: bool | str = "auto"
    scaling_decay: float = 0.5
    stage_tol: float = 1e-2
    check_every: int | None = None
    lse_mode: bool | None = None
    fixed_iter: bool = False
    symmetric: bool = False
    stop_when_slow: bool = False


def eps_schedule(eps: float, eps0: float, decay: float) -> list[float]:
    """The annealing stages from ``eps0`` down to ``eps`` (the library's one continuation
    rule, :func:`~entrokit.solvers._numerics.continuation_schedule`)."""
    return continuation_schedule(eps, eps0, decay)


class _LogEngine:
    r"""Log-sum-exp updates through the geometry's soft-min (works online and under
    autograd). Same interface as the geometry's scaling engine.

    With ``symmetric`` (a problem with ``b = a`` and a symmetric cost, the self-terms of
    a Sinkhorn divergence), the update is the averaged fixed-point iteration
    :math:`f \leftarrow \tfrac12(f + T_\varepsilon(f))`, ``g = f`` (Feydy et al., 2019,
    Alg. 3.4), which converges without the oscillation of the plain symmetric update.
    """

    def __init__(self, geom: Geometry, a, b, log_a, log_b, symmetric: bool = False):
        self.geom, self.a, self.log_a, self.log_b = geom, a, log_a, log_b
        self.symmetric = symmetric

    def start(self, f, g, eps, sweep: bool = True, cold: bool = False):
        self.f, self.g, self.eps = f, g, eps
        # whether g is the soft c-transform of f (the plan's columns exact): only then is the
        # row error the plan's whole marginal error; a start from given potentials is not
        self._cols_exact = False
        self._f_next = None  # the row update of the current g, when a check has formed it

    def run(self, k: int, active: torch.Tensor | None, stop_tol: float | None = None):
        f, g, eps, geom = self.f, self.g, self.eps, self.geom
        if self.symmetric:
            for _ in range(k):
                t_f = geom.softmin(f, self.log_a, eps, axis=1)
                f_new = 0.5 * (f + t_f)
                if active is not None:
                    f_new = torch.where(active.unsqueeze(-1), f_new, f)
                f_prev, f = f, f_new
            self.f = self.g = f
            # row (= column) marginal of the plan (f_prev, f_prev): a exp((f_prev - T f_prev)/eps)
            return 2.0 * geom.row_sum(self.a * torch.expm1((f_prev - t_f) / eps).abs())
        exact = self._cols_exact
        for i in range(k):
            f_new = self._f_next if i == 0 and self._f_next is not None else geom.softmin(g, self.log_b, eps, axis=1)
            f_prev = f
            g_new = geom.softmin(f_new, self.log_a, eps, axis=0)
            if active is not None:
                f_new = torch.where(active.unsqueeze(-1), f_new, f)
                g_new = torch.where(active.unsqueeze(-1), g_new, g)
            f, g = f_new, g_new
        self.f, self.g, self._cols_exact, self._f_next = f, g, True, None
        if k == 1 and not exact:
            # the plan before this iteration had neither marginal exact: measure the plan it
            # left (columns exact) with the next row update, which the next run then reuses
            self._f_next = f_next = geom.softmin(g, self.log_b, eps, axis=1)
            return geom.row_sum(self.a * torch.expm1((f - f_next) / eps).abs())
        # row marginal of the plan (f_prev, g_before) is a * exp((f_prev - f_new)/eps)
        return geom.row_sum(self.a * torch.expm1((f_prev - f) / eps).abs())

    def check(self, err: torch.Tensor) -> tuple[bool, bool]:
        return True, False

    def save(self):
        return (self.f, self.g)

    def restore(self, saved):
        return saved

    def absorb(self):
        pass

    def reduce(self):
        return None

    def potentials(self, precise: bool = False):
        return self.f, self.g


def _slow_convergence(hist: list, done: int, err: float, tol: float) -> bool:
    """Predict from the observed linear rate whether the run will be long.

    Keeps ``(iteration, error)`` pairs; after 20 iterations, estimates the contraction
    rate over the last >= 10 iterations and returns True when reaching ``tol`` would take
    more than ``max(200, 4 * done)`` further iterations.
    """
    hist.append((done, err))
    if done < 20:
        return False
    past = [h for h in hist if h[0] <= done - 10]
    if not past:
        return False
    i0, e0 = past[-1]
    if not (err > 0 and e0 > 0):
        return False
    rate = (err / e0) ** (1.0 / (done - i0))
    if rate >= 1.0:
        return True
    remaining = math.log(tol / err) / math.log(rate)
    return remaining > max(200, 4 * done)


def _default_check_every(device: torch.device, size: int) -> int:
    # a check syncs the device; on CPU it is free except for Python overhead on tiny problems
    if device.type != "cpu":
        return 10
    return 1 if size >= 1 << 16 else 10


def sinkhorn_problem(
    problem: OTProblem,
    eps: float,
    options: SinkhornOptions,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    unroll: bool = False,
    callback: Callable[[int, float], None] | None = None,
    precise: bool = False,
):
    """Run Sinkhorn on a validated, *batched* problem.

    With ``precise``, the final potentials of a float32 kernel solve are returned in
    float64 (they carry the scalings' digits; :func:`entropic_result` builds the plan from
    them).

    Returns ``(f, g, n_iter, converged, errors, info)``; ``f, g`` are detached unless
    ``unroll``. This is the loop every entropic solver reuses (warm-up of the Newton
    solvers, divergences, layers). Small CPU problems run it on one thread
    (:class:`entrokit._threads.solver_threads`).
    """
    with solver_threads(cost_entries(problem.geometry), problem.a.device):
        return _Loop(problem, eps, options, init, unroll, callback).run(precise)


def _start_potentials(a, b, init, unroll: bool):
    if init is None:
        return torch.zeros_like(a), torch.zeros_like(b)
    f, g = (t.to(dtype=a.dtype, device=a.device) for t in init)
    return (f, g) if unroll else (f.detach(), g.detach())


class _Loop:
    """The state of one run of the Sinkhorn loop: the schedule (eps stages, probing), the
    engines, the potentials and the per-problem counters (module docstring)."""

    def __init__(self, problem: OTProblem, eps: float, options: SinkhornOptions, init, unroll: bool, callback):
        geom, a, b = problem.geometry, problem.a, problem.b
        if not unroll:
            geom, a, b = geom.detach(), a.detach(), b.detach()
        self.geom, self.a, self.b, self.eps, self.options, self.callback = geom, a, b, eps, options, callback
        self.unroll = unroll
        self.B, self.device, self.dtype, self.init = a.shape[0], a.device, a.dtype, init
        self.log_a, self.log_b = log_weights(a), log_weights(b)
        self.f, self.g = self.f0, self.g0 = _start_potentials(a, b, init, unroll)
        self.check_every = options.check_every or _default_check_every(self.device, self.B * math.prod(geom.global_shape))
        self._schedule(init)
        lse_mode = options.lse_mode
        if lse_mode is None:
            lse_mode = unroll or geom.is_online or options.fixed_iter or options.symmetric
        if options.symmetric and not lse_mode:
            raise InputError("symmetric updates run on the log-sum-exp engine; leave lse_mode=None or True.")
        if not lse_mode and geom.is_online:
            raise InputError("lse_mode=False needs a materialised cost; online point clouds use lse_mode=True.")
        self.n_iter = torch.zeros(self.B, dtype=torch.long, device=self.device)
        self.converged = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        self.errors: list[torch.Tensor] = []
        self.info = {"stages": len(self.stages), "absorptions": 0, "fallbacks": 0, "eps_scaling": self.use_scaling}
        self.it, self.stage_iters = 0, []
        self.timed = not _compiling()  # a host timer splits torch.compile graphs
        self.t0 = time.perf_counter() if self.timed else 0.0
        self.kernel_engine = None if lse_mode else geom.scaling_engine(a, b, self.log_a, self.log_b)
        if self.kernel_engine is None and options.lse_mode is False:
            raise InputError(f"lse_mode=False needs a geometry with a scaling engine; {geom!r} has none.")
        if (options.check_every is None and not options.fixed_iter and self.kernel_engine is not None and self.B == 1
                and self.device.type == "cpu"):
            # the single-problem kernel loop tests the stopping rule at every iteration itself
            # (an O(n) dot product) and stops at the first that meets it: the full check
            # (overflow, absorption, history) can run every 10 iterations at any size
            self.check_every = 10

    def run(self, precise: bool):
        """Run the stages (restarting once with the annealing schedule when the "auto"
        rule asks for it); returns :meth:`finish`."""
        restart = True
        while restart:
            restart = False
            for si, e in enumerate(self.stages):
                last = si == len(self.stages) - 1
                it_stage = self.it
                status, engine = self.stage(self.engine(si, e), e, last, it_stage)
                if status == "restart":
                    restart = True
                    break
                self.f, self.g = engine.potentials(precise=precise and last and not self.unroll)
                if last:
                    reduced = engine.reduce()
                    if reduced is not None:
                        self.info["reduce"] = reduced
                self.stage_iters.append(self.it - it_stage)
                if "stopped_slow" in self.info:
                    break
        return self.finish()

    def _schedule(self, init) -> None:
        """The eps stages and whether the "auto" rule probes the convergence rate."""
        options, eps = self.options, self.eps
        self.scale = (float(self.geom.cost_range().max())
                      if options.eps_scaling is not False and not options.fixed_iter else 0.0)
        wants_scaling = init is None and self.scale > 50 * eps
        # "auto": solve at the target eps from the exact eps -> 0 potentials and switch to the
        # annealing schedule only if the measured convergence rate predicts a long run
        self.probing = (options.eps_scaling == "auto" and wants_scaling) or options.stop_when_slow
        self.use_scaling = options.eps_scaling is True
        self.stages = eps_schedule(eps, max(self.scale, eps), options.scaling_decay) if self.use_scaling else [eps]
        if options.fixed_iter:
            # exactly max_iter iterations at eps: no convergence test, so no host sync
            # inside the loop (the error of the last iteration is returned, not tested)
            self.probing, self.use_scaling, self.stages = False, False, [eps]
            self.check_every = options.max_iter

    def log_engine(self, e: float) -> _LogEngine:
        engine = _LogEngine(self.geom, self.a, self.b, self.log_a, self.log_b, symmetric=self.options.symmetric)
        engine.start(self.f, self.g, e)
        return engine

    def engine(self, si: int, e: float):
        """The engine of stage ``si``, started from the current potentials."""
        if self.kernel_engine is None:
            return self.log_engine(e)
        cold = si == 0 and self.init is None
        self.kernel_engine.start(self.f, self.g, e, sweep=cold or self.info["fallbacks"] > 0, cold=cold)
        return self.kernel_engine

    def stage(self, engine, e: float, last: bool, it_stage: int):
        """Iterate one stage until its tolerance, its share of the budget, a slow-rate
        hand-off (``"slow"``) or an annealing restart (``"restart"``); returns the status
        and the engine that ran last (an overflow may have replaced it)."""
        options, max_iter, check_every = self.options, self.options.max_iter, self.check_every
        stol = options.tol if last else max(options.tol, options.stage_tol)
        self.active = None
        probe_hist: list[tuple[int, float]] = []
        # intermediate stages share at most half of the budget; the final stage always runs
        n_stages = len(self.stages)
        stage_end = max_iter if last else min(max_iter, self.it + max(check_every, (max_iter // 2) // max(1, n_stages - 1)))
        if last and self.it >= max_iter:
            stage_end = self.it + check_every
        while self.it < stage_end:
            k = min(check_every, stage_end - self.it)
            saved = engine.save()
            err = engine.run(k, self.active if self.B > 1 else None,
                             stop_tol=stol if last and self.device.type == "cpu" else None)
            err = err.detach()  # a stopping measure: never differentiated (grad="unroll" keeps a graph)
            ok, absorb = engine.check(err)
            if not ok:
                engine = self._fall_back(engine, saved, e)
                continue
            # a single-problem kernel run stops at the first iteration meeting stop_tol
            done, err_max = self._record(err, getattr(engine, "iters_done", k), last, stol)
            if done:
                return "done", engine
            if self.probing and _slow_convergence(
                probe_hist, self.it - it_stage, float(err.max()) if err_max is None else err_max, options.tol
            ):
                return self._slow(it_stage), engine
            if absorb:
                engine.absorb()
                self.info["absorptions"] += 1
        return "done", engine

    def _fall_back(self, engine, saved, e: float):
        """Overflow in the scalings: restore and continue this stage in log domain."""
        self.f, self.g = engine.restore(saved)
        self.info["fallbacks"] += 1
        if self.info["fallbacks"] <= 2:
            # an exact log-domain sweep re-centres the kernel (rows/columns near 1)
            engine.start(self.f, self.g, e, sweep=True)
            return engine
        return self.log_engine(e)

    def _record(self, err: torch.Tensor, k: int, last: bool, stol: float):
        """Count ``k`` iterations, keep the final stage's error history, and test the
        stopping rule; returns ``(stop, host copy of max(err) or None)``."""
        self.n_iter += k if self.active is None else k * self.active.long()
        self.it += k
        err_max = None  # the host copy of max(err), read at most once per check
        if last:
            self.errors.append(err)
            if self.callback is not None:
                err_max = float(err.max())
                self.callback(self.it, err_max)
        if self.options.fixed_iter:
            return True, err_max
        if self.B == 1:  # one problem: one host sync serves every test below
            err_max = float(err.max()) if err_max is None else err_max
            if err_max <= stol:
                if last:
                    self.converged = torch.ones_like(self.converged)
                return True, err_max
            return False, err_max
        done = err <= stol
        if not last:
            return bool(done.all()), err_max
        self.converged = self.converged | done
        if bool(self.converged.all()):
            return True, err_max
        self.active = ~self.converged
        return False, err_max

    def _slow(self, it_stage: int) -> str:
        """The measured rate predicts a long run: hand the potentials to a faster method
        (the caller's choice), or restart from the cold start with the annealing schedule."""
        if self.options.stop_when_slow:
            self.info["stopped_slow"] = self.it
            return "slow"
        self.probing, self.use_scaling = False, True
        self.stages = eps_schedule(self.eps, max(self.scale, self.eps), self.options.scaling_decay)
        self.info.update(stages=len(self.stages), eps_scaling=True, probe_iters=self.it - it_stage)
        self.f, self.g = self.f0, self.g0
        self.errors.clear()
        self.converged = torch.zeros_like(self.converged)
        return "restart"

    def finish(self):
        """``(f, g, n_iter, converged, errors, info)``."""
        self.info["stage_iters"] = self.stage_iters
        self.info["time"] = time.perf_counter() - self.t0 if self.timed else float("nan")
        errs = (torch.stack(self.errors, 0) if self.errors
                else torch.zeros(0, self.B, dtype=self.dtype, device=self.device))
        return self.f, self.g, self.n_iter, self.converged, errs, self.info


@numpy_in_out
@small_problem_threads
def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    cost,
    eps: float,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    eps_scaling: bool | str = "auto",
    scaling_decay: float = 0.5,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad: str = "implicit",
    lse_mode: bool | None = None,
    check_every: int | None = None,
    normalize: bool = False,
    check_inputs: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> OTResult:
    r"""Entropic OT by log-domain (stabilized) Sinkhorn.

    Args:
        a: source weights ``[n]`` or ``[B, n]`` (nonnegative; zeros allowed).
        b: target weights ``[m]`` or ``[B, m]``.
        cost: cost matrix ``[n, m]`` / ``[B, n, m]`` or a geometry such as
            :class:`~entrokit.PointCloud`.
        eps: regularization strength :math:`\varepsilon > 0` (absolute, in cost units).
        tol: stop when the L1 marginal error :math:`\|P1-a\|_1 + \|P^\top 1-b\|_1 \le`
            ``tol`` (per problem of a batch; converged problems stop updating).
        max_iter: iteration budget over all eps-scaling stages (default 10 000).
        eps_scaling: ``True``, ``False`` or ``"auto"`` (switch to annealing when the
            measured convergence rate predicts a long run; see the module docstring).
        scaling_decay: factor :math:`\rho \in (0,1)` between annealing stages.
        init: warm start ``(f, g)`` (potentials of a nearby problem).
        grad: ``"implicit"`` (default: exact gradients of every output, computed only
            when backward reaches them), ``"envelope"`` (cheap: exact for ``value``,
            frozen plan otherwise) or ``"unroll"``; see :mod:`entrokit.solvers._entropic`.
        lse_mode: force the log-sum-exp engine (``True``) or the stabilized kernel engine
            (``False``); default: kernel for dense costs, log-sum-exp for online point clouds
            and ``unroll``.
        check_every: iterations between convergence checks (default 1 on CPU, where a
            check costs nothing, and 10 on GPU to avoid device syncs; one problem on the
            CPU kernel engine tests the stopping rule at every iteration and checks the
            rest every 10).
        normalize: rescale ``a`` and ``b`` to unit mass instead of requiring equal masses.
        check_inputs: run value checks (signs, NaN, masses); switch off inside training
            loops to avoid device syncs.
        callback: ``callback(iteration, max_error)`` after every check on the final stage.

    Returns:
        :class:`~entrokit.OTResult`. Non-convergence sets ``converged=False`` and emits a
        :class:`~entrokit.ConvergenceWarning`.

    Example:
        >>> import torch, entrokit
        >>> C = torch.rand(5, 6, dtype=torch.float64)
        >>> a, b = torch.full((5,), 0.2, dtype=torch.float64), torch.full((6,), 1/6, dtype=torch.float64)
        >>> res = entrokit.sinkhorn(a, b, C, eps=0.1)
        >>> bool(res.marginal_error < 1e-6)
        True
    """
    eps = check_positive(eps, "eps")
    options = check_solver_options(
        "sinkhorn", tol=tol, max_iter=max_iter, eps_scaling=eps_scaling, scaling_decay=scaling_decay, grad=grad,
        check_every=check_every, lse_mode=lse_mode, callback=callback,
    )
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    return sinkhorn_result(problem, eps, init=init, **options)


def sinkhorn_result(
    problem: OTProblem,
    eps: float,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    eps_scaling: bool | str = "auto",
    scaling_decay: float = 0.5,
    init=None,
    grad: str = "implicit",
    lse_mode: bool | None = None,
    check_every: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> OTResult:
    """:func:`sinkhorn` on a validated problem (:func:`~entrokit.problem.make_problem`) with
    checked options (:data:`~entrokit._validation.SOLVER_OPTIONS`): what :func:`sinkhorn`,
    :func:`entrokit.solve` and the losses call after their one boundary check."""
    max_iter = max_iter or SinkhornOptions.max_iter
    problem.geometry.check_grad_mode(grad, problem.a, problem.b)
    pb = problem.with_batch()
    if grad == "unroll" and lse_mode is False:
        raise InputError("grad='unroll' differentiates the log-domain iterations; leave lse_mode=None or True.")
    warm_reached = False  # a multiscale start whose truncated loop met tol
    if init is not None:
        init = check_init(init, pb)
    elif eps_scaling == "auto" and grad != "unroll" and getattr(pb.geometry, "is_online", False):
        # online squared Euclidean, d <= 3: start from multiscale_sinkhorn's potentials
        from entrokit.solvers.multiscale import online_warm_start
        t_start = time.perf_counter()
        start = online_warm_start(pb, eps, tol, max_iter)
        if start is not None:
            if start.reached and tol >= start.error_floor:  # below it, certifying would only cost a pass
                res = _certified_start(problem, pb, eps, start, grad=grad, tol=tol, callback=callback,
                                       seconds=time.perf_counter() - t_start)
                if res is not None:
                    return res
            init, warm_reached = (start.f, start.g), start.reached
    opts = SinkhornOptions(
        tol=internal_tol(tol, pb), max_iter=max_iter, eps_scaling=eps_scaling, scaling_decay=float(scaling_decay),
        check_every=check_every, lse_mode=lse_mode,
    )
    if warm_reached and _needs_float64_finish(pb, grad):
        # the multiscale start met tol in float32: the float64 finish starts from it (a
        # float32 loop would only repeat what the start did)
        info = {}
        B = pb.a.shape[0]
        f, g, n_iter, converged, errors = _float64_finish(
            pb, eps, *init, torch.zeros(B, dtype=torch.long, device=pb.a.device), pb.a.new_zeros(0, B), opts, info,
            callback=callback)
    else:
        f, g, n_iter, converged, errors, info = sinkhorn_problem(
            pb, eps, opts, init=init, unroll=(grad == "unroll"), callback=callback, precise=True
        )
        if _needs_float64_finish(pb, grad):
            f, g, n_iter, converged, errors = _float64_finish(pb, eps, f, g, n_iter, errors, opts, info)
    res = entropic_result(
        pb, f, g, eps, grad=grad, n_iter=n_iter, converged=converged, errors=errors,
        method="sinkhorn", tol=tol, info=SinkhornInfo(info), user_problem=problem,
    )
    warn_not_converged(
        converged, errors[-1] if len(errors) else res.marginal_error, tol, "sinkhorn",
        f"Raise max_iter (now {max_iter}), loosen tol, increase eps (now {eps:g}), use float64, "
        "or try method='ssns'.",
    )
    return res


def _certified_start(problem: OTProblem, pb: OTProblem, eps: float, start, *, grad: str, tol: float, callback,
                     seconds: float) -> OTResult | None:
    """The result of the multiscale start's potentials where their plan on the point cloud
    meets ``tol``: the certificate every result gets (float64 sums of the plan; a float32
    cloud's potentials are taken to float64, as its float64 finish would hand them over)
    accepts it, and a loop would only confirm it. ``None`` where it does not (the caller's
    loop goes on from the start). ``n_iter`` counts the start's truncated iterations,
    ``info["time"]`` the seconds before the certificate; ``callback`` sees the certified
    error once."""
    prec = torch.float64 if _needs_float64_finish(pb, grad) else pb.dtype
    info = {"time": seconds, "stages": 0, "stage_iters": [], "absorptions": 0, "fallbacks": 0,
            "eps_scaling": False, "multiscale_start": True}
    if prec != pb.dtype:
        info["float64_finish"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a start that misses: the loop goes on
        res = entropic_result(
            pb, start.f.to(prec), start.g.to(prec), eps, grad=grad, n_iter=start.n_iter,
            converged=torch.ones_like(start.n_iter, dtype=torch.bool), errors=pb.a.new_zeros(0, pb.a.shape[0]),
            method="sinkhorn", tol=tol, info=SinkhornInfo(info), user_problem=problem,
        )
    if not bool(res.converged.all()):
        return None
    if callback is not None:
        callback(int(start.n_iter.max()), float(res.marginal_error.max()))
    return res


def _needs_float64_finish(pb: OTProblem, grad: str) -> bool:
    """A float32 point-cloud solve ends in float64: its cost is the points' exact cost, and
    the float32 rounding of ``|x - y|^2`` alone moves the plan's marginals by about
    ``u * C / eps`` (``2e-6`` at cost/eps = 300, u the float32 unit roundoff)."""
    from entrokit.geometry.base import PointGeometry

    return pb.dtype != torch.float64 and grad != "unroll" and isinstance(pb.geometry, PointGeometry)


def _float64_finish(pb: OTProblem, eps: float, f, g, n_iter, errors, opts: SinkhornOptions, info: dict,
                    callback=None):
    """Sinkhorn iterations in float64 on the float64 points from the float32 potentials,
    to ``opts.tol`` within what is left of ``max_iter`` (usually a few: the float32
    solution is a warm start). Returns float64 potentials; the result is certified on the
    same float64 cost. ``info`` gets the float64 loop's fields it lacks (all of them when
    no float32 loop ran); ``callback`` is called after its checks."""
    f32_iters = int(n_iter.max())
    pb64 = OTProblem(pb.a.detach().to(torch.float64), pb.b.detach().to(torch.float64),
                     pb.geometry.detach().to_dtype(torch.float64), pb.user_batch_shape)
    finish = SinkhornOptions(tol=opts.tol, max_iter=max(1, opts.max_iter - f32_iters), eps_scaling=False,
                             check_every=opts.check_every, lse_mode=opts.lse_mode)
    init = (f.detach().to(torch.float64), g.detach().to(torch.float64))
    f, g, k, converged, errors64, info64 = sinkhorn_problem(pb64, eps, finish, init=init, callback=callback)
    for key, value in info64.items():  # the float64 loop's fields where no float32 loop gave them
        info.setdefault(key, value)
    info["float64_finish"] = int(k.max())
    info.pop("reduce", None)  # the float32 stage's sums are not the returned plan's
    if "reduce" in info64:  # the float64 engine's sums of its final plan: certify from them
        info["reduce"] = info64["reduce"]
    errors = torch.cat([errors.to(torch.float64), errors64]) if len(errors) else errors64
    return f, g, n_iter + k, converged, errors.to(pb.dtype)


def internal_tol(tol: float, pb: OTProblem) -> float:
    """The tolerance a solver iterates to so that the *returned* plan meets ``tol``:
    below float64, a margin for rounding the plan to the working dtype (``2u`` per
    marginal and unit of mass) is kept; in float64 the same margin covers the different
    summation orders of the stopping test and of the certified sums."""
    margin = 4.0 * torch.finfo(pb.dtype).eps * float(pb.geometry.row_sum(pb.a.detach()).max())
    return max(tol - margin, 0.5 * tol)


def check_init(init, pb: OTProblem):
    """Validate a warm start ``(f, g)`` against a flattened problem; returns ``(B, n), (B, m)``
    tensors in the problem's dtype and device. Accepts the user's batch axes, or an
    :class:`~entrokit.OTResult` (its potentials)."""
    if hasattr(init, "f") and hasattr(init, "g") and not isinstance(init, (tuple, list)):
        init = (init.f, init.g)
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise TypeError(
            f"init must be a pair (f, g) of potentials or an OTResult, got {type(init).__name__}."
        )
    f, g = (as_float_tensor(t, name, like=pb.a) for t, name in zip(init, ("init f", "init g")))
    user = pb.user_batch_shape if pb.user_batch_shape is not None else tuple(pb.a.shape[:-1])
    n, m = pb.shape
    if tuple(f.shape) != (*user, n) or tuple(g.shape) != (*user, m):
        raise InputError(
            f"init potentials must match the weights: expected f {(*user, n)} and g {(*user, m)}, "
            f"got {tuple(f.shape)} and {tuple(g.shape)}."
        )
    f = f.detach().to(dtype=pb.a.dtype, device=pb.a.device).reshape(pb.a.shape)
    g = g.detach().to(dtype=pb.a.dtype, device=pb.a.device).reshape(pb.b.shape)
    if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
        raise InputError("init potentials contain NaN or inf; pass finite potentials, e.g. from a previous result.")
    return f, g


# entrokit.solve calls this on its validated problem
sinkhorn.__problem_solver__ = sinkhorn_result
