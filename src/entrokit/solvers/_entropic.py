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
    user_batched: bool | None = None,
    info: Mapping[str, Any] | SolverInfo | None = None,
    adjoint: AdjointSolver | None = None,
) -> OTResult:
    """Assemble the certified result of a *batched* problem ``(B, n, m)`` (from
    :meth:`OTProblem.with_batch`) and reshape it to the user's batch axes.

    The public solver has checked ``grad`` against the geometry
    (:meth:`~entrokit.Geometry.check_grad_mode`, once, before solving).
    ``f, g`` must be detached for ``grad in {"implicit", "envelope"}`` and carry the
    unrolled graph for ``grad="unroll"``. ``tol`` enables certification (every public
    solver passes it). ``info["reduce"]`` may hold the solver's own ``(row, col, tc)`` of
    the final plan, used when it is exact to working precision (float64).
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
    shift = _gauge_shift(geom, f_hi, g_hi, a_hi, b_hi)
    f_hi = f_hi - shift.unsqueeze(-1)
    g_hi = g_hi + shift.unsqueeze(-1)
    f, g = f_hi.to(dtype), g_hi.to(dtype)
    inputs_need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, *geom.tensors()))
    needs_graph = inputs_need_grad or (grad == "unroll" and (f.requires_grad or g.requires_grad))

    # certified marginals and <C, P> of the plan the user gets
    if pre is not None and prec == dtype == torch.float64 and tol is not None and _reduce_is_exact(geom, eps, tol):
        row, col, tc_cert = (t.detach() for t in pre)
    else:
        row, col, tc_cert, rounded = certify_plan(geom_hi, f_hi, g_hi, a_hi, b_hi, eps, round_to=dtype if prec != dtype else None)
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    # sums over n and m through the geometry (a sharded one sums over every rank)
    merr = geom.row_sum((row.to(torch.float64) - a64).abs()) + geom.col_sum((col.to(torch.float64) - b64).abs())
    if prec != dtype and not rounded:
        # the plan is rounded to the input dtype: |P_lo - P_hi| <= u * P_hi entrywise
        merr = merr + 2.0 * torch.finfo(dtype).eps * geom.row_sum(row.to(torch.float64))
    claimed = converged.clone()
    if tol is not None:
        converged = converged & (merr <= tol)
    downgraded = claimed & ~converged

    if not needs_graph:
        f_out, g_out = f.detach(), g.detach()
        mass = geom.row_sum(row.to(torch.float64))
        value64 = (
            geom.row_sum(a_hi.to(torch.float64) * f_hi.to(torch.float64))
            + geom.col_sum(b_hi.to(torch.float64) * g_hi.to(torch.float64))
            - eps * (mass - geom.row_sum(a64) * geom.col_sum(b64))
        )
        value = value64.to(dtype)
        tc = tc_cert.to(dtype)
    else:
        if grad == "unroll":
            f_out, g_out = f, g
            f_val, g_val = f, g
        else:
            f_val, g_val = f.detach(), g.detach()  # envelope theorem: exact for value
            if grad == "implicit" and inputs_need_grad:
                f_imp, g_imp = implicit_potentials(geom, f_val, g_val, a, b, eps, adjoint=adjoint)
                f_out, g_out = _fix_gauge_in_graph(geom, f_imp, g_imp, a, b, eps)
            else:
                f_out, g_out = f_val, g_val
        rows_v, _, tc_v = geom.plan_reduce(f_val, g_val, a, b, eps)
        value = geom.row_sum(a * f_val) + geom.col_sum(b * g_val) - eps * (geom.row_sum(rows_v) - geom.row_sum(a) * geom.col_sum(b))
        if grad == "envelope":
            # frozen plan: d<C, P>/dC = P, which is -eps d(sum P)/dC at fixed potentials
            s_c = -eps * geom.row_sum(geom.plan_reduce(f_val, g_val, a.detach(), b.detach(), eps)[0])
            tc = s_c - s_c.detach() + tc_v.detach()
        elif f_out is f_val:
            tc = tc_v
        else:
            tc = geom.plan_reduce(f_out, g_out, a, b, eps)[2]
        # forward value: the certified float64 one; the graph is unchanged
        tc = tc + (tc_cert.to(tc.dtype) - tc).detach()

    frozen_plan = grad == "envelope"

    def plan_fn():
        with torch.no_grad():
            P_hi = geom_hi.plan(f_hi.detach(), g_hi.detach(), a_hi.detach(), b_hi.detach(), eps).to(dtype)
        if frozen_plan or not (f_out.requires_grad or inputs_need_grad):
            return reshape(P_hi, 2)
        P = geom.plan(f_out, g_out, a, b, eps)
        return reshape(P + (P_hi - P).detach(), 2)

    user_shape = problem.user_batch_shape if problem.user_batch_shape is not None else tuple(a.shape[:-1])

    def reshape(t: torch.Tensor, trailing: int) -> torch.Tensor:
        return t.reshape(*user_shape, *t.shape[t.dim() - trailing:]) if trailing else t.reshape(user_shape)

    def to_internal(vec: torch.Tensor, size: int) -> torch.Tensor:
        return vec.to(dtype=dtype, device=a.device).reshape(-1, size)

    def apply_fn(vec, axis):
        n, m = geom.shape
        v = to_internal(vec, m if axis == 1 else n)
        if v.shape[0] != a.shape[0]:
            v = v.expand(a.shape[0], -1)
        out = geom.plan_matvec(f_out, g_out, a, b, eps, v, axis)
        return reshape(out, 1)

    def marginals_fn():
        if f_out.requires_grad or inputs_need_grad:
            r, c = geom.marginals(f_out, g_out, a, b, eps)
        else:
            r, c = row.to(dtype), col.to(dtype)
        return reshape(r, 1), reshape(c, 1)

    if downgraded.any():
        _warn_certification(merr, downgraded, tol, f.dtype, geom, eps)
    n_checks = errors.shape[0]
    return OTResult(
        f=reshape(f_out, 1),
        g=reshape(g_out, 1),
        value=reshape(value, 0),
        transport_cost=reshape(tc, 0),
        marginal_error=reshape(merr.to(f.dtype), 0),
        n_iter=reshape(n_iter, 0),
        converged=reshape(converged, 0),
        errors=errors.reshape(n_checks, *user_shape),
        problem=problem.squeeze_batch(),
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
