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
(no extra pass, and no device sync in between).

**Initialisation.** Without ``init`` the potentials start at the exact
:math:`\varepsilon \to 0` c-transforms :math:`f_i = \min_j C_{ij}`,
:math:`g_j = \min_i (C_{ij} - f_i)`, so every row and column of the first kernel holds an
entry equal to 1 and nothing underflows, whatever :math:`\varepsilon`.

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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult, SinkhornInfo
from entrokit._threads import compiling as _compiling
from entrokit._threads import cost_entries, small_problem_threads, solver_threads
from entrokit._validation import as_float_tensor, check_choice, check_positive, check_positive_int
from entrokit.geometry import Geometry
from entrokit.problem import OTProblem, log_weights, make_problem
from entrokit.solvers._entropic import GRAD_MODES, entropic_result, warn_not_converged
from entrokit.solvers._io import numpy_in_out
from entrokit.solvers._numerics import continuation_schedule

__all__ = ["sinkhorn", "sinkhorn_problem", "SinkhornOptions", "eps_schedule"]


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
        for _ in range(k):
            f_new = geom.softmin(g, self.log_b, eps, axis=1)
            f_prev = f
            g_new = geom.softmin(f_new, self.log_a, eps, axis=0)
            if active is not None:
                f_new = torch.where(active.unsqueeze(-1), f_new, f)
                g_new = torch.where(active.unsqueeze(-1), g_new, g)
            f, g = f_new, g_new
        self.f, self.g = f, g
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
        return _sinkhorn_loop(problem, eps, options, init=init, unroll=unroll, callback=callback, precise=precise)


