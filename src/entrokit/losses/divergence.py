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

import warnings

import torch

from entrokit._errors import ConvergenceWarning, InputError
from entrokit._validation import check_choice, check_positive, check_positive_int, reject_meta
from entrokit.geometry import Geometry, PointCloud
from entrokit.problem import OTProblem, make_problem
from entrokit.solvers._entropic import warn_not_converged
from entrokit.solvers.newton import sinkhorn_newton
from entrokit.solvers.sinkhorn import SinkhornOptions, internal_tol, sinkhorn_problem
from entrokit.solvers.solve import auto_method

__all__ = ["sinkhorn_divergence", "entropic_ot_value"]


def _geometries(x, y, cost, chunk_size) -> tuple[Geometry, Geometry | None, Geometry | None]:
    if isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(g, Geometry) for g in x):
        if y is not None:
            raise InputError("pass either the three geometries (xy, xx, yy) as x, or points x and y; not both.")
        return tuple(x)
    if isinstance(x, Geometry):
        if y is not None:
            raise InputError("x is a geometry: leave y=None (the geometry holds both point sets).")
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


def _solve(pb: OTProblem, eps: float, tol: float, max_iter: int, eps_scaling, decay: float, symmetric: bool):
    """One entropic problem through the one Sinkhorn loop: ``(value, converged, error)`` in
    the user's batch shape, ``value`` differentiable by the envelope theorem.

    A single dense cross-problem whose Sinkhorn rate predicts a long run (plans close to a
    permutation at small ``eps``, where the alternating updates mix slowly) is handed, with
    its potentials, to the safe sparse Newton solver, as ``solve(method="auto")`` would.
    """
    newton_ok = not symmetric and auto_method(pb.squeeze_batch(), eps)[0] == "ssns"
    opts = SinkhornOptions(tol=internal_tol(tol, pb), max_iter=max_iter, eps_scaling=eps_scaling,
                           scaling_decay=decay, symmetric=symmetric, stop_when_slow=newton_ok)
    f, g, n_iter, converged, errors, info = sinkhorn_problem(pb, eps, opts)
    if "stopped_slow" in info:
        sq = pb.squeeze_batch()
        with warnings.catch_warnings():
            # one ConvergenceWarning per call: the divergence's own (_warn) reports this problem
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = sinkhorn_newton(sq.a, sq.b, sq.geometry, eps, variant="ssns", tol=tol, max_iter=max_iter,
                                  init=(f.reshape(sq.a.shape), g.reshape(sq.b.shape)), grad="envelope",
                                  check_inputs=False)
        return res.value, torch.as_tensor(res.converged), torch.as_tensor(res.marginal_error)
    value = _dual_value(pb, f, g, eps)
    shape = pb.user_batch_shape if pb.user_batch_shape is not None else ()
    err = errors[-1] if len(errors) else torch.full_like(value, float("inf"))
    return value.reshape(shape), converged.reshape(shape), err.reshape(shape)


def _dual_value(pb: OTProblem, f, g, eps: float) -> torch.Tensor:
    r"""The dual value :math:`\langle a,f\rangle + \langle b,g\rangle - \varepsilon(\sum P -
    \sum a\sum b)` at the (detached) potentials. Its partial derivatives are the exact
    gradient of :math:`\mathrm{OT}_\varepsilon` (envelope theorem, Feydy et al. Prop. 2):
    :math:`\partial/\partial C = P`. Geometries with a closed-form
    :meth:`~entrokit.Geometry.transport_cost_vjp` get it from plan products
    (:class:`_EnvelopeValue`); others by autograd through one reduction."""
    geom, a, b = pb.geometry, pb.a, pb.b
    if torch.is_grad_enabled() and geom.has_transport_cost_vjp:
        return _EnvelopeValue.apply(a, b, f, g, geom.detach(), eps, *geom.tensors())
    mass = geom.plan_reduce(f, g, a, b, eps)[0].sum(-1)
    return geom.row_sum(a * f) + geom.col_sum(b * g) - eps * (mass - a.sum(-1) * b.sum(-1))


