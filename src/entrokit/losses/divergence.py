r"""The debiased Sinkhorn divergence between two measures.

For weighted point sets :math:`\alpha = \sum_i a_i\delta_{x_i}` and
:math:`\beta = \sum_j b_j\delta_{y_j}` (Feydy et al., AISTATS 2019, eq. 4; Genevay et al.,
AISTATS 2018),

.. math::

    S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta)
        - \tfrac12\mathrm{OT}_\varepsilon(\alpha, \alpha)
        - \tfrac12\mathrm{OT}_\varepsilon(\beta, \beta),

where :math:`\mathrm{OT}_\varepsilon` is the entropic OT value
:math:`\min_P \langle C, P\rangle + \varepsilon\,\mathrm{KL}(P\|a\otimes b)`
(:attr:`entrokit.OTResult.value`, equal to the dual :math:`\langle a,f\rangle+\langle b,g\rangle`
at the optimum). For a positive-definite kernel :math:`e^{-C/\varepsilon}` (squared
Euclidean or Euclidean costs) :math:`S_\varepsilon \ge 0`, with equality iff
:math:`\alpha = \beta` (Feydy et al., Thm. 1); it interpolates between OT
(:math:`\varepsilon\to 0`) and an MMD (:math:`\varepsilon\to\infty`).

**How it is computed.** The three problems run through the one Sinkhorn loop
(:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`) to the L1 marginal tolerance ``tol``,
not a fixed schedule. When the cross-term's measured rate predicts thousands of
iterations (a single dense problem at ``eps`` below 1e-2 of the cost range), its
potentials warm-start the safe sparse Newton solver (``method="ssns"``), as
``solve(method="auto")`` does. The self-terms use the symmetric averaged update
:math:`f \leftarrow \tfrac12(f + T_\varepsilon f)` (Feydy et al., Alg. 3.4), which
converges in a few iterations where the alternating update mixes slowly (plans close to
the identity). All three are batched over the leading axes.

**Gradients** are exact to first order: each term's value is differentiated by the
envelope theorem (potentials held fixed), which is its true gradient with respect to the
points, the cost and the weights (Feydy et al., Prop. 2).
"""

from __future__ import annotations

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import (
    check_choice,
    check_positive,
    check_solver_options,
    match_half_masses,
    reject_meta,
    upcast_half,
)
from entrokit.geometry import Geometry, PointCloud
from entrokit.problem import OTProblem, make_problem
from entrokit.solvers._entropic import entropic_result, warn_not_converged
from entrokit.solvers.newton import newton_problem
from entrokit.solvers.sinkhorn import SinkhornOptions, internal_tol, sinkhorn_problem
from entrokit.solvers.solve import auto_method

__all__ = ["sinkhorn_divergence", "entropic_ot_value", "divergence"]


def _geometries(x, y, cost, chunk_size) -> tuple[Geometry, Geometry | None, Geometry | None]:
    if isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(g, Geometry) for g in x):
        if y is not None:
            raise InputError("pass either the three geometries (xy, xx, yy) as x, or points x and y; not both.")
        return tuple(x)
    if isinstance(x, Geometry):
        if y is not None:
            raise InputError("x is a geometry: leave y=None (the geometry holds both point sets).")
        if type(x) is PointCloud:  # its self-problems are derived from the checked cross problem
            return x, None, None
        try:
            xx, yy = x.self_geometries()
        except NotImplementedError as err:
            raise InputError(str(err)) from None
        return x, xx, yy
    if y is None:
        raise InputError(
            "y is missing: pass two point clouds x (..., n, d) and y (..., m, d), a PointCloud, "
            "or the three geometries (xy, xx, yy)."
        )
    if isinstance(y, Geometry):
        raise InputError("y is a geometry: pass the geometry as x and leave y=None.")
    return PointCloud(x, y, cost, chunk_size=chunk_size), None, None


