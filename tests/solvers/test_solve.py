"""``entrokit.solve``: the "auto" rule (cost and options), the smooth method's eps / gamma, and their reproducers."""

import numpy as np
import pytest
import torch

import entrokit
from entrokit import InputError, PointCloud
from entrokit.problem import make_problem
from entrokit.solvers.solve import NEWTON_ONLINE_ENTRIES, auto_method


def _cost(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(12, 9, generator=g, dtype=torch.float64)


def test_smooth_takes_gamma_alone():
    """solve(..., method="smooth", gamma=0.1) raised TypeError (missing eps); it now equals
    smooth_ot with the same gamma, and eps=gamma is the same call."""
    C = _cost()
    res = entrokit.solve(None, None, C, method="smooth", gamma=0.1)
    ref = entrokit.smooth_ot(None, None, C, gamma=0.1)
    assert res.method == ref.method and bool(res.converged)
    torch.testing.assert_close(res.plan.to_dense() if res.plan.is_sparse else res.plan,
                               ref.plan.to_dense() if ref.plan.is_sparse else ref.plan)
    same = entrokit.solve(None, None, C, eps=0.1, method="smooth", gamma=0.1)
    assert float(same.transport_cost) == pytest.approx(float(res.transport_cost), rel=1e-12)


def test_eps_and_gamma_that_differ_are_refused():
    with pytest.raises(InputError, match="gamma=0.1 and eps=1.0 disagree: both name the regularization strength"):
        entrokit.solve(None, None, _cost(), eps=1.0, method="smooth", gamma=0.1)


def test_missing_eps_is_a_typed_error():
    with pytest.raises(InputError, match="solve needs eps, the regularization strength"):
        entrokit.solve(None, None, _cost())
    with pytest.raises(InputError, match="gamma= is the strength of method='smooth' only"):
        entrokit.solve(None, None, _cost(), gamma=0.1)


D = torch.float64


def _clouds(n, m, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=dtype), torch.randn(m, 2, generator=g, dtype=dtype) + 1


def _exact_plan_error(res, x, y, eps):
    """L1 marginal error of the plan rebuilt from the potentials on the float64 points
    (uniform weights), independent of the solver's geometry code."""
    x, y = x.detach().to(D), y.detach().to(D)
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    n, m = C.shape
    f, g = res.f.detach().to(D), res.g.detach().to(D)
    P = torch.exp((f[:, None] + g[None, :] - C) / eps) / (n * m)
    return float((P.sum(1) - 1 / n).abs().sum() + (P.sum(0) - 1 / m).abs().sum())


def _returned_plan_check(res, x, y):
    """L1 marginal error of the returned plan summed in float64, and |<C, P> - transport_cost|
    with C the float64 cost of the points."""
    x, y = x.detach().to(D), y.detach().to(D)
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    n, m = C.shape
    P = res.plan.detach().to(D)
    err = float((P.sum(1) - 1 / n).abs().sum() + (P.sum(0) - 1 / m).abs().sum())
    return err, abs(float((P * C).sum()) - float(res.transport_cost))


def test_readme_online_line_picks_newton_and_converges():
    # README: solve(a, b, PointCloud(x, y, online=True), eps=1e-2); Sinkhorn took 2,043 iterations
    x, y = _clouds(500, 400, 0)
    geom = PointCloud(x, y, online=True)
    res = entrokit.solve(None, None, geom, eps=1e-2)
    assert geom.is_online
    assert res.method == "ssns" and bool(res.converged)
    assert int(res.n_iter) < 200
    assert _exact_plan_error(res, x, y, 1e-2) <= 1e-6


def test_memory_budget_online_cloud_picks_newton():
    # `entrokit solve src.npy tgt.csv --memory-budget 1000`: 60 x 50 points, forced online;
    # Sinkhorn ended after 10,000 iterations with converged=False
    rng = np.random.default_rng(0)
    x, y = torch.as_tensor(rng.standard_normal((60, 2))), torch.as_tensor(rng.standard_normal((50, 2)) + 1)
    geom = PointCloud(x, y, memory_budget=1000)
    assert geom.is_online
    res = entrokit.solve(None, None, geom, eps=1e-2)
    assert res.method == "ssns" and bool(res.converged) and int(res.n_iter) < 100
    assert _exact_plan_error(res, x, y, 1e-2) <= 1e-6
    # the same potentials as the dense path
    dense = entrokit.solve(None, None, PointCloud(x, y, online=False), eps=1e-2)
    assert torch.allclose(res.f, dense.f, atol=1e-6) and torch.allclose(res.g, dense.g, atol=1e-6)


def test_large_online_cloud_over_budget_stays_on_sinkhorn():
    # 1100 x 1000 > NEWTON_ONLINE_ENTRIES, and 5 float64 copies exceed a 1 MB budget
    x, y = _clouds(1100, 1000, 1)
    assert 1100 * 1000 > NEWTON_ONLINE_ENTRIES
    geom = PointCloud(x, y, memory_budget=1e6)
    method, why = auto_method(make_problem(None, None, geom), 1e-3)
    assert method == "sinkhorn" and "too large for Newton's float64 copy" in why
    # within the budget, Newton
    geom = PointCloud(x, y, online=True, memory_budget=1e9)
    assert auto_method(make_problem(None, None, geom), 1e-3)[0] == "ssns"


@pytest.mark.parametrize("option, value", [("lse_mode", True), ("grad", "unroll"), ("check_every", 2)])
def test_auto_sinkhorn_option_selects_sinkhorn(option, value):
    # issue 26: Sinkhorn-only options raised an InputError when the cost rule picked SSNS
    x, y = _clouds(30, 25, 0)
    C = torch.cdist(x, y) ** 2
    assert auto_method(make_problem(None, None, C), 0.1)[0] == "ssns"
    res = entrokit.solve(None, None, C, eps=0.1, **{option: value})
    assert res.method == "sinkhorn" and bool(res.converged)
    ref = entrokit.solve(None, None, C, eps=0.1, method="sinkhorn")
    assert torch.allclose(res.f.detach(), ref.f, atol=1e-6)


def test_auto_newton_option_selects_newton():
    C = torch.rand(20, 20, generator=torch.Generator().manual_seed(3), dtype=D)
    assert auto_method(make_problem(None, None, C), 1.0)[0] == "sinkhorn"  # large eps
    res = entrokit.solve(None, None, C, eps=1.0, linear_solver="cg")
    assert res.method == "ssns" and bool(res.converged)
    # batches go to Sinkhorn by the cost rule, but a Newton option is Newton's
    res = entrokit.solve(None, None, C.expand(2, 20, 20), eps=1.0, switch_tol=0.1)
    assert res.method == "ssns" and bool(res.converged.all())


def test_auto_options_no_method_takes_all_names_options_and_methods():
    C = torch.rand(5, 6, dtype=D)
    with pytest.raises(InputError, match=r"no method that takes all of grad='unroll', linear_solver='cg'\. "
                                         r"Methods accepting each: grad='unroll': 'sinkhorn'.*; "
                                         r"linear_solver='cg': 'sns', 'ssns'"):
        entrokit.solve(None, None, C, eps=0.1, grad="unroll", linear_solver="cg")
    with pytest.raises(InputError, match=r"not_an_option=1: no method"):
        entrokit.solve(None, None, C, eps=0.1, not_an_option=1)


def test_explicit_method_still_rejects_foreign_options():
    C = torch.rand(5, 6, dtype=D)
    with pytest.raises(InputError, match="method='ssns' it does not take the option.*'lse_mode'"):
        entrokit.solve(None, None, C, eps=0.1, method="ssns", lse_mode=True)
    with pytest.raises(InputError, match="grad='unroll' is not available for the Newton solvers"):
        entrokit.solve(None, None, C, eps=0.1, method="ssns", grad="unroll")


@pytest.mark.parametrize("method", ["auto", "sinkhorn", "ssns", "online"])
def test_float32_point_cloud_meets_default_tol(method):
    # issue 19: 30 x 25 float32 clouds, eps = 0.1 (cost range / eps ~ 250): converged=False at
    # marginal error ~2e-6 on 10 of 10 seeds, whatever the solver
    for seed in range(10):
        x, y = _clouds(30, 25, seed, torch.float32)
        geom = PointCloud(x, y, online=method == "online")
        kw = {} if method in ("auto", "online") else {"method": method}
        res = entrokit.solve(None, None, geom, eps=0.1, **kw)
        assert bool(res.converged), (seed, float(res.marginal_error))
        assert res.f.dtype == torch.float32 and res.plan.dtype == torch.float32
        err, tc_gap = _returned_plan_check(res, x, y)
        assert err <= 1e-6 and tc_gap <= 1e-5 * float(res.transport_cost), (seed, err, tc_gap)


@pytest.mark.parametrize("method", ["sinkhorn", "ssns"])
def test_convergence_warning_points_at_the_callers_line(method):
    # through solve(), numpy_in_out and the thread wrapper: the user's file, not entrokit's
    C = torch.rand(50, 50, generator=torch.Generator().manual_seed(0), dtype=D)
    with pytest.warns(entrokit.ConvergenceWarning) as record:
        entrokit.solve(None, None, C, eps=1e-3, method=method, max_iter=1)
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]


