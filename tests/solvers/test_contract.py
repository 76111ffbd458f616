"""The result contract, for every method x dtype x engine: ``converged=True`` means the
returned plan, recomputed in float64, meets both marginals to ``tol`` and
``transport_cost == <C, plan>``."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entrokit

D = torch.float64
TOL = 1e-5

# method, extra options, label
ENGINES = [
    ("sinkhorn", {}, "kernel"),
    ("sinkhorn", {"lse_mode": True}, "lse"),
    ("sinkhorn", {"online": True}, "online"),
    ("sns", {}, "sns"),
    ("ssns", {}, "ssns"),
    ("auto", {}, "auto"),
]


def dense_plan(res):
    P = res.plan
    P = P.to_dense() if P.is_sparse else P
    return P.detach().to(D)


def check_contract(res, a, b, C, tol):
    """The promise: converged => float64 plan error <= tol and <C, P> = transport_cost."""
    P = dense_plan(res)
    err = float((P.sum(-1) - a).abs().sum() + (P.sum(-2) - b).abs().sum())
    tc = float((P * C).sum())
    # marginal_error reports the returned plan's error whatever the verdict
    assert abs(float(res.marginal_error) - err) <= 1e-6 * max(1.0, err) + 4 * torch.finfo(res.plan.dtype).eps
    if bool(res.converged):
        assert err <= tol * (1 + 1e-9), f"{res.method}: converged but plan error {err:.3e} > tol"
        rel = 1e-9 if res.plan.dtype == D else 1e-5
        assert abs(tc - float(res.transport_cost)) <= rel * max(1.0, abs(tc)), (tc, float(res.transport_cost))


def run(method, opts, a, b, C, dtype, eps, tol):
    opts = dict(opts)
    cost = C.to(dtype)
    if opts.pop("online", False):
        # a point cloud whose cost is C: x = C rows embedded, y = one-hot (cost callable)
        n, m = C.shape
        x = torch.arange(n, dtype=dtype)[:, None]
        y = torch.arange(m, dtype=dtype)[:, None]
        Cd = cost

        def table(xs, ys):  # (..., n', 1), (..., m', 1) -> (..., n', m'), batch of one
            out = Cd[xs.reshape(-1).long()][:, ys.reshape(-1).long()]
            return out.reshape(*xs.shape[:-2], xs.shape[-2], ys.shape[-2])

        cost = entrokit.PointCloud(x, y, table, chunk_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        return entrokit.solve(a.to(dtype), b.to(dtype), cost, eps=eps, method=method, tol=tol, max_iter=20000, **opts)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.integers(-1, 6))
    C = torch.rand(n, m, generator=gen, dtype=D) * scale
    if n > 1 and draw(st.booleans()):
        C[-1] += 100 * C.max()  # a row far above the rest
    a = torch.rand(n, generator=gen, dtype=D) + 0.05
    b = torch.rand(m, generator=gen, dtype=D) + 0.05
    if n > 1 and draw(st.booleans()):
        a[0] = 0.0  # a zero weight
    if m > 1 and draw(st.booleans()):
        b[-1] = 0.0
    a, b = a / a.sum(), b / b.sum()
    ratio = 10.0 ** draw(st.integers(0, 8))  # cost range / eps up to 1e8
    eps = max(float(C.max()), 1e-3) / ratio
    return a, b, C, eps


@pytest.mark.parametrize("method,opts,label", ENGINES, ids=[e[2] for e in ENGINES])
@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems())
def test_converged_means_the_plan_meets_the_marginals(method, opts, label, dtype, prob):
    a, b, C, eps = prob
    res = run(method, opts, a, b, C, dtype, eps, TOL)
    check_contract(res, a, b, C, TOL)


@pytest.mark.parametrize("reg", ["l2", "entropy"])
@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["f64", "f32"])
@settings(max_examples=10, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems())
def test_smooth_contract(reg, dtype, prob):
    a, b, C, eps = prob
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        res = entrokit.solve(a.to(dtype), b.to(dtype), C.to(dtype), eps=eps, method="smooth", reg=reg, tol=TOL)
    check_contract(res, a, b, C, TOL)
    assert res.method == "smooth"


@pytest.mark.parametrize("method", ["sinkhorn", "sns", "ssns", "smooth", "auto"])
def test_result_method_is_a_valid_method(method):
    a = torch.full((4,), 0.25, dtype=D)
    C = torch.rand(4, 4, generator=torch.Generator().manual_seed(0), dtype=D)
    res = entrokit.solve(a, a, C, eps=0.1, method=method)
    again = entrokit.solve(a, a, C, eps=0.1, method=res.method)
    assert again.method == res.method
