r"""The one result builder of the entropic solvers (Sinkhorn, SNS/SSNS): gauge, gradient
mode, certification.

**Certification.** ``converged`` is what the solver claims *and* what the returned plan
proves: the plan :math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}` built from the
returned potentials, exactly as :attr:`OTResult.plan` builds it in the working dtype, is
summed in float64, and ``marginal_error`` :math:`= \|P\mathbf 1 - a\|_1 + \|P^\top\mathbf 1
- b\|_1` and ``transport_cost`` :math:`=\langle C, P\rangle` come from that sum. When
float32 cannot resolve the potentials (their rounding error, relative to :math:`\varepsilon`,
is about :math:`10^{-7}\,\|C\|_\infty/\varepsilon`), the result says ``converged=False``
and one :class:`~entrokit.ConvergenceWarning` names the remedy. In float64 the scaling
engine's own reduction is used (no extra pass).

**Gradient modes** (:mod:`entrokit.solvers.implicit`):

* ``"implicit"`` (default): every output has its exact derivative. ``value`` by the
  envelope theorem (free); ``f``, ``g``, ``plan`` and ``transport_cost`` by implicit
  differentiation, whose adjoint solve runs only when backward reaches them. The gauge
  fix of ``f`` and ``g`` (and their soft :math:`c`-transforms on rows or columns of zero
  weight) is applied after the implicit Function, in the graph: the implicit derivative
  is exact only up to the gauge direction, the fixed potentials do not depend on it.
* ``"envelope"``: the cheap frozen-plan mode. ``value`` is exact; ``f``, ``g`` and
  ``plan`` are constants, and ``transport_cost`` differentiates with the plan held fixed
  (:math:`\partial\langle C,P\rangle/\partial C = P`), which is *not* its derivative.
* ``"unroll"``: autograd through the iterations (the solver passes potentials that carry
  the graph).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from entrokit._errors import ConvergenceWarning
from entrokit._result import OTResult, SolverInfo
from entrokit.problem import OTProblem, log_weights
from entrokit.solvers.implicit import AdjointSolver, implicit_potentials

__all__ = ["entropic_result", "warn_not_converged", "GRAD_MODES", "certify_plan"]

GRAD_MODES = ("implicit", "envelope", "unroll")


def certify_plan(geom, f, g, a, b, eps, *, round_to=None):
    """``(row, col, transport_cost, rounded)`` of the plan :attr:`OTResult.plan` returns,
    summed in float64 (no autograd graph); ``rounded`` says whether the entries were
    rounded to ``round_to`` first (geometries that do not support it sum unrounded)."""
    args = (f.detach(), g.detach(), a.detach(), b.detach(), eps)
    with torch.no_grad():
        if round_to is not None:
            try:
                return (*geom.plan_reduce(*args, accumulate=torch.float64, round_to=round_to), True)
            except TypeError:
                pass
        return (*geom.plan_reduce(*args, accumulate=torch.float64), False)


def _reduce_is_exact(geom, eps: float, tol: float) -> bool:
    """Whether a solver's own reduction of its final plan (the scaling engine's ``K u v``)
    equals the plan rebuilt from the potentials well below ``tol``: their entries differ
    by about ``1e-16 * max|C| / eps`` relative."""
    return float(geom.max_cost().max()) / eps * 1e-15 <= 1e-3 * tol


def _gauge_shift(geom, f, g, a, b) -> torch.Tensor:
    r"""The constant :math:`s = (\langle a, f\rangle - \langle b, g\rangle) / (\sum a + \sum b)`
    such that :math:`(f - s, g + s)` satisfies :math:`\langle a, f\rangle = \langle b, g\rangle`."""
    return (geom.row_sum(a * f) - geom.col_sum(b * g)) / (geom.row_sum(a) + geom.col_sum(b))


def _fix_gauge_in_graph(geom, f, g, a, b, eps):
    r"""The returned potentials, in the graph, from potentials that carry implicit gradients.

    The implicit derivative of :math:`(f, g)` is exact only up to the gauge direction
    :math:`(\mathbf 1, -\mathbf 1)` and on rows/columns of positive weight
    (:mod:`entrokit.solvers.implicit`). The returned potentials are
    :math:`\Phi(f, g) = (f - s, g + s)` with :math:`s` from :func:`_gauge_shift`, which does
    not depend on that direction (:math:`\Phi(f + t, g - t) = \Phi(f, g)`), and, on rows
    (columns) of zero weight, the soft :math:`c`-transform of the other potential (what the
    solvers return there). Differentiating both composes to the exact derivative of the
    returned ``f`` and ``g``. The inputs already hold those values: only the graph is added
    (forward values stay bit for bit the solver's).
    """
    s = _gauge_shift(geom, f, g, a, b)
    s = (s - s.detach()).unsqueeze(-1)
    f, g = f - s, g + s
    zero_a, zero_b = a == 0, b == 0
    # counted through the geometry: a sharded one decides the same on every rank
    if bool((geom.row_sum(zero_a.to(a.dtype)) + geom.col_sum(zero_b.to(b.dtype)) > 0).any()):
        f_ct = geom.softmin(g, log_weights(b), eps, axis=1)
        g_ct = geom.softmin(f, log_weights(a), eps, axis=0)
        f = torch.where(zero_a, f_ct + (f - f_ct).detach(), f)
        g = torch.where(zero_b, g_ct + (g - g_ct).detach(), g)
    return f, g


class _Deferred(torch.autograd.Function):
    r"""An output whose forward value is already known (the certified float64 sums) and
    whose vector-Jacobian product is computed only when backward reaches it: no autograd
    graph is built in forward. ``vjp(grad, needs)`` returns one gradient (or ``None``) per
    input tensor."""

    @staticmethod
    def forward(ctx, value, vjp, *inputs):
        ctx.vjp = vjp
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, None, *ctx.vjp(grad, ctx.needs_input_grad[2:]))


def _deferred(value: torch.Tensor, vjp, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _Deferred.apply(value, vjp, *inputs)


def _graph_vjp(fn, inputs, params=()):
    """The VJP of ``fn(*inputs)`` by autograd on a graph built in backward (for
    geometries without a closed form). ``params`` are tensors ``fn`` reaches through the
    cost it closes over (a cost callable's parameters): differentiated as they are, after
    ``inputs`` in ``needs`` and in the result."""

    def vjp(grad, needs):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(inputs, needs)]
            wanted = [leaf for leaf, n in zip(leaves, needs) if n]
            wanted += [p for p, n in zip(params, needs[len(inputs):]) if n]
            out = fn(*leaves)
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return [next(grads) if n else None for n in needs]

    return vjp


def _envelope_vjp(geom, f, g, a, b, eps: float, weights: bool = True):
    r"""VJP of the dual value :math:`D = \langle a,f\rangle + \langle b,g\rangle -
    \varepsilon(\sum P - \sum a\sum b)` at fixed potentials (the envelope theorem,
    Feydy et al. 2019, Prop. 2) with respect to ``(a, b, *geom.tensors())``:
    :math:`\partial D/\partial C = P` through the geometry's closed-form
    :meth:`~entrokit.Geometry.transport_cost_vjp` (plan products, no :math:`nm` graph) and
    :math:`\partial D/\partial a_i = f_i - \varepsilon r_i/a_i + \varepsilon\sum_j b_j`
    (symmetrically for ``b``), with :math:`r_i/a_i = e^{(f_i - T f_i)/\varepsilon}`
    (no division by zero weights). ``weights=False`` gives the frozen-plan derivative of
    :math:`\langle C, P\rangle` (the cost part only)."""
    geom_d, a_, b_ = geom, a.detach(), b.detach()  # backward runs without a graph

    def vjp(grad, needs):
        w = grad.unsqueeze(-1)
        out = [None] * len(needs)
        if weights and needs[0]:
            ra = torch.exp((f - geom_d.softmin(g, log_weights(b_), eps, axis=1)) / eps)
            out[0] = w * (f - eps * ra + eps * geom_d.col_sum(b_).unsqueeze(-1))
        if weights and needs[1]:
            cb = torch.exp((g - geom_d.softmin(f, log_weights(a_), eps, axis=0)) / eps)
            out[1] = w * (g - eps * cb + eps * geom_d.row_sum(a_).unsqueeze(-1))
        if any(needs[2:]):
            Pv, PTu, r, c = geom_d.plan_operator(f, g, a_, b_, eps)
            for i, t in enumerate(geom_d.transport_cost_vjp(Pv, PTu, r, c)):
                if needs[2 + i]:
                    out[2 + i] = grad.reshape(-1, *[1] * (t.dim() - 1)) * t
        return out

    return vjp


def _dual_value(geom, f, g, a, b, eps: float, rows: torch.Tensor) -> torch.Tensor:
    r""":math:`\langle a,f\rangle + \langle b,g\rangle - \varepsilon(\sum P - \sum a\sum b)`
    from the plan's row sums ``rows`` (sums through the geometry: a sharded one sums over
    every rank)."""
    mass = geom.row_sum(rows)
    return geom.row_sum(a * f) + geom.col_sum(b * g) - eps * (mass - geom.row_sum(a) * geom.col_sum(b))


def _certified_sums(geom, geom_hi, f_hi, g_hi, a_hi, b_hi, eps, pre, tol, dtype, certify: bool = True):
    r"""``(row, col, transport_cost, marginal_error)`` of the plan the user gets, summed in
    float64: the solver's own reduction when it is exact to working precision (a float64
    solve, or the float64 finish of a float32 one), else one float64 pass over the plan
    rounded to ``dtype``. A float64 reduction of a plan the user gets in ``dtype`` adds the
    rounding bound ``2 u`` per unit of mass to the marginal error (entrywise
    :math:`|P_\text{lo} - P_\text{hi}| \le u P_\text{hi}`). Without ``certify`` (a caller
    that reports convergence itself) the sums are the solver's reduction or one pass in the
    working precision (no float64 pass)."""
    prec = f_hi.dtype
    if pre is not None and ((prec == torch.float64 and tol is not None and _reduce_is_exact(geom, eps, tol))
                            or not certify):
        row, col, tc, rounded = (*(t.detach() for t in pre), prec == dtype or not certify)
    elif not certify:
        with torch.no_grad():
            row, col, tc = geom_hi.plan_reduce(f_hi, g_hi, a_hi.detach(), b_hi.detach(), eps)
        rounded = True
    else:
        row, col, tc, rounded = certify_plan(geom_hi, f_hi, g_hi, a_hi, b_hi, eps,
                                             round_to=dtype if prec != dtype else None)
    a64, b64 = a_hi.detach().to(torch.float64), b_hi.detach().to(torch.float64)
    row, col = row.to(torch.float64), col.to(torch.float64)
    merr = geom.row_sum((row - a64).abs()) + geom.col_sum((col - b64).abs())
    if prec != dtype and not rounded:
        # the plan is rounded to the input dtype: |P_lo - P_hi| <= u * P_hi entrywise
        merr = merr + 2.0 * torch.finfo(dtype).eps * geom.row_sum(row)
    return row, col, tc, merr


def _outputs_with_grad(geom, f, g, a, b, eps, grad, value, tc_cert, adjoint, params):
    """``(f, g, value, transport_cost)`` carrying their gradients (module docstring).

    ``value`` and ``transport_cost`` keep their certified forward values; their gradients
    are computed when backward reaches them (:class:`_Deferred`): ``value`` by the envelope
    theorem (the geometry's closed-form VJP where it has one), ``transport_cost`` by the
    implicit derivative of the plan or, with ``"envelope"``, at a frozen plan. ``params``,
    the tensors a cost callable holds (:meth:`~entrokit.PointCloud.cost_params`), are
    inputs too, reached through the graph built in backward."""
    tensors = geom.tensors()
    if grad == "unroll":  # the graph of the iterations: autograd through one reduction
        rows, _, tc = geom.plan_reduce(f, g, a, b, eps)
        value_g = _dual_value(geom, f, g, a, b, eps, rows)
        return f, g, value_g + (value - value_g).detach(), tc + (tc_cert - tc).detach()
    f, g = f.detach(), g.detach()
    closed_form = geom.has_transport_cost_vjp and not params
    if closed_form:
        value = _deferred(value, _envelope_vjp(geom, f, g, a, b, eps), (a, b, *tensors))
    else:
        def dual(a_, b_, *t):
            geom_t = geom.rebuild(*t)
            return _dual_value(geom_t, f, g, a_, b_, eps, geom_t.plan_reduce(f, g, a_, b_, eps)[0])

        value = _deferred(value, _graph_vjp(dual, (a, b, *tensors), params), (a, b, *tensors, *params))
    if grad == "envelope":
        # frozen plan: d<C, P>/dC = P (the cost part of the value's derivative), none to a, b
        if closed_form:
            return f, g, value, _deferred(tc_cert, _envelope_vjp(geom, f, g, a, b, eps, weights=False), (a, b, *tensors))
        a_, b_ = a.detach(), b.detach()

        def frozen(*t):
            return -eps * geom.row_sum(geom.rebuild(*t).plan_reduce(f, g, a_, b_, eps)[0])

        return f, g, value, _deferred(tc_cert, _graph_vjp(frozen, tensors, params), (*tensors, *params))
    f_imp, g_imp = implicit_potentials(geom, f, g, a, b, eps, adjoint=adjoint)
    f_out, g_out = _fix_gauge_in_graph(geom, f_imp, g_imp, a, b, eps)
    vjp_t = _graph_vjp(lambda f_, g_, a_, b_, *t: geom.rebuild(*t).plan_reduce(f_, g_, a_, b_, eps)[2],
                       (f_out, g_out, a, b, *tensors), params)
    tc = _deferred(tc_cert, vjp_t, (f_out, g_out, a, b, *tensors, *params))
    return f_out, g_out, value, tc


def _to_user_shape(user_shape, t: torch.Tensor, trailing: int) -> torch.Tensor:
    """``(B, ...)`` -> the user's batch axes, keeping ``trailing`` axes."""
    return t.reshape(*user_shape, *t.shape[t.dim() - trailing:]) if trailing else t.reshape(user_shape)


def _lazy_outputs(geom, out, hi, eps, sums, *, graph: bool, frozen_plan: bool, reshape):
    """``(plan_fn, apply_fn, marginals_fn)`` of :class:`~entrokit.OTResult`: computed on
    demand from the returned potentials ``out = (f, g, a, b)``; forward values from the
    solver-precision ``hi`` ones, gradients through ``out`` when ``graph``. The geometry in
    the solver's precision is derived when the plan is asked for, not kept: a dense float32
    cloud's float64 copy is an n x m matrix that would live as long as the result."""
    f_out, g_out, a, b = out
    dtype, prec = a.dtype, hi[0].dtype

    def plan_fn():
        with torch.no_grad():
            geom_hi = geom if prec == dtype else geom.to_dtype(prec)
            P_hi = geom_hi.plan(*hi, eps).to(dtype)
        if frozen_plan or not graph:
            return reshape(P_hi, 2)
        P = geom.plan(f_out, g_out, a, b, eps)
        return reshape(P + (P_hi - P).detach(), 2)

    def apply_fn(vec, axis):
        n, m = geom.shape
        v = vec.to(dtype=dtype, device=a.device).reshape(-1, m if axis == 1 else n)
        if v.shape[0] != a.shape[0]:
            v = v.expand(a.shape[0], -1)
        return reshape(geom.plan_matvec(f_out, g_out, a, b, eps, v, axis), 1)

    def marginals_fn():
        r, c = geom.marginals(f_out, g_out, a, b, eps) if graph else (t.to(dtype) for t in sums)
        return reshape(r, 1), reshape(c, 1)

    return plan_fn, apply_fn, marginals_fn


def entropic_result(
    problem: OTProblem,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    *,
    grad: str,
    n_iter: torch.Tensor,
    converged: torch.Tensor,
    errors: torch.Tensor,
    method: str,
    tol: float | None = None,
    certify: bool = True,
    info: Mapping[str, Any] | SolverInfo | None = None,
    adjoint: AdjointSolver | None = None,
    user_problem: OTProblem | None = None,
) -> OTResult:
    """Assemble the certified result of a *batched* problem ``(B, n, m)`` (from
    :meth:`OTProblem.with_batch`) and reshape it to the user's batch axes.

    The public solver has checked ``grad`` against the geometry
    (:meth:`~entrokit.Geometry.check_grad_mode`, once, before solving).
    ``f, g`` must be detached for ``grad in {"implicit", "envelope"}`` and carry the
    unrolled graph for ``grad="unroll"``. ``tol`` enables certification (every public
    solver passes it; ``certify=False`` keeps the solver's claim and sums the plan in the
    working precision, for callers that report convergence themselves: the divergence). ``info["reduce"]`` may hold the solver's own
    ``(row, col, tc)`` of the final plan, used when it is exact to working precision
    (float64). ``user_problem``: the problem before :meth:`~OTProblem.with_batch` (kept in
    the result instead of being rebuilt).
    """
    geom, a, b = problem.geometry, problem.a, problem.b
    dtype = a.dtype
    info_type = type(info) if isinstance(info, SolverInfo) else SolverInfo
    info = dict(info.as_dict() if isinstance(info, SolverInfo) else (info or {}))
    pre = info.pop("reduce", None)
    # working precision of the potentials: the solver may hand more digits than the
    # inputs carry (float64 potentials of a float32 solve); plans are built from those
    prec = f.dtype if f.dtype == torch.float64 else dtype
    if prec != dtype:
        geom_hi, a_hi, b_hi = geom.to_dtype(prec), a.detach().to(prec), b.detach().to(prec)
    else:
        geom_hi, a_hi, b_hi = geom, a, b
    f_hi, g_hi = f.to(prec), g.to(prec)
    # fix the gauge (f + c, g - c) so that <a, f> = <b, g>: results do not depend on the
    # engine, the initialisation or the solver that produced them
    shift = _gauge_shift(geom, f_hi, g_hi, a_hi, b_hi).unsqueeze(-1)
    f_hi, g_hi = f_hi - shift, g_hi + shift
    f, g = f_hi.to(dtype), g_hi.to(dtype)
    # tensors a cost callable holds (not among geom.tensors()) need gradients too
    params = geom.cost_params() if torch.is_grad_enabled() and hasattr(geom, "cost_params") else ()
    inputs_need_grad = torch.is_grad_enabled() and (
        bool(params) or any(t.requires_grad for t in (a, b, *geom.tensors())))
    needs_graph = inputs_need_grad or (grad == "unroll" and (f.requires_grad or g.requires_grad))
    f_hi, g_hi = f_hi.detach(), g_hi.detach()

    row, col, tc_cert, merr = _certified_sums(geom, geom_hi, f_hi, g_hi, a_hi, b_hi, eps, pre, tol, dtype, certify)
    claimed = converged.clone()
    if tol is not None and certify:
        converged = converged & (merr <= tol)
    downgraded = claimed & ~converged
    value = _dual_value(geom, f_hi.to(torch.float64), g_hi.to(torch.float64), a_hi.detach().to(torch.float64),
                        b_hi.detach().to(torch.float64), eps, row).to(dtype)
    tc = tc_cert.to(dtype)
    if needs_graph:
        f_out, g_out, value, tc = _outputs_with_grad(geom, f, g, a, b, eps, grad, value, tc, adjoint, params)
    else:
        f_out, g_out = f.detach(), g.detach()

    user_shape = problem.user_batch_shape if problem.user_batch_shape is not None else tuple(a.shape[:-1])
    reshape = functools.partial(_to_user_shape, user_shape)
    graph = f_out.requires_grad or inputs_need_grad
    plan_fn, apply_fn, marginals_fn = _lazy_outputs(
        geom, (f_out, g_out, a, b), (f_hi, g_hi, a_hi.detach(), b_hi.detach()), eps, (row, col),
        graph=graph, frozen_plan=grad == "envelope", reshape=reshape,
    )
    if downgraded.any():
        _warn_certification(merr, downgraded, tol, f.dtype, geom, eps)
    return OTResult(
        f=reshape(f_out, 1),
        g=reshape(g_out, 1),
        value=reshape(value, 0),
        transport_cost=reshape(tc, 0),
        marginal_error=reshape(merr.to(f.dtype), 0),
        n_iter=reshape(n_iter, 0),
        converged=reshape(converged, 0),
        errors=errors.reshape(errors.shape[0], *user_shape),
        problem=user_problem if user_problem is not None else problem.squeeze_batch(),
        eps=eps,
        method=method,
        grad=grad,
        info=info_type(info),
        plan_fn=plan_fn,
        apply_fn=apply_fn,
        marginals_fn=marginals_fn,
    )


def _warn_certification(merr, bad, tol, dtype, geom, eps) -> None:
    worst = float(merr[bad].max())
    k, tot = int(bad.sum()), bad.numel()
    if dtype == torch.float32:
        ratio = float(geom.cost_range().max()) / eps
        hint = (
            f"float32 cannot resolve this problem to tol={tol:g} (cost range / eps = {ratio:.2g}; "
            "float32 potentials carry a relative rounding error of about 1e-7 times that). "
            "Pass float64 inputs, or loosen tol."
        )
    else:
        hint = "The potentials did not pin the plan down to working precision: loosen tol or increase eps."
    warnings.warn(
        f"{k} of {tot} problem(s) reached tol internally, but the returned plan misses the "
        f"marginals by {worst:.3e} > tol: converged=False. {hint}",
        ConvergenceWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside the entrokit package, as seen from the
    function that calls this one (warnings point at the user's line, through any number of
    entrokit wrappers)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_not_converged(converged: torch.Tensor, merr: torch.Tensor, tol: float, method: str, hint: str) -> None:
    """Emit one ConvergenceWarning when any problem did not converge."""
    if bool(converged.all()):
        return
    k = int((~converged).sum())
    tot = converged.numel()
    warnings.warn(
        f"{method} did not converge for {k} of {tot} problem(s): marginal error "
        f"{float(merr.max()):.3e} > tol={tol:g}. {hint}",
        ConvergenceWarning,
        stacklevel=_caller_level(),
    )
