r"""The one place where a smooth-OT solve becomes an :class:`~entrokit.OTResult`.

:func:`smooth_result` is deliberately small and self-contained so that it can be swapped
for the library's common result builder.
"""

from __future__ import annotations

import torch

from entrokit._result import OTResult
from entrokit.problem import OTProblem
from entrokit.solvers.omega import Regularizer
from entrokit.solvers.smooth.objectives import _envelope_value, _l1

__all__ = ["smooth_result"]


def smooth_result(
    problem: OTProblem,
    reg: Regularizer,
    out: dict,
    *,
    formulation: str,
    sparse_axis: str,
    tol: float,
    user_batched: bool,
    sparse_plan: bool | None,
) -> OTResult:
    r"""Assemble the result of :func:`~entrokit.solvers.smooth.api.smooth_ot_problem`.

    ``value`` is the dual objective re-evaluated at the frozen potentials with the inputs'
    graph (envelope gradients). ``converged`` is certified: True only if the returned plan,
    recomputed in float64, meets both marginals to ``tol`` (L1) and
    :math:`\langle C, T\rangle` equals ``transport_cost``. ``method`` is ``"smooth"`` (a
    valid ``method=`` of :func:`entrokit.solve`); ``info`` names ``reg``,
    ``formulation`` and ``solver``.
    """
    a, b = problem.a, problem.b
    alpha, beta, plan_internal = out["alpha"], out["beta"], out["plan"]
    plan = plan_internal.transpose(-1, -2) if sparse_axis == "columns" else plan_internal  # (B, n, m)
    value = _envelope_value(reg, formulation, alpha, beta, out["ar"], out["bc"], out["L"])
    C = problem.geometry.cost_matrix()
    transport_cost = (C * plan).sum((-2, -1))
    with torch.no_grad():
        marginal_error = _l1(plan.sum(-1) - a) + _l1(plan.sum(-2) - b)
        primal = transport_cost.detach() + reg.omega(plan_internal).sum(-1)
        nnz_axis = (plan_internal != 0).sum(-1)  # per constrained column
        # certification in float64 on the plan exactly as returned
        P64 = plan.detach().to(torch.float64)
        error64 = _l1(P64.sum(-1) - a.detach().double()) + _l1(P64.sum(-2) - b.detach().double())
        cost64 = (P64 * C.detach().double()).sum((-2, -1))
        rel = 1e-6 if plan.dtype == torch.float64 else 1e-4
        cost_ok = (cost64 - transport_cost.detach().double()).abs() <= rel * cost64.abs()
        converged = out["converged"] & (error64 <= tol).to(out["converged"].device) & cost_ok
        info = dict(out["info"])
        info.update(
            primal_value=primal if user_batched else primal.squeeze(0),
            max_nnz=int(nnz_axis.max()),
            nnz=int((plan_internal != 0).sum()),
            x=(torch.cat([alpha, beta], -1) if formulation == "dual" else alpha),
            certified_error=(error64 if user_batched else error64.squeeze(0)).tolist(),
        )
    f, g = (alpha, beta) if sparse_axis == "columns" else (beta, alpha)
    use_sparse = reg.sparse if sparse_plan is None else bool(sparse_plan)
    squeeze = not user_batched

    def plan_fn(plan=plan):
        P = plan.squeeze(0) if squeeze else plan
        return P.to_sparse() if use_sparse else P

    def sq(t):
        return t.squeeze(0) if squeeze else t

    errors = out["errors"]
    return OTResult(
        f=sq(f), g=sq(g), value=sq(value), transport_cost=sq(transport_cost), marginal_error=sq(marginal_error),
        n_iter=sq(out["n_iter"]), converged=sq(converged),
        errors=errors[:, 0] if squeeze else errors,
        problem=problem.squeeze_batch() if squeeze else problem, eps=reg.gamma,
        method="smooth", grad="envelope", info=info, plan_fn=plan_fn,
    )
