"""The one result checker of the test suite: the result contract of every OT solver.

``converged=True`` means the plan *as returned*, recomputed in float64, meets both
marginals of the problem *as the solver received it* (the inputs cast to the result's
dtype) to ``tol``, and ``transport_cost`` equals :math:`\\langle C, P\\rangle`;
``marginal_error`` reports that plan's error whatever the verdict.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def dense_plan(res) -> torch.Tensor:
    """The returned plan, dense, detached, in float64."""
    P = res.plan
    P = P.to_dense() if P.is_sparse else P
    return P.detach().to(D)


def plan_errors(res, a, b, C) -> tuple[float, float]:
    """``(L1 marginal error, <C, P>)`` of the returned plan in float64, against the problem
    as received (``a, b, C`` rounded to the result's dtype first)."""
    dtype = res.plan.dtype
    a, b, C = (t.to(dtype).to(D) for t in (a, b, C))
    P = dense_plan(res)
    err = float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())
    return err, float((P * C).sum())


def check_ot_result(res, a, b, C, tol, *, require_converged=False, check_reported=True, cost_rtol=None, cost_atol=None):
    """Assert the result contract (module docstring) and return ``(error, cost)``.

    ``require_converged``: the problem is one the solver must solve. ``check_reported``:
    ``marginal_error`` equals the recomputed error (to float rounding). The transport cost
    is compared with ``math.isclose`` (default ``rtol = atol`` = 1e-9 in float64, 1e-5 in
    float32).
    """
    dtype = res.plan.dtype
    err, cost = plan_errors(res, a, b, C)
    if check_reported:
        reported = float(res.marginal_error)
        assert abs(reported - err) <= 1e-6 * max(1.0, err) + 4 * torch.finfo(dtype).eps, (reported, err)
    if require_converged:
        assert bool(res.converged), f"{res.method}: not converged, plan error {err:.3e} (tol {tol:g})"
    if bool(res.converged):
        assert err <= tol * (1 + 1e-9), f"{res.method}: converged but plan error {err:.3e} > tol {tol:g}"
        rtol = cost_rtol if cost_rtol is not None else (1e-9 if dtype == D else 1e-5)
        atol = cost_atol if cost_atol is not None else rtol
        tc = float(res.transport_cost)
        assert math.isclose(cost, tc, rel_tol=rtol, abs_tol=atol), f"{res.method}: <C, P> = {cost!r}, transport_cost = {tc!r}"
    return err, cost


def dense_marginal_error(res, x, y, a, b, eps):
    """L1 marginal error of P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) over all pairs, in
    float64 (the dense formula; independent of the truncated geometry)."""
    f, g = res.f.to(D), res.g.to(D)
    x, y, a, b = x.to(D), y.to(D), a.to(D), b.to(D)
    C = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
    return (P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)


def centred_gap(u, v, mask=None):
    """max |u - v - c| with c the mean gap (potentials are defined up to a constant)."""
    diff = (u - v).to(D)
    if mask is not None:
        diff = diff[mask]
    return float((diff - diff.mean()).abs().max())


def l1_by_hand(P, a, b):
    """``|P 1 - a|_1 + |P^T 1 - b|_1`` with exact (fsum) sums over the float64 values of ``P``."""
    rows = [[float(x) for x in r] for r in P.tolist()]
    a, b = [float(x) for x in a], [float(x) for x in b]
    err_rows = [abs(math.fsum(r) - ai) for r, ai in zip(rows, a)]
    err_cols = [abs(math.fsum(r[j] for r in rows) - bj) for j, bj in enumerate(b)]
    return math.fsum(err_rows) + math.fsum(err_cols)
