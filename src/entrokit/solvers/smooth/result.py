r"""The one place where a smooth-OT solve becomes an :class:`~entrokit.OTResult`.

:func:`smooth_result` is deliberately small and self-contained so that it can be swapped
for the library's common result builder.
"""

from __future__ import annotations

import torch

from entrokit._result import OTResult, SolverInfo
from entrokit.problem import OTProblem
from entrokit.solvers.implicit import bipartite_adjoint, implicit_fixed_point
from entrokit.solvers.omega import Regularizer
from entrokit.solvers.smooth.objectives import _envelope_value, _l1

__all__ = ["smooth_result"]


def _plan_map(reg: Regularizer, support: torch.Tensor | None):
    r"""The plan as a function of the dual potentials, ``T = T(f, g, C)`` in the user's
    layout ``(B, n, m)``: :math:`T_{ij} = [f_i + g_j - C_{ij}]_+/\gamma` on the support
    (quadratic and top-k; the top-k support is held fixed, as in the generalised
    Jacobian) or :math:`e^{(f_i + g_j - C_{ij})/\gamma - 1}` (entropy)."""
    gamma = reg.gamma

    def plan(f, g, C):
        S = f.unsqueeze(-1) + g.unsqueeze(-2) - C
        if reg.sparse:
            return S.clamp_min(0.0) / gamma * support
        return torch.exp(S / gamma - 1.0)

    def weights(f, g, C):  # dT/dS
        if reg.sparse:
            return support.to(f.dtype) / gamma
        return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / gamma - 1.0) / gamma

    return plan, weights


def _implicit_smooth(geom, f, g, a, b, reg, support):
    """Dual potentials carrying implicit gradients (the one wrapper of
    :mod:`entrokit.solvers.implicit`), with the smooth dual's residual and adjoint."""
    plan_of, weights_of = _plan_map(reg, support)

    def residual(geom, f, g, a, b):
        T = plan_of(f, g, geom.cost_matrix())
        return torch.cat([T.sum(-1) - a, T.sum(-2) - b], -1)

    def adjoint(geom, f, g, a, b, rhs_f, rhs_g):
        W = weights_of(f, g, geom.cost_matrix())

        def Wv(v):
            return (W @ v.unsqueeze(-1)).squeeze(-1)

        def WTu(u):
            return (u.unsqueeze(-2) @ W).squeeze(-2)

        mr, mc = (a > 0).to(f.dtype), (b > 0).to(f.dtype)
        return bipartite_adjoint(Wv, WTu, W.sum(-1), W.sum(-2), 1.0, mr, mc, rhs_f, rhs_g)

    return implicit_fixed_point(geom, f, g, a, b, residual=residual, adjoint=adjoint)


def smooth_result(
    problem: OTProblem,
    reg: Regularizer,
    out: dict,
    *,
    formulation: str,
    sparse_axis: str,
    tol: float,
    sparse_plan: bool | None,
    grad: str = "implicit",
) -> OTResult:
    r"""Assemble the result of :func:`~entrokit.solvers.smooth.api.smooth_ot_problem`.

    ``value`` is the dual objective re-evaluated at the frozen potentials with the inputs'
    graph (envelope gradients, exact). Under ``grad="implicit"`` (default) ``f``, ``g``,
    ``plan`` and ``transport_cost`` carry implicit-function-theorem gradients through the
    optimality residual :math:`(T\mathbf 1 - a, T^\top\mathbf 1 - b) = 0` (computed only
    when backward reaches them); ``grad="envelope"`` freezes the plan. ``converged`` is
    certified: True only if the returned plan, summed in float64, meets both marginals to
    ``tol`` (L1); ``marginal_error`` and ``transport_cost`` are those float64 sums.
    ``method`` is ``"smooth"``; ``info`` names ``reg``, ``formulation`` and ``solver``.
    """
    a, b = problem.a, problem.b
    dtype = a.dtype
    alpha, beta, plan_internal = out["alpha"], out["beta"], out["plan"]
    plan = (plan_internal.transpose(-1, -2) if sparse_axis == "columns" else plan_internal).detach()  # (B, n, m)
    value = _envelope_value(reg, formulation, alpha, beta, out["ar"], out["bc"], out["L"])
    geom = problem.geometry
    C = geom.cost_matrix()
    f, g = (alpha, beta) if sparse_axis == "columns" else (beta, alpha)
    f = torch.where(torch.isfinite(f), f, torch.zeros_like(f)).detach()
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).detach()
    with torch.no_grad():
        # certification in float64 on the plan exactly as returned
        P64 = plan.to(torch.float64)
        error64 = _l1(P64.sum(-1) - a.detach().double()) + _l1(P64.sum(-2) - b.detach().double())
        cost64 = (P64 * C.detach().double()).sum((-2, -1))
        converged = out["converged"] & (error64 <= tol).to(out["converged"].device)
        primal = cost64.to(dtype) + reg.omega(plan_internal).sum(-1)
        nnz_axis = (plan_internal != 0).sum(-1)  # per constrained column
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, *geom.tensors()))
    plan_out, f_out, g_out = plan, f, g
    if needs_graph and grad == "implicit":
        support = (plan != 0) if reg.sparse else None
        f_out, g_out = _implicit_smooth(geom, f, g, a, b, reg, support)
        P_graph = _plan_map(reg, support)[0](f_out, g_out, C)
        plan_out = P_graph + (plan - P_graph).detach()
    transport_cost = (C * plan_out).sum((-2, -1))  # envelope: frozen plan, d/dC = T
    transport_cost = transport_cost + (cost64.to(dtype) - transport_cost).detach()

    user_shape = problem.user_batch_shape if problem.user_batch_shape is not None else tuple(a.shape[:-1])

    def reshape(t, trailing):
        return t.reshape(*user_shape, *t.shape[t.dim() - trailing:]) if trailing else t.reshape(user_shape)

    info = dict(out["info"])
    info.update(
        reg=reg.name, formulation=formulation, solver=out.get("solver", info.get("solver")),
        primal_value=reshape(primal, 0),
        max_nnz=int(nnz_axis.max()),
        nnz=int((plan_internal != 0).sum()),
        x=(torch.cat([alpha, beta], -1) if formulation == "dual" else alpha).detach(),
        certified_error=reshape(error64, 0).tolist(),
    )
    use_sparse = reg.sparse if sparse_plan is None else bool(sparse_plan)

    def plan_fn(plan=plan_out):
        P = reshape(plan, 2)
        return P.to_sparse() if use_sparse else P

    errors = out["errors"]
    return OTResult(
        f=reshape(f_out, 1), g=reshape(g_out, 1), value=reshape(value, 0),
        transport_cost=reshape(transport_cost, 0), marginal_error=reshape(error64.to(dtype), 0),
        n_iter=reshape(out["n_iter"], 0), converged=reshape(converged, 0),
        errors=errors.reshape(errors.shape[0], *user_shape),
        problem=problem.squeeze_batch(), eps=reg.gamma,
        method="smooth", grad=grad, info=SolverInfo(info), plan_fn=plan_fn,
    )
