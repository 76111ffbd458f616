r"""Two-scale (coarse-to-fine) truncated Sinkhorn for low-dimensional point clouds.

A driver around the library's one Sinkhorn loop
(:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`); the speed comes from the geometry
(:class:`~entrokit.geometry.multiscale.TruncatedPointCloud`), GeomLoss's multiscale
scheme (Feydy's thesis, 2020; Schmitzer, 2019) made rigorous:

1. **Cluster** both clouds on one voxel grid (:func:`~entrokit.geometry.multiscale.grid_cluster`,
   default side :math:`s = D/(\sqrt d\,2000^{1/d})`, :math:`D` the diagonal of the joint
   box of the points of positive weight).
2. **Coarse solve**: :func:`entrokit.sinkhorn` with eps-scaling on the centroids and
   cluster weights, down to :math:`\varepsilon_c = \max(\varepsilon, s^2)` (the scale
   where the cluster size starts to matter: GeomLoss jumps at the first
   :math:`\varepsilon < s^p`).
3. **Extrapolate** the coarse potentials to the points by one soft-min each
   (:func:`~entrokit.geometry.multiscale.extrapolate_potentials`).
4. **Truncate**: keep the cluster pairs whose exponent bound is :math:`\ge -\tau\varepsilon`
   (``truncate`` :math:`=\tau`) or whose mass bound is needed to keep the dropped mass
   below ``tol/32`` (:func:`~entrokit.geometry.multiscale.truncation_mask`).
5. **Fine solve**: Sinkhorn on the truncated geometry, warm-started from ``f`` and
   :math:`g = \operatorname{softmin}(f)` (so that the first stopping test sees a plan with
   exact column sums, hence its whole error), continuing the eps schedule from
   :math:`\varepsilon_c` to :math:`\varepsilon` (the kept blocks are rebuilt at every
   stage), to ``0.75 tol`` on the kept plan.
6. **Certify the truncation**: with the final potentials, bound the plan mass of every
   dropped block (:eq:`block-mass`). The bounds are monotone in the potentials, so those
   computed before the solve, times :math:`e^{(\max_i \Delta f_i + \max_j \Delta g_j)/\varepsilon}`
   (:math:`\Delta` the change of the potentials during the solve), already bound the final
   dropped mass at :math:`O(n)` cost; they are recomputed only when that is not enough.
   If the sum :math:`D` exceeds ``tol/8``, enlarge the
   kept set with the new bounds (to a dropped mass of at most ``tol/32``) and solve again
   from the current potentials (at most ``max_rounds`` solves in all). If ``tol/8`` is
   still not met, the result says so: ``converged=False`` and one
   :class:`~entrokit.ConvergenceWarning` per call (it carries the kept plan's own
   certification message, if any), never a silently different answer.

**What is certified.** The dense plan of the returned potentials,
:math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}` over *all* pairs, has marginal
L1 error at most the truncated plan's (recomputed in float64 by
:func:`~entrokit.solvers._entropic.entropic_result`) plus :math:`2D` (the dropped mass
enters each marginal at most once). ``marginal_error`` reports that upper bound, and
``converged=True`` only when it is :math:`\le` ``tol``; ``info.kept_marginal_error`` and
``info.dropped_mass_bound`` give the two parts. ``plan``, ``apply`` and ``marginals`` of
the result are those of the truncated plan (zeros outside the kept blocks);
``transport_cost`` is the truncated plan's, within :math:`D \max C` of the dense one.

**Cost.** Clustering :math:`O((n+m)\log(n+m))`; coarse solve on about
:math:`2000 \times 2000` centroids; bounds and extrapolation :math:`O(n K_y + m K_x)`;
each fine iteration visits the kept entries only (``info.kept_fraction`` of :math:`nm`).
The kept fraction is set by the kernel width :math:`\sqrt{\varepsilon}` relative to the
data: at :math:`\varepsilon = 10^{-2}` on the unit cube it is large (tens of percent), at
:math:`10^{-3}` a few percent.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from numbers import Real
from typing import NamedTuple

import torch

from entrokit._errors import ConvergenceWarning, InputError
from entrokit._result import OTResult, SolverInfo
from entrokit._validation import (
    as_float_tensor,
    check_masses,
    check_nonneg_finite,
    check_positive,
    check_positive_int,
    check_same_dtype_device,
    check_solver_options,
)
from entrokit.geometry.multiscale import (
    DEFAULT_CELLS,
    TruncatedPointCloud,
    cluster_pair_bounds,
    default_cluster_scale,
    extrapolate_potentials,
    grid_cluster,
    truncation_mask,
)
from entrokit.geometry.pointcloud import PointCloud
from entrokit.problem import OTProblem, log_weights
from entrokit.solvers._entropic import entropic_result, warn_not_converged
from entrokit.solvers._numerics import continuation_schedule
from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem, sinkhorn_result

__all__ = ["multiscale_sinkhorn", "MultiscaleInfo", "MAX_DIM"]

#: Largest point dimension: beyond 3-D a voxel grid of ~2000 cells has cells as wide as
#: the data, and truncation keeps almost every block.
MAX_DIM = 3
GRAD_MODES = ("implicit", "envelope")
# error split: kept plan to KEPT_TOL * tol, dropped mass <= DROP_ACCEPT * tol (it counts
# twice), blocks chosen with the smaller budget DROP_PLAN * tol
KEPT_TOL, DROP_ACCEPT, DROP_PLAN = 0.75, 0.125, 1.0 / 32
STAGE_TOL = 1e-2  # intermediate eps stages stop at this L1 error (as in sinkhorn)
COARSE_TOL = 1e-5  # the coarse problem is only a warm start
# the defaults of multiscale_sinkhorn's options, shared with the online warm start
TRUNCATE, SCALING_DECAY, MAX_ROUNDS = 5.0, 0.5, 4


class MultiscaleInfo(SolverInfo):
    """Diagnostics of :func:`multiscale_sinkhorn`: ``time`` (s, total), ``coarse_time``,
    ``fine_time``, ``coarse_eps``, ``coarse_iters``, ``n_clusters`` (``(K_x, K_y)`` of the
    padded batch), ``cluster_scale`` (per problem), ``stages`` (fine eps stages),
    ``stage_iters`` (iterations of every fine solve: one per stage, plus the re-expansion
    rounds of the last), ``rounds`` (fine solves of the last stage: 1 + re-expansions),
    ``kept_fraction`` (per problem, final kept set), ``dropped_mass_bound`` (per problem,
    :math:`D`), ``kept_marginal_error`` (per problem, exact L1 error of the truncated
    plan), ``padding_overhead`` (computed / kept entries)."""

    required = ("time", "coarse_time", "fine_time", "coarse_iters", "n_clusters", "stages", "stage_iters",
                "rounds", "kept_fraction", "dropped_mass_bound", "kept_marginal_error")


def _check_positive_real(value, name: str, hint: str) -> float:
    """A finite real > 0, else :class:`InputError` saying what to pass."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(float(value)) and float(value) > 0
    if not ok:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}; {hint}")
    return float(value)