def _solve(pb: OTProblem, eps: float, tol: float, max_iter: int, eps_scaling, decay: float,
           symmetric: bool) -> OTResult:
    """One entropic problem through the one Sinkhorn loop, assembled by the one result
    builder (:func:`~entrokit.solvers._entropic.entropic_result`, ``grad="envelope"``:
    ``value`` with its exact gradient, by the geometry's closed-form VJP where it has one).

    A single dense cross-problem whose Sinkhorn rate predicts a long run (plans close to a
    permutation at small ``eps``, where the alternating updates mix slowly) is handed, with
    its potentials, to the safe sparse Newton solver, as ``solve(method="auto")`` would.
    The result keeps the solvers' claim of convergence (the divergence reports it once).
    """
    newton_ok = not symmetric and auto_method(pb, eps)[0] == "ssns"
    opts = SinkhornOptions(tol=internal_tol(tol, pb), max_iter=max_iter, eps_scaling=eps_scaling,
                           scaling_decay=decay, symmetric=symmetric, stop_when_slow=newton_ok)
    f, g, n_iter, converged, errors, info = sinkhorn_problem(pb, eps, opts)
    method = "sinkhorn"
    if "stopped_slow" in info:
        f, g, n_iter, converged, errors, info = newton_problem(pb, eps, variant="ssns", tol=tol, max_iter=max_iter,
                                                               init=(f, g))
        method = "ssns"
    return entropic_result(pb, f, g, eps, grad="envelope", n_iter=n_iter, converged=converged, errors=errors,
                           method=method, tol=tol, certify=False, info=info, user_problem=pb)


def _self_problems(geoms, pb_xy: OTProblem, check_inputs: bool) -> list[OTProblem]:
    """The self-problems ``(a, a, C(x, x))`` and ``(b, b, C(y, y))`` of the checked cross
    problem: derived from its batched geometry (same points, nothing to check again), or
    the geometries the caller passed (checked here)."""
    if geoms is None:
        return [OTProblem(w, w, geom, pb_xy.user_batch_shape)
                for geom, w in zip(pb_xy.geometry.self_geometries(), (pb_xy.a, pb_xy.b))]
    user = pb_xy.user_batch_shape
    out = []
    for geom, w in zip(geoms, (pb_xy.a, pb_xy.b)):
        w_user = w.reshape(*user, w.shape[-1])
        out.append(make_problem(w_user, w_user, geom, check_inputs=check_inputs).with_batch())
    return out


