"""The result contract of the Newton solvers: ``converged=True`` means the returned plan,
recomputed in float64, meets both marginals to ``tol`` and ``<C, plan> == transport_cost``.

Regression tests for cases that used to report ``converged=True`` with an L1 marginal
error of 1-2 or a wrong transport cost (upper exponent clamp, un-normalised start
potentials, error measured on another plan than the returned one).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entrokit
from entrokit import sinkhorn_newton
from ot_checks import check_ot_result, plan_errors

D = torch.float64
VARIANTS = ["ssns", "sns"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _solve(a, b, C, eps, variant, tol, dtype=D):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        return sinkhorn_newton(a.to(dtype), b.to(dtype), C.to(dtype), eps, variant=variant, tol=tol)


def _assert_solved(res, a, b, C, tol):
    return check_ot_result(res, a, b, C, tol, require_converged=True, cost_rtol=1e-6, cost_atol=1e-300)[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_degenerate_rows_cost_is_exact(variant):
    # every feasible plan costs 0.5; the upper clamp used to return ~1e-131
    a = b = torch.tensor([0.5, 0.5], dtype=D)
    C = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D)
    res = _solve(a, b, C, 1e-3, variant, 1e-8)
    cost = _assert_solved(res, a, b, C, 1e-8)
    assert math.isclose(cost, 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 4)])
def test_single_row_or_column(variant, shape):
    n, m = shape
    g = torch.Generator().manual_seed(n * 10 + m)
    a = torch.rand(n, generator=g, dtype=D) + 0.1
    b = torch.rand(m, generator=g, dtype=D) + 0.1
    a, b = a / a.sum(), b / b.sum()
    # at C / eps = 1e8 float64 potentials resolve exponents to ~1e8 * 2^-52 = 2e-8
    for scale, tol in ((1.0, 1e-9), (1e6, 1e-7)):
        C = torch.rand(n, m, generator=g, dtype=D) * scale
        res = _solve(a, b, C, 1e-2, variant, tol)
        cost = _assert_solved(res, a, b, C, tol)
        # the only feasible plan is a b^T
        assert math.isclose(cost, float((a[:, None] * b[None, :] * C).sum()), rel_tol=10 * tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_huge_cost_scale(variant):
    g = torch.Generator().manual_seed(0)
    C = torch.rand(40, 30, generator=g, dtype=D) * 1e6  # C / eps up to 1e8
    a = torch.full((40,), 1 / 40, dtype=D)
    b = torch.full((30,), 1 / 30, dtype=D)
    res = _solve(a, b, C, 1e-2, variant, 1e-8)
    cost = _assert_solved(res, a, b, C, 1e-8)
    # at eps = 1e-8 of the cost range the plan is an optimal LP plan: cost near the LP value
    lp = pytest.importorskip("scipy.optimize")
    n, m = C.shape
    A_eq = torch.zeros(n + m, n * m, dtype=D)
    for i in range(n):
        A_eq[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        A_eq[n + j, j::m] = 1
    ref = lp.linprog(C.reshape(-1).numpy(), A_eq=A_eq.numpy(), b_eq=torch.cat([a, b]).numpy(), method="highs")
    assert math.isclose(cost, ref.fun, rel_tol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_far_rows(variant):
    g = torch.Generator().manual_seed(1)
    C = torch.rand(20, 15, generator=g, dtype=D)
    C[-1] += 100 * C.max()
    a = torch.full((20,), 1 / 20, dtype=D)
    b = torch.full((15,), 1 / 15, dtype=D)
    res = _solve(a, b, C, 1e-2, variant, 1e-9)
    _assert_solved(res, a, b, C, 1e-9)
    ref = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-11, max_iter=200_000)
    assert torch.allclose(res.plan, ref.plan, atol=1e-8, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_never_claims_more_than_it_delivers(variant):
    g = torch.Generator().manual_seed(2)
    C = torch.rand(30, 30, generator=g, dtype=D)
    a = torch.full((30,), 1 / 30, dtype=D)
    for eps, tol in [(1e-2, 1e-5), (1e-4, 1e-5), (1e-4, 1e-7)]:
        res = _solve(a, a, C, eps, variant, tol, dtype=torch.float32)
        err, cost = plan_errors(res, a, a, C)  # against the problem as the solver received it
        assert bool(res.converged) == (err <= tol and math.isclose(cost, float(res.transport_cost), rel_tol=1e-4))
        assert float(res.marginal_error) == pytest.approx(err, rel=1e-6, abs=1e-12)
    # the same problems in float64 are solved
    for eps in (1e-2, 1e-4):
        _assert_solved(_solve(a, a, C, eps, variant, 1e-9), a, a, C, 1e-9)


def test_batched_certification_is_per_problem():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(3, 6, 5, generator=g, dtype=D)
    C[1] *= 1e3
    a = torch.full((3, 6), 1 / 6, dtype=D)
    b = torch.full((3, 5), 1 / 5, dtype=D)
    res = _solve(a, b, C, 1e-2, "ssns", 1e-9)
    P = res.plan
    err = (P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)
    assert res.converged.shape == (3,) and bool(res.converged.all())
    assert res.marginal_error.shape == (3,)
    assert (err <= 1e-9).all()
    assert torch.allclose((P * C).sum((-2, -1)), res.transport_cost, rtol=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 8),
    m=st.integers(1, 8),
    log_scale=st.floats(-1.0, 8.0),
    far_row=st.booleans(),
    zero_weights=st.booleans(),
    double=st.booleans(),
    variant=st.sampled_from(VARIANTS),
    seed=st.integers(0, 10_000),
)
def test_property_converged_means_the_returned_plan_is_feasible(
    n, m, log_scale, far_row, zero_weights, double, variant, seed
):
    g = torch.Generator().manual_seed(seed)
    eps = 0.1
    C = torch.rand(n, m, generator=g, dtype=D) * eps * 10.0**log_scale  # C / eps up to 1e8
    if far_row and n > 1:
        C[-1] += 100 * C.max()
    a = torch.rand(n, generator=g, dtype=D) + 0.05
    b = torch.rand(m, generator=g, dtype=D) + 0.05
    if zero_weights:
        if n > 1:
            a[0] = 0.0
        if m > 1:
            b[-1] = 0.0
    a, b = a / a.sum(), b / b.sum()
    tol = 1e-8 if double else 1e-5
    dtype = D if double else torch.float32
    res = _solve(a, b, C, eps, variant, tol, dtype=dtype)
    err, _ = check_ot_result(res, a, b, C, tol, check_reported=False, cost_rtol=1e-6 if double else 1e-4, cost_atol=1e-300)
    if double and log_scale <= 4.0:
        assert bool(res.converged), f"float64 must solve this: plan error {err:.2e}"