def _check_finite_points(t: torch.Tensor, name: str) -> None:
    """Every coordinate finite, else :class:`InputError` naming the first bad point."""
    bad = ~torch.isfinite(t).all(-1)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        what = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
        raise InputError(
            f"{name} contains {what} (first at point index {first}); expected finite coordinates. "
            f"Drop those points (e.g. {name}[torch.isfinite({name}).all(-1)], with their weights) or give "
            "them finite positions and weight 0."
        )


def _prepare(a, b, x, y, check_inputs: bool):
    """Validate and flatten to ``a [B, n]``, ``b [B, m]``, ``x [B, n, d]``, ``y [B, m, d]``."""
    x = as_float_tensor(x, "x")
    y = as_float_tensor(y, "y", like=None if isinstance(y, torch.Tensor) else x)
    if x.dim() < 2 or y.dim() != x.dim():
        raise InputError(
            f"x and y must have shapes (..., n, d) and (..., m, d) with the same batch axes; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}. Add a feature axis with x[:, None] for 1-D points."
        )
    d = x.shape[-1]
    if y.shape[-1] != d:
        raise InputError(f"x and y must have the same point dimension, got d={d} and d={y.shape[-1]}.")
    if d > MAX_DIM:
        raise InputError(
            f"multiscale_sinkhorn clusters points on a voxel grid and needs d <= {MAX_DIM}; got d={d}. "
            "In higher dimensions use the online point cloud instead: "
            "entrokit.sinkhorn(a, b, PointCloud(x, y, chunk_size=2048), eps)."
        )
    if x.shape[:-2] != y.shape[:-2]:
        raise InputError(f"batch axes of x and y differ: {tuple(x.shape[:-2])} vs {tuple(y.shape[:-2])}.")
    batch_shape = tuple(x.shape[:-2])
    n, m = x.shape[-2], y.shape[-2]
    a = torch.full((*batch_shape, n), 1.0 / n, dtype=x.dtype, device=x.device) if a is None else \
        as_float_tensor(a, "a", like=None if isinstance(a, torch.Tensor) else x)
    b = torch.full((*batch_shape, m), 1.0 / m, dtype=x.dtype, device=x.device) if b is None else \
        as_float_tensor(b, "b", like=None if isinstance(b, torch.Tensor) else x)
    check_same_dtype_device({"x": x, "y": y, "a": a, "b": b})
    if tuple(a.shape) != (*batch_shape, n) or tuple(b.shape) != (*batch_shape, m):
        raise InputError(
            f"weights do not match the points: expected a of shape {(*batch_shape, n)} and b of shape "
            f"{(*batch_shape, m)} (x is {tuple(x.shape)}, y is {tuple(y.shape)}), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    if check_inputs:
        _check_finite_points(x, "x")
        _check_finite_points(y, "y")
        check_nonneg_finite(a, "a")
        check_nonneg_finite(b, "b")
        a, b = check_masses(a, b, normalize=False)
    B = math.prod(batch_shape)
    return a.reshape(B, n), b.reshape(B, m), x.reshape(B, n, d), y.reshape(B, m, d), batch_shape


def _fine_solve(x3, y3, a3, b3, xc, yc, f, g, eps: float, eps_c: float, scaling_decay: float, tol: float, *,
                truncate: float, max_iter: int, max_rounds: int, block_entries, batch_shape):
    """Steps 4-6 of the module docstring: truncated Sinkhorn on the fine level from the
    extrapolated potentials, continuing the schedule ``eps_c -> eps``, and the certificate
    of the truncation on the last stage (re-expanding the kept set when it fails)."""
    B, dtype = x3.shape[0], x3.dtype
    stages = continuation_schedule(eps, eps_c, float(scaling_decay))
    margin32 = 4.0 * torch.finfo(dtype).eps * float(a3.detach().sum(-1).max()) if dtype != torch.float64 else 0.0
    kept_tol = max(KEPT_TOL * tol - margin32, 0.25 * tol)
    n_iter = torch.zeros(B, dtype=torch.long, device=x3.device)
    log_a3 = log_weights(a3.detach())
    stage_iters: list[int] = []
    errors_all: list[torch.Tensor] = []
    used = 0
    geom = None
    rounds = 0
    for k, e in enumerate(stages):
        last = k == len(stages) - 1
        target = kept_tol if last else max(tol, STAGE_TOL)
        plan_budget = DROP_PLAN * (tol if last else max(tol, STAGE_TOL))
        bounds = cluster_pair_bounds(x3, y3, xc, yc, f, g, a3, b3, e)
        bounds_at = (f, g)  # the potentials the bounds were computed for
        keep = truncation_mask(bounds, truncate=truncate, mass_budget=plan_budget)
        geom = TruncatedPointCloud(x3, y3, keep, x_clusters=xc, y_clusters=yc, block_entries=block_entries)
        budget = max_iter - used if last else max(1, min(max_iter - used, (max_iter // 2) // max(1, len(stages) - 1)))
        for rnd in range(max_rounds if last else 1):
            problem = OTProblem(a3, b3, geom, batch_shape)
            # g <- softmin(f) on this geometry: a half step from the extrapolated pair that
            # saves whole iterations (n = 30,000, eps = 1e-2, tol = 1e-4, float32: 1 / 10
            # fine iterations in d = 2 / 3, against 3 / 11 when the loop starts from (f, g))
            g = geom.softmin(f, log_a3, e, axis=0)
            opts = SinkhornOptions(tol=target, max_iter=max(1, budget), eps_scaling=False, lse_mode=True)
            f, g, it, conv, errs, _ = sinkhorn_problem(problem, e, opts, init=(f, g))
            n_iter += it
            spent = int(it.max())
            used += spent
            budget -= spent
            stage_iters.append(spent)
            if not last:
                break
            rounds = rnd + 1
            errors_all.append(errs)
            # 6. certify the truncation with the final potentials. The mass bounds are
            #    monotone: raising f by at most df and g by at most dg raises every log-bound
            #    by at most (df + dg)/eps, so the bounds of the potentials the kept set was
            #    chosen with certify the new ones at O(n) cost when they moved little
            shift = (f - bounds_at[0]).amax(-1) + (g - bounds_at[1]).amax(-1)
            dropped = bounds.dropped_mass(geom.keep) * torch.exp(shift.to(torch.float64) / eps)
            if not bool((dropped <= DROP_ACCEPT * tol).all()):
                bounds, bounds_at = geom.pair_bounds(f, g, a3, b3, eps), (f, g)
                dropped = bounds.dropped_mass(geom.keep)
            if bool((dropped <= DROP_ACCEPT * tol).all()) or rnd == max_rounds - 1 or budget <= 0:
                break
            # re-expand from the final potentials, well below the acceptance threshold
            keep = truncation_mask(bounds, truncate=truncate, mass_budget=min(DROP_PLAN, DROP_ACCEPT / 4) * tol,
                                   keep=geom.keep)
            geom = geom.with_keep(keep)
    return f, g, geom, n_iter, conv, errors_all, dropped, stages, stage_iters, rounds


def _check_options(eps, tol, truncate, cluster_scale, grad, max_iter, scaling_decay, max_rounds, block_entries):
    """The options of :func:`multiscale_sinkhorn`, checked (the shared ones through
    :data:`~entrokit._validation.SOLVER_OPTIONS`)."""
    eps = check_positive(eps, "eps")
    tol = check_positive(tol, "tol")
    truncate = _check_positive_real(truncate, "truncate", "pass the number of eps below the largest exponent "
                                    "at which blocks are dropped, e.g. truncate=5.0 (GeomLoss's default).")
    if cluster_scale is not None:
        cluster_scale = _check_positive_real(cluster_scale, "cluster_scale", "pass the voxel side as a length in "
                                             "the units of x, or None for the default (~2000 cells).")
    if grad == "unroll":
        raise InputError("multiscale_sinkhorn does not unroll its iterations; use grad='implicit' or 'envelope'.")
    o = check_solver_options("multiscale_sinkhorn", grad=grad, max_iter=max_iter, scaling_decay=scaling_decay)
    grad, scaling_decay = o["grad"], o["scaling_decay"]
    max_iter = o["max_iter"] or SinkhornOptions.max_iter
    max_rounds = check_positive_int(max_rounds, "max_rounds")
    block_entries = check_positive_int(block_entries, "block_entries", allow_none=True)
    return eps, tol, truncate, cluster_scale, grad, max_iter, scaling_decay, max_rounds, block_entries


def _coarse_solve(xc, yc, eps_c: float) -> OTResult:
    """Step 2: eps-scaling Sinkhorn between the cluster centroids, in float64, to
    :data:`COARSE_TOL` (an approximation anyway: its warning is dropped)."""
    problem = OTProblem(xc.weights.detach().double(), yc.weights.detach().double(),
                        PointCloud(xc.centroids.double(), yc.centroids.double()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return sinkhorn_result(problem, eps_c, tol=COARSE_TOL, eps_scaling=True, grad="envelope")


def _info(t_start, t_coarse, t_fine, eps_c, coarse, xc, yc, scale, stages, stage_iters, rounds, geom, dropped) -> dict:
    """The diagnostics of :class:`MultiscaleInfo` (the kept plan's error and the total time
    are added by :func:`_certified_result`)."""
    return {
        "coarse_time": t_coarse - t_start,
        "fine_time": t_fine - t_coarse,
        "coarse_eps": eps_c,
        "coarse_iters": coarse.n_iter.reshape(-1).tolist(),
        "n_clusters": (xc.counts.shape[1], yc.counts.shape[1]),
        "cluster_scale": scale.tolist(),
        "stages": len(stages),
        "stage_iters": stage_iters,
        "rounds": rounds,
        "kept_fraction": geom.kept_fraction.tolist(),
        "dropped_mass_bound": dropped.tolist(),
        "padding_overhead": geom.padding_overhead,
        "kept_marginal_error": [],
        "time": 0.0,
    }


def _certified_result(problem: OTProblem, f, g, eps: float, *, grad: str, n_iter, conv, errors, tol: float,
                      info: dict, dropped, max_iter: int, truncate: float, t_start: float) -> OTResult:
    """The result of the kept (truncated) plan from the one builder, then the dense plan's
    certificate: its marginal error is at most the kept plan's plus twice the dropped mass
    (module docstring, *What is certified*). One ConvergenceWarning per call."""
    B, dtype, batch_shape = problem.a.shape[0], problem.a.dtype, problem.user_batch_shape
    with warnings.catch_warnings(record=True) as caught:
        # one ConvergenceWarning per call: the certification's reason joins the final one
        warnings.simplefilter("always", ConvergenceWarning)
        res = entropic_result(problem, f, g, eps, grad=grad, n_iter=n_iter, converged=conv, errors=errors,
                              method="multiscale_sinkhorn", tol=tol, info=info)
    reasons = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # the dense plan's error is at most the kept plan's plus twice the dropped mass
    kept_err = res.marginal_error.detach().to(torch.float64).reshape(B)
    total_err = kept_err + 2.0 * dropped.to(kept_err.device)
    converged = res.converged.reshape(B) & (total_err <= tol)
    info.update(kept_marginal_error=kept_err.tolist(), time=time.perf_counter() - t_start)
    res = dataclasses.replace(
        res,
        marginal_error=total_err.to(dtype).reshape(batch_shape),
        converged=converged.reshape(batch_shape),
        info=MultiscaleInfo(info),
    )
    warn_not_converged(
        converged, total_err, tol, "multiscale_sinkhorn",
        f"Raise max_iter (now {max_iter}), loosen tol, increase eps (now {eps:g}) or truncate (now {truncate:g}), "
        "or use float64." + "".join(f" Kept plan: {r}" for r in reasons),
    )
    return res


def multiscale_sinkhorn(
    a,
    b,
    x,
    y,
    eps: float,
    *,
    tol: float = 1e-6,
    truncate: float = TRUNCATE,
    cluster_scale: float | None = None,
    max_iter: int | None = None,
    grad: str = "implicit",
    scaling_decay: float = SCALING_DECAY,
    max_rounds: int = MAX_ROUNDS,
    check_inputs: bool = True,
    block_entries: int | None = None,
) -> OTResult:
    r"""Entropic OT between low-dimensional point clouds (:math:`d \le 3`) by two-scale
    truncated Sinkhorn (module docstring), for the cost :math:`C_{ij} = \|x_i - y_j\|^2`.

    Args:
        a: source weights ``[..., n]`` (``None``: uniform); zeros allowed.
        b: target weights ``[..., m]`` (``None``: uniform); same total mass as ``a``.
        x: source points ``[..., n, d]``, :math:`d \le 3`.
        y: target points ``[..., m, d]`` (same batch axes; each problem has its own
            clusters).
        eps: regularization :math:`\varepsilon > 0` in cost units (squared lengths).
        tol: bound on the L1 marginal error of the *dense* plan of the returned
            potentials (module docstring, *What is certified*).
        truncate: :math:`\tau`; every pair with :math:`f_i + g_j - C_{ij} \ge
            -\tau\varepsilon` is kept (GeomLoss's rule, with a safety margin). The mass
            rule and the final check keep more where ``tol`` needs it.
        cluster_scale: voxel side (a length); default :math:`D/(\sqrt d\, 2000^{1/d})`
            per problem (about 1000-2000 cells per cloud).
        max_iter: Sinkhorn iterations on the fine level, over all stages and rounds
            (default 10 000; the coarse solve has its own budget).
        grad: ``"implicit"`` (default) or ``"envelope"`` (see :func:`entrokit.sinkhorn`);
            gradients are those of the truncated plan. ``"unroll"`` is not offered.
        scaling_decay: factor between the fine eps stages.
        max_rounds: fine solves allowed on the last stage (1 + re-expansions of the kept
            set when the final dropped-mass bound exceeds ``tol/8``).
        check_inputs: value checks (finite points, nonnegative weights, equal masses).
        block_entries: entries per batched block product (memory of one tile).

    Returns:
        :class:`~entrokit.OTResult` in the user's order and batch axes, with
        ``method="multiscale_sinkhorn"`` and :class:`MultiscaleInfo`.

    Raises:
        InputError: ``d > 3``, non-finite points, bad ``truncate``/``cluster_scale``,
            mismatched shapes, negative weights or unequal masses.

    Example:
        >>> import torch, entrokit
        >>> from entrokit.solvers.multiscale import multiscale_sinkhorn
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(500, 2, generator=g, dtype=torch.float64)
        >>> y = torch.rand(400, 2, generator=g, dtype=torch.float64)
        >>> res = multiscale_sinkhorn(None, None, x, y, 1e-2, tol=1e-6)
        >>> bool(res.converged), bool(res.marginal_error <= 1e-6)
        (True, True)
    """
    t_start = time.perf_counter()
    eps, tol, truncate, cluster_scale, grad, max_iter, scaling_decay, max_rounds, block_entries = _check_options(
        eps, tol, truncate, cluster_scale, grad, max_iter, scaling_decay, max_rounds, block_entries)
    a3, b3, x3, y3, batch_shape = _prepare(a, b, x, y, check_inputs)
    return multiscale_result(a3, b3, x3, y3, batch_shape, eps, tol=tol, truncate=truncate,
                             cluster_scale=cluster_scale, grad=grad, max_iter=max_iter, scaling_decay=scaling_decay,
                             max_rounds=max_rounds, block_entries=block_entries, t_start=t_start)


def multiscale_result(a3, b3, x3, y3, batch_shape: tuple, eps: float, *, tol: float, truncate: float,
                      cluster_scale: float | None, grad: str, max_iter: int, scaling_decay: float, max_rounds: int,
                      block_entries: int | None, t_start: float) -> OTResult:
    """:func:`multiscale_sinkhorn` on validated, flattened inputs (``a3 [B, n]``, ``b3 [B, m]``,
    ``x3 [B, n, d]``, ``y3 [B, m, d]``) and checked options: the internal entry point."""
    f, g, geom, n_iter, conv, errors, dropped, info = _multiscale_potentials(
        a3, b3, x3, y3, batch_shape, eps, tol=tol, truncate=truncate, cluster_scale=cluster_scale, max_iter=max_iter,
        scaling_decay=scaling_decay, max_rounds=max_rounds, block_entries=block_entries, t_start=t_start)
    problem = OTProblem(a3, b3, geom, batch_shape)
    return _certified_result(problem, f, g, eps, grad=grad, n_iter=n_iter, conv=conv, errors=errors, tol=tol,
                             info=info, dropped=dropped, max_iter=max_iter, truncate=truncate, t_start=t_start)


def _multiscale_potentials(a3, b3, x3, y3, batch_shape: tuple, eps: float, *, tol: float,
                           truncate: float = TRUNCATE, cluster_scale: float | None = None,
                           max_iter: int = SinkhornOptions.max_iter, scaling_decay: float = SCALING_DECAY,
                           max_rounds: int = MAX_ROUNDS, block_entries: int | None = None,
                           t_start: float | None = None, cells: int = DEFAULT_CELLS):
    """Steps 1-6 of the module docstring, without the result: ``(f, g, geom, n_iter,
    converged, errors, dropped, info)``, the fine potentials on the truncated geometry.
    The options default to :func:`multiscale_sinkhorn`'s. ``cells``: the voxel count of the
    default cluster scale (GeomLoss's 2000 by default)."""
    t_start = time.perf_counter() if t_start is None else t_start
    B = x3.shape[0]
    dtype = x3.dtype

    # 1. clusters on one grid per problem
    scale = default_cluster_scale(x3, y3, a3, b3, cells=cells) if cluster_scale is None else torch.full(
        (B,), cluster_scale, dtype=torch.float64, device=x3.device)
    xc, yc = grid_cluster(x3, a3, scale), grid_cluster(y3, b3, scale)

    # 2. coarse eps-scaling Sinkhorn on the centroids, down to eps_c = max(eps, s^2), in
    #    float64 (about 2000 x 2000 points: cheap, and it never hits float32's floor)
    eps_c = max(eps, float(scale.max()) ** 2)
    coarse = _coarse_solve(xc, yc, eps_c)
    t_coarse = time.perf_counter()

    # 3. one soft-min per side to the points
    f, g = extrapolate_potentials(x3, y3, xc, yc, coarse.f.reshape(B, -1), coarse.g.reshape(B, -1), eps_c)

    # 4.-6. truncated Sinkhorn on the fine level, continuing the schedule eps_c -> eps
    f, g, geom, n_iter, conv, errors_all, dropped, stages, stage_iters, rounds = _fine_solve(
        x3, y3, a3, b3, xc, yc, f, g, eps, eps_c, scaling_decay, tol,
        truncate=truncate, max_iter=max_iter, max_rounds=max_rounds, block_entries=block_entries, batch_shape=batch_shape,
    )
    t_fine = time.perf_counter()

    errors = torch.cat(errors_all, 0) if errors_all else torch.zeros(0, B, dtype=dtype, device=x3.device)
    info = _info(t_start, t_coarse, t_fine, eps_c, coarse, xc, yc, scale, stages, stage_iters, rounds, geom, dropped)
    return f, g, geom, n_iter, conv, errors, dropped, info


#: voxels of the online warm start's clustering: half of multiscale_sinkhorn's default. The
#: loop after it needs only a start, and fewer clusters make the coarse solve and the
#: extrapolation cheaper (AMD EPYC, one thread, eps = 1e-2, tol = 1e-4: the whole online
#: solve at n = 2000 / 5000 / 10,000 / 20,000 takes 0.70 / 1.85 / 5.1 / 17.9 s against
#: 1.05 / 2.30 / 6.3 / 17.5 s with 2000 voxels, side by side beside a test run on the other
#: core; idle, results/scale.md: 1.86 s at n = 5000)
WARM_START_CELLS = 1000

#: potentials in a dtype of unit roundoff ``u`` give a plan whose float64 marginal error
#: stays above about ``ROUNDING_FLOOR * u * (max C - min C) / eps``: their rounding moves
#: ``(f_i + g_j - C_ij) / eps`` by ``u |f| / eps`` (per unit of mass). The smallest ratio
#: measured on float32 starts run to their floor is 0.051 (benchmarks/rounding_floor.py,
#: results/rounding_floor.md: n = 300-3000, d = 2 and 3, uniform and Gaussian clouds,
#: eps = 1e-2 and 3e-3); 0.09-0.13 for uniform clouds in the unit cube at eps = 1e-2,
#: d = 2 and 3, independent of n. A start whose tolerance lies below it is not certified
#: (a certificate that fails costs a pass over n x m)
ROUNDING_FLOOR = 0.05


def _cost_range_lower_bound(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""A lower bound of :math:`\max C - \min C` for :math:`C_{ij} = \|x_i - y_j\|^2`, per
    problem, in :math:`O(n + m)`: the spread of the squared distances from one cloud to the
    point of the other farthest from its centroid (:math:`\max_i C_{i0} \le \max C` and
    :math:`\min C \le \min_i C_{i0}`), the larger of the two ways."""
    def spread(p, q):
        far = (q - p.mean(-2, keepdim=True)).pow(2).sum(-1).argmax(-1, keepdim=True)
        d = (p - torch.take_along_dim(q, far.unsqueeze(-1), dim=-2)).pow(2).sum(-1)
        return d.amax(-1) - d.amin(-1)

    x, y = x.detach().double(), y.detach().double()
    return torch.maximum(spread(x, y), spread(y, x))


class WarmStart(NamedTuple):
    """Potentials ``(B, n)``, ``(B, m)`` of :func:`online_warm_start`; ``reached``: whether
    its truncated loop met the tolerance on every problem; ``n_iter``: its fine
    iterations per problem; ``error_floor``: the marginal error below which the plan of
    these potentials, in their dtype, cannot be certified (:data:`ROUNDING_FLOOR`)."""

    f: torch.Tensor
    g: torch.Tensor
    reached: bool
    n_iter: torch.Tensor
    error_floor: float


def online_warm_start(pb: OTProblem, eps: float, tol: float,
                      max_iter: int = SinkhornOptions.max_iter) -> WarmStart | None:
    r"""Starting potentials for :func:`~entrokit.sinkhorn` on an online squared-Euclidean
    :class:`~entrokit.PointCloud` in :math:`d \le` :data:`MAX_DIM` (``pb`` batched): those of
    :func:`multiscale_sinkhorn` at ``tol``, which reaches the tolerance in a few
    truncated iterations where the full online loop spends tens of dense soft-min passes
    (benchmarks/results/scale.md), within ``max_iter`` fine iterations. Returns a
    :class:`WarmStart`, or ``None`` where it does not apply
    (dense or other costs, higher dimension,
    :math:`\varepsilon \ge (\max C - \min C)/50`) or gives no finite potentials. The
    caller's loop certifies the result from these potentials as from any ``init``."""
    geom = pb.geometry
    if not (isinstance(geom, PointCloud) and geom.is_online and geom.cost_fn.name == "sqeuclidean"
            and geom.x.shape[-1] <= MAX_DIM):
        return None
    # only where eps is small against the cost range (the rule of eps_scaling="auto"): there
    # the plain loop is slow and the truncation keeps few pairs; a large eps keeps nearly
    # every pair (the truncated geometry's memory then grows with n m). The exact bounds
    # (one pass over n m) run only where an O(n + m) lower bound does not show the rule
    cost_range = _cost_range_lower_bound(geom.x, geom.y)
    if not bool((cost_range > 50.0 * eps).all()):
        lo, hi = geom.cost_bounds()
        cost_range = hi - lo
        if not bool((cost_range > 50.0 * eps).all()):
            return None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a start: the caller's loop certifies
        # (the problem's weights and points carry the same batch axes: make_problem checked)
        (n, d), m = geom.x.shape[-2:], geom.y.shape[-2]
        B = math.prod(geom.x.shape[:-2])
        # the potentials alone: the caller's loop certifies its own result
        f, g, _, n_iter, reached, *_ = _multiscale_potentials(
            pb.a.detach().reshape(B, n), pb.b.detach().reshape(B, m), geom.x.detach().reshape(B, n, d),
            geom.y.detach().reshape(B, m, d), (B,), eps, tol=tol, max_iter=max_iter, cells=WARM_START_CELLS)
    f, g = f.reshape(pb.a.shape).to(pb.a.dtype), g.reshape(pb.b.shape).to(pb.b.dtype)
    if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
        return None
    # every problem must certify: the largest floor (a unit of mass moves by the same share)
    mass = pb.a.detach().double().sum(-1).reshape(B)
    floor = ROUNDING_FLOOR * torch.finfo(pb.dtype).eps * float((cost_range.reshape(B) * mass).max()) / eps
    return WarmStart(f, g, bool(reached.all()), n_iter, floor)