@reject_meta
def sinkhorn_divergence(
    x,
    y=None,
    *,
    eps: float,
    a=None,
    b=None,
    cost="sqeuclidean",
    tol: float = 1e-6,
    max_iter: int | None = None,
    debias: bool = True,
    eps_scaling: bool | str = "auto",
    scaling_decay: float = 0.5,
    chunk_size: int | None = None,
    normalize: bool = False,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Debiased Sinkhorn divergence :math:`S_\varepsilon(\alpha,\beta)` (module docstring).

    Args:
        x: source points ``(..., n, d)``; or a geometry holding both point sets
            (:class:`~entrokit.PointCloud`); or a triple of geometries
            ``(C(x, y), C(x, x), C(y, y))`` for any other cost.
        y: target points ``(..., m, d)`` (``None`` when ``x`` is a geometry).
        eps: regularization :math:`\varepsilon > 0`, absolute, in cost units
            (``"sqeuclidean"`` is :math:`\|x-y\|^2`; GeomLoss's ``blur`` with ``p=2``
            corresponds to ``eps = 2 * blur**2`` on this cost and half the value, see
            :class:`entrokit.nn.SinkhornLoss`).
        a, b: weights ``(..., n)``, ``(..., m)``; ``None`` means uniform. Zero weights are
            exact (the point drops out).
        cost: ``"sqeuclidean"``, ``"euclidean"`` or a callable ``c(x, y)`` (points only).
        tol: every OT problem is solved to an L1 marginal error :math:`\le` ``tol``; the
            divergence is then accurate to about ``tol * max|C|``.
        max_iter: iteration budget per problem (default 10 000).
        debias: ``False`` returns :math:`\mathrm{OT}_\varepsilon(\alpha,\beta)` alone.
        eps_scaling, scaling_decay: as in :func:`entrokit.sinkhorn` (speed only: every
            problem is solved to ``tol``).
        chunk_size: tile size for point clouds that should not be materialised
            (memory :math:`O((n+m)\cdot` chunk_size :math:`)`).
        normalize: rescale both weight vectors to unit mass.
        check_inputs: value checks at the boundary (switch off inside training loops).

    Returns:
        A tensor of the batch shape (a 0-d tensor for one pair), differentiable with respect
        to the points (or the geometries' tensors) and the weights. A problem that does not
        reach ``tol`` emits one :class:`~entrokit.ConvergenceWarning`.

    Example:
        >>> import torch, entrokit
        >>> x = torch.randn(50, 2, dtype=torch.float64)
        >>> s = entrokit.sinkhorn_divergence(x, x + 1.0, eps=0.1)
        >>> bool(s > 0), bool(entrokit.sinkhorn_divergence(x, x, eps=0.1).abs() < 1e-6)
        (True, True)
    """
    eps = check_positive(eps, "eps")
    o = check_solver_options("sinkhorn_divergence", tol=tol, max_iter=max_iter, eps_scaling=eps_scaling,
                             scaling_decay=scaling_decay)
    tol, eps_scaling, scaling_decay = o["tol"], o["eps_scaling"], o["scaling_decay"]
    max_iter = o["max_iter"] or SinkhornOptions.max_iter
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be True or False, got {type(debias).__name__}.")
    if isinstance(cost, str):
        check_choice(cost, "cost", ("sqeuclidean", "euclidean"))
    return divergence(x, y, a, b, eps=eps, cost=cost, chunk_size=chunk_size, normalize=normalize,
                      check_inputs=check_inputs, debias=debias, tol=tol, max_iter=max_iter,
                      eps_scaling=eps_scaling, scaling_decay=scaling_decay)


def divergence(x, y, a, b, *, eps: float, cost, chunk_size, normalize: bool, check_inputs: bool, debias: bool,
               tol: float, max_iter: int, eps_scaling, scaling_decay: float) -> torch.Tensor:
    """:func:`sinkhorn_divergence` with checked options (what it and
    :class:`~entrokit.nn.SinkhornLoss` call): one geometry and one validated problem, three
    results from the one builder. float16/bfloat16 points and weights are solved in float32
    and the value is returned in their dtype (half weights whose masses agree to half
    precision are balanced, :func:`~entrokit._validation.match_half_masses`)."""
    if isinstance(x, torch.Tensor):
        t, out_dtype = upcast_half(x=x, y=y, a=a, b=b)
        x, y, a, b = t["x"], t["y"], t["a"], t["b"]
        if out_dtype is not None:
            a, b = match_half_masses(a, b, out_dtype)
    else:
        out_dtype = None
    geom_xy, geom_xx, geom_yy = _geometries(x, y, cost, chunk_size)
    pb_xy = make_problem(a, b, geom_xy, normalize=normalize, check_inputs=check_inputs).with_batch()
    results = [_solve(pb_xy, eps, tol, max_iter, eps_scaling, scaling_decay, symmetric=False)]
    if debias:
        for pb in _self_problems(None if geom_xx is None else (geom_xx, geom_yy), pb_xy, check_inputs):
            results.append(_solve(pb, eps, tol, max_iter, eps_scaling, scaling_decay, symmetric=True))
    _warn(results, tol, eps, max_iter)
    value = results[0].value
    if debias:
        value = value - 0.5 * (results[1].value + results[2].value)
    return value if out_dtype is None else value.to(out_dtype)


def entropic_ot_value(x, y=None, *, eps: float, **options) -> torch.Tensor:
    r""":math:`\mathrm{OT}_\varepsilon(\alpha,\beta)` alone (``sinkhorn_divergence(...,
    debias=False)``): biased, :math:`\ne 0` for :math:`\alpha=\beta`."""
    return sinkhorn_divergence(x, y, eps=eps, debias=False, **options)


def _warn(results, tol: float, eps: float, max_iter: int) -> None:
    converged = torch.stack([r.converged.reshape(-1) for r in results]).all(0)
    merr = torch.stack([r.marginal_error.reshape(-1).double() for r in results]).amax(0)
    warn_not_converged(
        converged, merr, tol, "sinkhorn_divergence",
        f"Raise max_iter (now {max_iter}), loosen tol, increase eps (now {eps:g}) or use float64.",
    )