class _EnvelopeValue(torch.autograd.Function):
    r"""Dual value with its envelope gradient: the geometry's
    :meth:`~entrokit.Geometry.transport_cost_vjp` for its tensors, and
    :math:`\partial_{a_i} = f_i - \varepsilon r_i / a_i + \varepsilon\sum b` (symmetrically
    for ``b``), where :math:`r, c` are the plan's marginals: the plan is applied, never
    differentiated through (no :math:`n m` autograd graph)."""

    @staticmethod
    def forward(ctx, a, b, f, g, geom, eps, *geom_tensors):
        a_, b_ = a.detach(), b.detach()
        Pv, PTu, r, c = geom.plan_operator(f, g, a_, b_, eps)
        value = (a_ * f).sum(-1) + (b_ * g).sum(-1) - eps * (r.sum(-1) - a_.sum(-1) * b_.sum(-1))
        need = ctx.needs_input_grad
        ctx.cost_grads = geom.transport_cost_vjp(Pv, PTu, r, c) if any(need[6:]) else None
        # r_i / a_i and c_j / b_j without dividing by zero weights: exp((f - T f)/eps)
        ra = torch.exp((f - geom.softmin(g, b_.log(), eps, axis=1)) / eps) if need[0] else None
        cb = torch.exp((g - geom.softmin(f, a_.log(), eps, axis=0)) / eps) if need[1] else None
        ga = f - eps * ra + eps * b_.sum(-1, keepdim=True) if ra is not None else None
        gb = g - eps * cb + eps * a_.sum(-1, keepdim=True) if cb is not None else None
        ctx.weight_grads = (ga, gb)
        return value

    @staticmethod
    def backward(ctx, grad):
        w = grad.unsqueeze(-1)
        ga, gb = (None if t is None else w * t for t in ctx.weight_grads)
        cost = [None] * (len(ctx.needs_input_grad) - 6)
        if ctx.cost_grads is not None:
            cost = [grad.reshape(-1, *[1] * (t.dim() - 1)) * t for t in ctx.cost_grads]
        return (ga, gb, None, None, None, None, *cost)


def _self_problem(geom: Geometry, w: torch.Tensor, pb_xy: OTProblem, check_inputs: bool) -> OTProblem:
    geom = geom.reshape_batch(pb_xy.user_batch_shape) if pb_xy.user_batch_shape else geom
    user = pb_xy.user_batch_shape
    w_user = w.reshape(*user, w.shape[-1]) if user is not None else w
    return make_problem(w_user, w_user, geom, check_inputs=check_inputs).with_batch()


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
    tol = check_positive(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter", allow_none=True) or SinkhornOptions.max_iter
    if eps_scaling not in (True, False, "auto"):
        raise InputError(f"eps_scaling must be True, False or 'auto'; got {eps_scaling!r}.")
    if not (0.0 < float(scaling_decay) < 1.0):
        raise InputError(f"scaling_decay must lie in (0, 1), got {scaling_decay!r}; try 0.5.")
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be True or False, got {type(debias).__name__}.")
    if isinstance(cost, str):
        check_choice(cost, "cost", ("sqeuclidean", "euclidean"))
    geom_xy, geom_xx, geom_yy = _geometries(x, y, cost, chunk_size)
    pb_xy = make_problem(a, b, geom_xy, normalize=normalize, check_inputs=check_inputs).with_batch()
    results = [_solve(pb_xy, eps, tol, max_iter, eps_scaling, scaling_decay, symmetric=False)]
    if debias:
        if geom_xx is None:
            geom_xx, geom_yy = geom_xy.self_geometries()
        for geom, w in ((geom_xx, pb_xy.a), (geom_yy, pb_xy.b)):
            pb = _self_problem(geom, w, pb_xy, check_inputs)
            results.append(_solve(pb, eps, tol, max_iter, eps_scaling, scaling_decay, symmetric=True))
    _warn(results, tol, eps, max_iter)
    value = results[0][0]
    if debias:
        value = value - 0.5 * (results[1][0] + results[2][0])
    return value


def entropic_ot_value(x, y=None, *, eps: float, **options) -> torch.Tensor:
    r""":math:`\mathrm{OT}_\varepsilon(\alpha,\beta)` alone (``sinkhorn_divergence(...,
    debias=False)``): biased, :math:`\ne 0` for :math:`\alpha=\beta`."""
    return sinkhorn_divergence(x, y, eps=eps, debias=False, **options)


def _warn(results, tol: float, eps: float, max_iter: int) -> None:
    converged = torch.stack([c.reshape(-1) for _, c, _ in results]).all(0)
    merr = torch.stack([e.reshape(-1).double() for _, _, e in results]).amax(0)
    warn_not_converged(
        converged, merr, tol, "sinkhorn_divergence",
        f"Raise max_iter (now {max_iter}), loosen tol, increase eps (now {eps:g}) or use float64.",
    )