def _sinkhorn_loop(
    problem: OTProblem,
    eps: float,
    options: SinkhornOptions,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    unroll: bool = False,
    callback: Callable[[int, float], None] | None = None,
    precise: bool = False,
):
    """:func:`sinkhorn_problem` on the caller's threads."""
    geom = problem.geometry
    a, b = problem.a, problem.b
    if not unroll:
        geom, a, b = geom.detach(), a.detach(), b.detach()
    B = a.shape[0]
    log_a, log_b = log_weights(a), log_weights(b)
    dtype, device = a.dtype, a.device
    if init is None:
        f = torch.zeros_like(a)
        g = torch.zeros_like(b)
    else:
        f, g = init
        f = f.to(dtype=dtype, device=device)
        g = g.to(dtype=dtype, device=device)
        if not unroll:
            f, g = f.detach(), g.detach()
    tol, max_iter = options.tol, options.max_iter
    check_every = options.check_every or _default_check_every(device, B * math.prod(geom.global_shape))

    scale = float(geom.cost_range().max()) if options.eps_scaling is not False and not options.fixed_iter else 0.0
    wants_scaling = init is None and scale > 50 * eps
    # "auto": solve at the target eps from the exact eps -> 0 potentials and switch to the
    # annealing schedule only if the measured convergence rate predicts a long run
    probing = (options.eps_scaling == "auto" and wants_scaling) or options.stop_when_slow
    use_scaling = options.eps_scaling is True
    stages = eps_schedule(eps, max(scale, eps), options.scaling_decay) if use_scaling else [eps]

    if options.fixed_iter:
        # exactly max_iter iterations at eps: no convergence test, so no host sync
        # inside the loop (the error of the last iteration is returned, not tested)
        probing, use_scaling, stages = False, False, [eps]
        check_every = max_iter
    lse_mode = options.lse_mode
    if lse_mode is None:
        lse_mode = unroll or geom.is_online or options.fixed_iter or options.symmetric
    if options.symmetric and not lse_mode:
        raise InputError("symmetric updates run on the log-sum-exp engine; leave lse_mode=None or True.")
    if not lse_mode and geom.is_online:
        raise InputError("lse_mode=False needs a materialised cost; online point clouds use lse_mode=True.")

    n_iter = torch.zeros(B, dtype=torch.long, device=device)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    errors: list[torch.Tensor] = []
    info = {"stages": len(stages), "absorptions": 0, "fallbacks": 0, "eps_scaling": use_scaling}
    it = 0
    timed = not _compiling()  # a host timer splits torch.compile graphs
    t0 = time.perf_counter() if timed else 0.0
    kernel_engine = None if lse_mode else geom.scaling_engine(a, b, log_a, log_b)
    if kernel_engine is None and options.lse_mode is False:
        raise InputError(f"lse_mode=False needs a geometry with a scaling engine; {geom!r} has none.")
    lse_mode = kernel_engine is None
    stage_iters = []
    f0, g0 = f, g
    restart = True
    while restart:
        restart = False
        for si, e in enumerate(stages):
            last = si == len(stages) - 1
            stol = tol if last else max(tol, options.stage_tol)
            it_stage = it
            if lse_mode:
                engine = _LogEngine(geom, a, b, log_a, log_b, symmetric=options.symmetric)
                engine.start(f, g, e)
            else:
                engine = kernel_engine
                cold = si == 0 and init is None
                engine.start(f, g, e, sweep=cold or info["fallbacks"] > 0, cold=cold)
            active = None
            probe_hist: list[tuple[int, float]] = []
            # intermediate stages share at most half of the budget; the final stage always runs
            stage_end = max_iter if last else min(max_iter, it + max(check_every, (max_iter // 2) // max(1, len(stages) - 1)))
            if last and it >= max_iter:
                stage_end = it + check_every
            while it < stage_end:
                k = min(check_every, stage_end - it)
                saved = engine.save()
                err = engine.run(k, active if B > 1 else None, stop_tol=stol if last and device.type == "cpu" else None)
                err = err.detach()  # a stopping measure: never differentiated (grad="unroll" keeps a graph)
                ok, absorb = engine.check(err)
                if not ok:
                    # overflow in the scalings: restore and continue this stage in log domain
                    f, g = engine.restore(saved)
                    info["fallbacks"] += 1
                    if info["fallbacks"] <= 2:
                        # an exact log-domain sweep re-centres the kernel (rows/columns near 1)
                        engine.start(f, g, e, sweep=True)
                    else:
                        engine = _LogEngine(geom, a, b, log_a, log_b, symmetric=options.symmetric)
                        engine.start(f, g, e)
                    continue
                if active is None:
                    n_iter += k
                else:
                    n_iter += k * active.long()
                it += k
                err_max = None  # the host copy of max(err), read at most once per check
                if last:
                    errors.append(err)
                    if callback is not None:
                        err_max = float(err.max())
                        callback(it, err_max)
                if options.fixed_iter:
                    break
                if B == 1:  # one problem: one host sync serves every test below
                    err_max = float(err.max()) if err_max is None else err_max
                    if err_max <= stol:
                        if last:
                            converged = torch.ones_like(converged)
                        break
                else:
                    done = err <= stol
                    if last:
                        converged = converged | done
                        if bool(converged.all()):
                            break
                        active = ~converged
                    elif bool(done.all()):
                        break
                if probing and _slow_convergence(
                    probe_hist, it - it_stage, float(err.max()) if err_max is None else err_max, tol
                ):
                    if options.stop_when_slow:
                        # hand the potentials to a faster method (the caller's choice)
                        info["stopped_slow"] = it
                        break
                    # restart from the cold start with the annealing schedule
                    probing, use_scaling, restart = False, True, True
                    stages = eps_schedule(eps, max(scale, eps), options.scaling_decay)
                    info.update(stages=len(stages), eps_scaling=True, probe_iters=it - it_stage)
                    f, g = f0, g0
                    errors.clear()
                    converged = torch.zeros_like(converged)
                    break
                if absorb:
                    engine.absorb()
                    info["absorptions"] += 1
            if restart:
                break
            f, g = engine.potentials(precise=precise and last and not unroll)
            if last:
                reduced = engine.reduce()
                if reduced is not None:
                    info["reduce"] = reduced
            stage_iters.append(it - it_stage)
            if "stopped_slow" in info:
                break
    info["stage_iters"] = stage_iters
    info["time"] = time.perf_counter() - t0 if timed else float("nan")
    err_hist = torch.stack(errors, 0) if errors else torch.zeros(0, B, dtype=dtype, device=device)
    return f, g, n_iter, converged, err_hist, info


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
            check costs nothing, and 10 on GPU to avoid device syncs).
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
    tol = check_positive(tol, "tol")
    check_choice(grad, "grad", GRAD_MODES)
    max_iter = check_positive_int(max_iter, "max_iter", allow_none=True) or SinkhornOptions.max_iter
    if eps_scaling not in (True, False, "auto"):
        raise InputError(f"eps_scaling must be True, False or 'auto'; got {eps_scaling!r}.")
    if not (0.0 < float(scaling_decay) < 1.0):
        raise InputError(f"scaling_decay must lie in (0, 1), got {scaling_decay!r}; try 0.5.")
    if check_every is not None:
        check_positive_int(check_every, "check_every")
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    problem.geometry.check_grad_mode(grad, problem.a, problem.b)
    pb = problem.with_batch()
    if init is not None:
        init = check_init(init, pb)
    elif eps_scaling == "auto" and grad != "unroll" and getattr(pb.geometry, "is_online", False):
        # online squared Euclidean, d <= 3: start from multiscale_sinkhorn's potentials
        from entrokit.solvers.multiscale import online_warm_start
        init = online_warm_start(pb, eps, tol)
    if grad == "unroll" and lse_mode is False:
        raise InputError("grad='unroll' differentiates the log-domain iterations; leave lse_mode=None or True.")
    opts = SinkhornOptions(
        tol=internal_tol(tol, pb), max_iter=max_iter, eps_scaling=eps_scaling, scaling_decay=float(scaling_decay),
        check_every=check_every, lse_mode=lse_mode,
    )
    f, g, n_iter, converged, errors, info = sinkhorn_problem(
        pb, eps, opts, init=init, unroll=(grad == "unroll"), callback=callback, precise=True
    )
    if _needs_float64_finish(pb, grad):
        f, g, n_iter, converged, errors = _float64_finish(pb, eps, f, g, n_iter, errors, opts, info)
    res = entropic_result(
        pb, f, g, eps, grad=grad, n_iter=n_iter, converged=converged, errors=errors,
        method="sinkhorn", tol=tol, info=SinkhornInfo(info),
    )
    warn_not_converged(
        converged, errors[-1] if len(errors) else res.marginal_error, tol, "sinkhorn",
        f"Raise max_iter (now {max_iter}), loosen tol, increase eps (now {eps:g}), use float64, "
        "or try method='ssns'.",
    )
    return res


def _needs_float64_finish(pb: OTProblem, grad: str) -> bool:
    """A float32 point-cloud solve ends in float64: its cost is the points' exact cost, and
    the float32 rounding of ``|x - y|^2`` alone moves the plan's marginals by about
    ``u * C / eps`` (``2e-6`` at cost/eps = 300, u the float32 unit roundoff)."""
    from entrokit.geometry.base import PointGeometry

    return pb.dtype != torch.float64 and grad != "unroll" and isinstance(pb.geometry, PointGeometry)


def _float64_finish(pb: OTProblem, eps: float, f, g, n_iter, errors, opts: SinkhornOptions, info: dict):
    """Sinkhorn iterations in float64 on the float64 points from the float32 potentials,
    to ``opts.tol`` within what is left of ``max_iter`` (usually a few: the float32
    solution is a warm start). Returns float64 potentials; the result is certified on the
    same float64 cost."""
    f32_iters = int(n_iter.max())
    pb64 = OTProblem(pb.a.detach().to(torch.float64), pb.b.detach().to(torch.float64),
                     pb.geometry.detach().to_dtype(torch.float64), pb.user_batch_shape)
    finish = SinkhornOptions(tol=opts.tol, max_iter=max(1, opts.max_iter - f32_iters), eps_scaling=False,
                             check_every=opts.check_every, lse_mode=opts.lse_mode)
    init = (f.detach().to(torch.float64), g.detach().to(torch.float64))
    f, g, k, converged, errors64, _ = sinkhorn_problem(pb64, eps, finish, init=init)
    info["float64_finish"] = int(k.max())
    errors = torch.cat([errors.to(torch.float64), errors64]) if len(errors) else errors64
    return f, g, n_iter + k, converged, errors.to(pb.dtype)


def internal_tol(tol: float, pb: OTProblem) -> float:
    """The tolerance a solver iterates to so that the *returned* plan meets ``tol``:
    below float64, a margin for rounding the plan to the working dtype (``2u`` per
    marginal and unit of mass) is kept."""
    if pb.dtype == torch.float64:
        return tol
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
_check_init = check_init  # kept for the Newton solvers