@pytest.mark.parametrize("method", ["sinkhorn", "sns", "ssns"])
def test_option_spec_describes_each_solver_signature(method):
    # the declarative option table and the public signatures agree: every keyword option
    # of the solver is a row for it (solve() and the solvers read the same table)
    import inspect

    from entrokit._validation import SOLVER_OPTIONS, solver_options_of
    from entrokit.solvers.solve import _resolve

    fn = getattr(_resolve(method), "__wrapped_solver__", _resolve(method))
    params = inspect.signature(fn).parameters
    keyword = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword - {"normalize", "check_inputs"} == solver_options_of(method) | ({"variant"} if method != "sinkhorn" else set())
    for name in solver_options_of(method):
        default = params[name].default
        spec = SOLVER_OPTIONS[name]
        if name not in ("tol", "max_iter", "variant"):  # per-method defaults, in the signatures
            assert spec.default == default, name


def test_option_spec_checks_are_shared():
    # one check and one message per option, whichever solver or loss receives it
    from entrokit.losses import sinkhorn_divergence

    a = torch.full((3,), 1 / 3, dtype=torch.float64)
    C = torch.rand(3, 3, dtype=torch.float64)
    calls = [lambda **o: entrokit.sinkhorn(a, a, C, 0.1, **o), lambda **o: entrokit.sinkhorn_newton(a, a, C, 0.1, **o),
             lambda **o: entrokit.solve(a, a, C, eps=0.1, **o), lambda **o: entrokit.smooth_ot(a, a, C, gamma=0.1, **o),
             lambda **o: sinkhorn_divergence(torch.rand(3, 2), torch.rand(4, 2), eps=0.1, **o)]
    for call in calls:
        with pytest.raises(InputError, match=r"eps_scaling must be True, False or 'auto' \(None is 'auto'\); got 'yes'"):
            call(eps_scaling="yes")
        with pytest.raises(InputError, match="tol must be a finite number > 0, got -1"):
            call(tol=-1)
