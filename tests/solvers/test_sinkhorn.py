"""Sinkhorn: marginals, exactness, closed forms, invariances, batching, precision."""

import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrokit
from entrokit import PointCloud
from generators import dirac_source, one_dimensional_w2, random_problem


def marginals(res):
    P = res.plan
    return P.sum(-1), P.sum(-2)


@pytest.mark.parametrize("eps", [1.0, 1e-1, 1e-2, 1e-3])
@pytest.mark.parametrize("zeros", [False, True])
def test_marginals_within_tol(eps, zeros, device):
    a, b, C = random_problem(30, 40, seed=1, zeros=zeros, device=device)
    res = entrokit.sinkhorn(a, b, C, eps, tol=1e-9, max_iter=50_000)
    assert bool(res.converged)
    r, c = marginals(res)
    assert (r - a).abs().sum() + (c - b).abs().sum() <= 1e-9
    assert res.marginal_error <= 1e-9
    assert torch.isclose(res.marginal_error, (r - a).abs().sum() + (c - b).abs().sum(), atol=1e-12)
    # zero-weight rows/columns carry exactly no mass
    if zeros:
        assert res.plan[0].abs().max() == 0 and res.plan[:, -1].abs().max() == 0


def test_matches_pot_plan_and_value():
    a, b, C = random_problem(25, 35, seed=2)
    eps = 5e-2
    res = entrokit.sinkhorn(a, b, C, eps, tol=1e-12, max_iter=100_000)
    P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    np.testing.assert_allclose(res.plan.numpy(), P, atol=1e-10)
    np.testing.assert_allclose(res.transport_cost.item(), (P * C.numpy()).sum(), rtol=1e-9)
    # value = <C,P> + eps KL(P | a x b)
    kl = (P * np.log(P / np.outer(a.numpy(), b.numpy()))).sum()
    np.testing.assert_allclose(res.value.item(), (P * C.numpy()).sum() + eps * kl, rtol=1e-9)
    # relation to POT's entropy convention: value = <C,P> - eps H(P) - eps (H(a) + H(b))
    H = lambda p: -(p * np.log(p)).sum()  # noqa: E731
    pot_obj = (P * C.numpy()).sum() - eps * H(P)
    np.testing.assert_allclose(res.value.item(), pot_obj + eps * (H(a.numpy()) + H(b.numpy())), rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_exact_lp_as_eps_to_zero(seed):
    a, b, C = random_problem(20, 20, seed=seed)
    emd = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    gaps = []
    for eps in [1e-1, 1e-2, 1e-3]:
        res = entrokit.sinkhorn(a, b, C, eps, tol=1e-9, max_iter=200_000)
        gaps.append(res.transport_cost.item() - emd)
    assert gaps[-1] >= -1e-7 and gaps[-1] < 5e-3
    assert abs(gaps[-1]) < abs(gaps[0])


def test_dirac_source_closed_form():
    a, b, C, exact = dirac_source([0.2, 0.5, 0.3], [1.0, 2.0, 3.0])
    res = entrokit.sinkhorn(a, b, C, 0.1, tol=1e-12)
    torch.testing.assert_close(res.plan, b[None])
    torch.testing.assert_close(res.transport_cost, torch.tensor(exact, dtype=torch.float64))
    # plan = a x b  =>  KL term vanishes, value = <C, P>
    torch.testing.assert_close(res.value, res.transport_cost)


def test_permutation_recovered():
    n = 12
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    C = torch.ones(n, n, dtype=torch.float64)
    C[torch.arange(n), perm] = 0.0
    w = torch.full((n,), 1 / n, dtype=torch.float64)
    res = entrokit.sinkhorn(w, w, C, 1e-2, tol=1e-10)
    expected = torch.zeros(n, n, dtype=torch.float64)
    expected[torch.arange(n), perm] = 1 / n
    torch.testing.assert_close(res.plan, expected, atol=1e-10, rtol=0)
    assert res.transport_cost.item() < 1e-10


def test_one_dimensional_w2_closed_form():
    x, y, exact = one_dimensional_w2(40, seed=4)
    w = torch.full((40,), 1 / 40, dtype=torch.float64)
    res = entrokit.sinkhorn(w, w, PointCloud(x, y), 2e-2, tol=1e-8, max_iter=100_000)
    assert 0 <= res.transport_cost.item() - exact < 1e-2 * exact
    # the entropic barycentric map is the gradient of a convex function: monotone in 1-D
    T = (res.plan @ y[:, 0]) / res.plan.sum(1)
    order = x[:, 0].argsort()
    assert (T[order].diff() >= -1e-12).all()


def test_cost_shift_invariance():
    a, b, C = random_problem(15, 18, seed=5)
    eps = 0.05
    r0 = entrokit.sinkhorn(a, b, C, eps, tol=1e-12)
    r1 = entrokit.sinkhorn(a, b, C + 3.0, eps, tol=1e-12)
    alpha = torch.linspace(0, 1, 15, dtype=torch.float64)
    r2 = entrokit.sinkhorn(a, b, C + alpha[:, None], eps, tol=1e-12)
    torch.testing.assert_close(r0.plan, r1.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(r0.plan, r2.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(r1.value, r0.value + 3.0)
    torch.testing.assert_close(r2.value, r0.value + (alpha * a).sum())


def test_potentials_defined_up_to_constant():
    a, b, C = random_problem(10, 12, seed=6)
    eps = 0.1
    res = entrokit.sinkhorn(a, b, C, eps, tol=1e-12)
    geom = res.problem.geometry.with_batch()
    P1 = geom.plan((res.f + 0.7)[None], (res.g - 0.7)[None], a[None], b[None], eps)[0]
    torch.testing.assert_close(P1, res.plan)
    # a warm start shifted by a constant converges to the same plan
    r2 = entrokit.sinkhorn(a, b, C, eps, tol=1e-12, init=(res.f + 5.0, res.g - 5.0), check_every=1)
    torch.testing.assert_close(r2.plan, res.plan, atol=1e-12, rtol=0)
    assert r2.n_iter.item() <= 2


def test_batched_equals_looped():
    a, b, C = random_problem(20, 25, seed=7, batch=4)
    C[1] *= 10.0  # problems that need different iteration counts
    eps = 0.05
    rb = entrokit.sinkhorn(a, b, C, eps, tol=1e-10, max_iter=100_000)
    assert rb.plan.shape == (4, 20, 25) and rb.value.shape == (4,)
    for i in range(4):
        ri = entrokit.sinkhorn(a[i], b[i], C[i], eps, tol=1e-10, max_iter=100_000)
        torch.testing.assert_close(rb.plan[i], ri.plan, atol=1e-9, rtol=0)
        torch.testing.assert_close(rb.value[i], ri.value, atol=1e-9, rtol=0)
    # per-problem convergence masking: the harder problem ran longer
    assert rb.n_iter[1] > rb.n_iter[0]


def test_pointcloud_online_equals_dense():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(70, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    a = torch.full((70,), 1 / 70, dtype=torch.float64)
    b = torch.full((50,), 1 / 50, dtype=torch.float64)
    for cost in ["sqeuclidean", "euclidean"]:
        dense = entrokit.sinkhorn(a, b, PointCloud(x, y, cost), 0.1, tol=1e-10)
        online = entrokit.sinkhorn(a, b, PointCloud(x, y, cost, chunk_size=16), 0.1, tol=1e-10)
        torch.testing.assert_close(dense.value, online.value)
        torch.testing.assert_close(dense.f, online.f)
        torch.testing.assert_close(dense.transport_cost, online.transport_cost)
    C = torch.cdist(x, y) ** 2
    torch.testing.assert_close(PointCloud(x, y).cost_matrix(), C)


def test_callable_cost():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    l1 = lambda u, v: (u.unsqueeze(-2) - v.unsqueeze(-3)).abs().sum(-1)  # noqa: E731
    a = torch.full((10,), 0.1, dtype=torch.float64)
    b = torch.full((12,), 1 / 12, dtype=torch.float64)
    r1 = entrokit.sinkhorn(a, b, PointCloud(x, y, l1), 0.1, tol=1e-10)
    r2 = entrokit.sinkhorn(a, b, torch.cdist(x, y, p=1), 0.1, tol=1e-10)
    torch.testing.assert_close(r1.plan, r2.plan)


def test_float32_small_eps_stays_finite():
    a, b, C = random_problem(60, 50, seed=10, dtype=torch.float32)
    with pytest.warns(entrokit.ConvergenceWarning):
        res = entrokit.sinkhorn(a, b, C, 1e-4, tol=1e-7, max_iter=300)
    for t in (res.f, res.g, res.value, res.transport_cost, res.plan):
        assert torch.isfinite(t).all()
    assert res.f.dtype == torch.float32
    assert res.marginal_error < 0.5


def test_float32_converges_at_moderate_tol():
    a, b, C = random_problem(60, 50, seed=10, dtype=torch.float32)
    res = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-4)
    assert bool(res.converged) and res.plan.dtype == torch.float32


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_float32_point_clouds_are_certified_from_the_float64_finish(tol, monkeypatch):
    # the float64 finish's own sums of its final plan certify the result (no second float64
    # pass over n x m): the reported error bounds the float64 error of the returned float32
    # plan, on the float64 points' cost, and the transport cost is <C, plan>
    from entrokit.solvers import _entropic

    passes = []
    real = _entropic.certify_plan
    monkeypatch.setattr(_entropic, "certify_plan", lambda *a, **k: passes.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(70, 3, generator=g), torch.rand(60, 3, generator=g)
    a, b = torch.full((70,), 1 / 70), torch.full((60,), 1 / 60)
    res = entrokit.sinkhorn(a, b, PointCloud(x, y), 1e-2, tol=tol)  # no ConvergenceWarning
    assert bool(res.converged) and res.info["float64_finish"] >= 1 and passes == []
    P = res.plan.double()
    C = torch.cdist(x.double(), y.double()) ** 2
    err = (P.sum(-1) - a.double()).abs().sum() + (P.sum(-2) - b.double()).abs().sum()
    assert float(err) <= float(res.marginal_error) <= min(float(err) + 1e-6, tol)
    torch.testing.assert_close(res.transport_cost.double(), (C * P).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["certified", "reached", "missed"])
def test_a_float32_online_solve_runs_only_the_loops_its_multiscale_start_needs(case, monkeypatch):
    # online float32 squared Euclidean in d <= 3 starts from multiscale_sinkhorn's potentials:
    # - "certified": their plan meets tol on the cloud, so the result is theirs (no loop);
    # - "reached": their truncated loop met tol but the plan misses it (here the start is
    #   perturbed): the float64 finish starts from them, no float32 loop;
    # - "missed": the float32 loop runs, then the finish.
    # Every result is certified on the float64 cost (float64 sums of the plan rounded to
    # float32: the reported error is the returned plan's) and the callback sees the checks
    # of what ran last
    from entrokit.solvers import multiscale

    real, starts = multiscale.online_warm_start, []

    def start(pb, eps, tol, max_iter):
        s = real(pb, eps, tol, max_iter)
        starts.append(s)
        if case == "certified":
            return s
        f = s.f + 0.05 * eps * torch.randn(s.f.shape, generator=torch.Generator().manual_seed(0))
        return s._replace(f=f, reached=case == "reached")

    monkeypatch.setattr(multiscale, "online_warm_start", start)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(300, 2, generator=gen), torch.rand(240, 2, generator=gen)
    a, b = torch.full((300,), 1 / 300), torch.full((240,), 1 / 240)
    checks = []
    res = entrokit.sinkhorn(a, b, PointCloud(x, y, online=True), 1e-2, tol=1e-4,
                            callback=lambda it, err: checks.append((it, err)))
    assert len(starts) == 1 and starts[0].reached and bool(res.converged) and checks
    if case == "certified":
        assert res.info["float64_finish"] == 0 and res.info["multiscale_start"]
        assert int(res.n_iter) == int(starts[0].n_iter) >= 1
        assert checks == [(int(res.n_iter), float(res.marginal_error))]
    elif case == "reached":
        assert int(res.n_iter) == res.info["float64_finish"] >= 1
    else:
        assert int(res.n_iter) > res.info["float64_finish"] >= 1
    P = res.plan.double()
    C = torch.cdist(x.double(), y.double()) ** 2
    err = (P.sum(-1) - a.double()).abs().sum() + (P.sum(-2) - b.double()).abs().sum()
    assert float(res.marginal_error) == pytest.approx(float(err), rel=1e-6) and float(err) <= 1e-4
    torch.testing.assert_close(res.transport_cost.double(), (C * P).sum(), rtol=1e-6, atol=0)
    ref = entrokit.sinkhorn(None, None, PointCloud(x.double(), y.double(), online=False), 1e-2, tol=1e-9)
    torch.testing.assert_close(res.value.double(), ref.value, rtol=1e-3, atol=0)


def test_a_float32_multiscale_start_is_not_certified_below_its_rounding_floor(monkeypatch):
    # float32 potentials leave their plan a float64 marginal error of about
    # 0.05-0.2 u (max C - min C) / eps: the start's error_floor stays below the error of
    # the plan of starts run far past it (so no start that could be certified is skipped),
    # and sinkhorn attempts the certificate (one pass over n x m) only at a tol above it
    from entrokit.solvers import multiscale
    from entrokit.solvers import sinkhorn as sinkhorn_module

    a, b = torch.full((300,), 1 / 300), torch.full((300,), 1 / 300)
    for seed, gaussian in [(0, False), (1, False), (0, True), (1, True)]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(300, 2, generator=gen)
        y = torch.randn(300, 2, generator=gen) * 0.3 + 0.5 if gaussian else torch.rand(300, 2, generator=gen)
        pb = entrokit.problem.make_problem(a, b, PointCloud(x, y, online=True)).with_batch()
        start = multiscale.online_warm_start(pb, 1e-2, 1e-9, max_iter=200)  # at its floor by then
        lo, hi = PointCloud(x, y).cost_bounds()
        u_range = torch.finfo(torch.float32).eps * float(hi - lo) / 1e-2
        assert 0.8 * multiscale.ROUNDING_FLOOR * u_range <= start.error_floor <= multiscale.ROUNDING_FLOOR * u_range
        C = torch.cdist(x.double(), y.double()) ** 2
        P = (a.double()[:, None] * b.double()) * torch.exp((start.f.double().T + start.g.double() - C) / 1e-2)
        err = (P.sum(-1) - a.double()).abs().sum() + (P.sum(-2) - b.double()).abs().sum()
        assert start.error_floor < float(err) < 4 * start.error_floor
    attempts = []
    real = sinkhorn_module._certified_start
    monkeypatch.setattr(sinkhorn_module, "_certified_start", lambda *a, **k: attempts.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 2, generator=gen), torch.rand(300, 2, generator=gen)  # floor 1.1e-6
    for tol, certified in [(1e-5, True), (1e-6, False)]:
        attempts.clear()
        res = entrokit.sinkhorn(a, b, PointCloud(x, y, online=True), 1e-2, tol=tol)
        assert bool(res.converged) and float(res.marginal_error) <= tol
        assert attempts == ([1] if certified else []) and res.info.get("multiscale_start", False) is certified
        assert (res.info["float64_finish"] == 0) is certified


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("engine", ["kernel-numpy", "kernel-torch", "log"])
def test_an_engine_reports_the_whole_error_of_its_plan_after_a_warm_start(engine, batched, monkeypatch):
    # from given potentials neither marginal is exact: the error a one-iteration run reports
    # must be that of the plan the engine then holds (its columns exact), not the row error
    # alone of the plan before (a float32 point-cloud solve's float64 finish stopped early on it)
    import entrokit.geometry.dense as dense
    from entrokit.solvers.sinkhorn import _LogEngine

    if engine == "kernel-torch":
        monkeypatch.setattr(dense, "_NUMPY_MAX", 0)
    B, D = (2 if batched else 1), torch.float64
    gen = torch.Generator().manual_seed(8)
    C = torch.rand(B, 40, 30, generator=gen, dtype=D)
    a, b = torch.full((B, 40), 1 / 40, dtype=D), torch.full((B, 30), 1 / 30, dtype=D)
    f, g = 0.05 * torch.randn(B, 40, generator=gen, dtype=D), torch.zeros(B, 30, dtype=D)
    for stop_tol in (None, 10.0):  # with a stop test that the first check would pass
        if engine == "log":
            eng = _LogEngine(entrokit.DenseCost(C), a, b, a.log(), b.log())
            eng.start(f, g, 0.1)
        else:
            eng = entrokit.DenseCost(C).scaling_engine(a, b, a.log(), b.log())
            eng.start(f, g, 0.1, sweep=False)
        err = eng.run(1, None, stop_tol)
        fu, gv = eng.potentials(precise=True)
        P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((fu.unsqueeze(-1) + gv.unsqueeze(-2) - C) / 0.1)
        true = (P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)
        torch.testing.assert_close(err.reshape(-1), true, rtol=1e-9, atol=1e-15)
        # the next run starts from that plan, columns exact: one iteration on, it is measured again
        again = eng.run(1, None, None)
        torch.testing.assert_close(again.reshape(-1), true, rtol=1e-9, atol=1e-15)


def test_lse_and_kernel_engines_agree():
    a, b, C = random_problem(30, 30, seed=11)
    r1 = entrokit.sinkhorn(a, b, C, 1e-3, tol=1e-10, max_iter=100_000, lse_mode=True)
    r2 = entrokit.sinkhorn(a, b, C, 1e-3, tol=1e-10, max_iter=100_000, lse_mode=False)
    torch.testing.assert_close(r1.plan, r2.plan, atol=1e-9, rtol=0)


def test_eps_scaling_same_solution_fewer_iterations():
    a, b, C = random_problem(60, 60, seed=12)
    r_on = entrokit.sinkhorn(a, b, C, 1e-3, tol=1e-9, eps_scaling=True, max_iter=100_000)
    r_off = entrokit.sinkhorn(a, b, C, 1e-3, tol=1e-9, eps_scaling=False, max_iter=100_000)
    torch.testing.assert_close(r_on.plan, r_off.plan, atol=1e-9, rtol=0)
    assert r_on.n_iter < r_off.n_iter


def test_nonconvergence_reported():
    a, b, C = random_problem(30, 30, seed=13)
    with pytest.warns(entrokit.ConvergenceWarning, match="max_iter"):
        res = entrokit.sinkhorn(a, b, C, 1e-3, tol=1e-12, max_iter=5, eps_scaling=False)
    assert not bool(res.converged)
    assert res.n_iter.item() == 5
    assert res.errors.shape[0] >= 1


def test_result_is_immutable_and_solve_dispatches():
    a, b, C = random_problem(8, 9, seed=14)
    res = entrokit.solve(a, b, C, eps=0.1, method="sinkhorn")
    with pytest.raises(AttributeError):
        res.f = None
    assert res.method == "sinkhorn" and res.grad == "implicit"
    res2 = entrokit.solve(a, b, C, eps=0.1)
    torch.testing.assert_close(res.plan, res2.plan)


def test_normalize_rescales_masses():
    a, b, C = random_problem(8, 9, seed=15)
    res = entrokit.sinkhorn(3 * a, 2 * b, C, 0.1, normalize=True, tol=1e-10)
    torch.testing.assert_close(res.plan.sum(), torch.tensor(1.0, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    n_zero_a=st.integers(0, 3),
    n_zero_b=st.integers(0, 3),
    eps=st.sampled_from([1.0, 0.1, 0.01]),
    scale=st.sampled_from([1.0, 10.0]),
)
def test_property_marginals_and_duality(n, m, seed, n_zero_a, n_zero_b, eps, scale):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=gen, dtype=torch.float64)
    b = torch.rand(m, generator=gen, dtype=torch.float64)
    a[: min(n_zero_a, n - 1)] = 0.0
    b[: min(n_zero_b, m - 1)] = 0.0
    a, b = a / a.sum(), b / b.sum()
    C = scale * torch.rand(n, m, generator=gen, dtype=torch.float64)
    res = entrokit.sinkhorn(a, b, C, eps, tol=1e-9, max_iter=100_000)
    P = res.plan
    assert bool(res.converged)
    assert (P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum() <= 1e-8
    assert (P >= 0).all() and (P[a == 0] == 0).all() and (P[:, b == 0] == 0).all()
    # strong duality: primal objective equals the dual value
    Q = a[:, None] * b[None, :]
    mask = P > 0
    kl = (P[mask] * torch.log(P[mask] / Q[mask])).sum() - P.sum() + Q.sum()
    torch.testing.assert_close(res.value, (C * P).sum() + eps * kl, atol=1e-7, rtol=1e-7)
    # the entropic cost is an upper bound of the LP (KL >= 0)
    lp = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    assert res.transport_cost.item() >= lp - 1e-7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bad_warm_start_recovers(dtype):
    # potentials far from optimal overflow the kernel: the solver re-centres them in log domain
    a, b, C = random_problem(40, 30, seed=16, dtype=dtype)
    ref = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-5)
    far = (torch.full_like(a, 50.0), torch.full_like(b, 50.0))
    res = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-5, init=far)
    assert bool(res.converged) and torch.isfinite(res.plan).all()
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-5 if dtype == torch.float64 else 5e-5, rtol=0)


def test_absorption_keeps_float32_finite_at_large_cost_scale():
    a, b, C = random_problem(200, 150, seed=3, dtype=torch.float32)
    res = entrokit.sinkhorn(a, b, 5 * C, 1e-2, tol=1e-5, max_iter=3000)
    assert bool(res.converged) and res.info["absorptions"] >= 1
    assert torch.isfinite(res.plan).all() and res.marginal_error <= 1e-5 * 1.5


def _loop(problem, eps, **options):
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    a, b, cost = problem
    pb = make_problem(a, b, cost).with_batch()
    return sinkhorn_problem(pb, eps, SinkhornOptions(**options))


def test_fixed_iterations_equal_the_same_number_of_checked_iterations():
    # fixed_iter runs exactly max_iter log-domain iterations, no test, no early stop
    a, b, C = random_problem(12, 9, seed=4)
    f, g, n_iter, converged, errors, _ = _loop((a, b, C), 0.1, max_iter=7, fixed_iter=True, tol=1e-300)
    assert int(n_iter) == 7 and not bool(converged) and errors.shape == (1, 1)
    # the same iterations written out: alternate exact row and column soft-mins
    geom = entrokit.DenseCost(C.unsqueeze(0))
    fr, gr = torch.zeros(1, 12, dtype=C.dtype), torch.zeros(1, 9, dtype=C.dtype)
    la, lb = a.log().unsqueeze(0), b.log().unsqueeze(0)
    for _ in range(7):
        fr = geom.softmin(gr, lb, 0.1, axis=1)
        gr = geom.softmin(fr, la, 0.1, axis=0)
    torch.testing.assert_close(f, fr, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=0, atol=1e-12)


def test_symmetric_updates_solve_the_self_problem():
    # averaged updates f <- (f + T f)/2 reach the symmetric optimum f = g of OT(a, a),
    # the same potentials as the alternating loop, in far fewer iterations
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = torch.rand(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    a = a / a.sum()
    f, g, n_iter, converged, errors, _ = _loop((a, a, PointCloud(x, x)), 0.5, tol=1e-11, symmetric=True)
    assert bool(converged) and torch.equal(f, g) and float(errors[-1]) <= 1e-11
    ref = entrokit.sinkhorn(a, a, PointCloud(x, x), 0.5, tol=1e-11, max_iter=100_000)
    torch.testing.assert_close(f[0], ref.f, rtol=0, atol=1e-6)  # potentials: conditioning x tol
    assert int(n_iter) < int(ref.n_iter)


@pytest.mark.parametrize("online", [True, False])
def test_autocast_does_not_reach_the_solver(online):
    # under torch.autocast a float32 matmul would run in bfloat16: the solvers turn it off
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(50, 3, generator=g), torch.rand(40, 3, generator=g)
    a, b = torch.full((50,), 1 / 50), torch.full((40,), 1 / 40)
    ref = entrokit.sinkhorn(a, b, entrokit.PointCloud(x, y, online=online), 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = entrokit.sinkhorn(a, b, entrokit.PointCloud(x, y, online=online), 0.05)
        solved = entrokit.solve(a, b, entrokit.PointCloud(x, y, online=online), eps=0.05)
    assert res.converged and res.f.dtype == torch.float32 and solved.converged
    torch.testing.assert_close(res.f, ref.f, rtol=0, atol=0)
    torch.testing.assert_close(res.transport_cost, ref.transport_cost, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [1e-1, 1e-2, 1e-3])
@pytest.mark.parametrize("shape", [(300, 300), (700, 300), (2, 400, 350)])
def test_certified_sums_equal_the_returned_plan(eps, shape):
    # the kernel engine certifies from the last iteration's row/column sums and a blocked
    # <C, P> pass: both must be the sums of the plan the user gets, recomputed in float64
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-2])
    C = torch.rand(*shape, generator=gen, dtype=torch.float64)
    n, m = shape[-2:]
    a = torch.rand(*shape[:-1], generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(*shape[:-2], m, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on an out= buffer of the wrong size
        res = entrokit.sinkhorn(a, b, C, eps, tol=1e-6)
    assert bool(res.converged.all())
    P = res.plan
    merr = (P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1)
    assert torch.allclose(res.marginal_error, merr, rtol=1e-6, atol=1e-14)
    assert bool((merr <= 1e-6).all())
    assert torch.allclose(res.transport_cost, (C * P).sum((-2, -1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("offset", [0.2, 5.0])
def test_cold_start_far_column(offset):
    # a column far from every row minimum: its hard c-transform g_j ~ offset, so g_j/eps
    # is below (0.2 / 0.01 = 20) or above (500) the scaling engine's absorption threshold;
    # both starts must reach the log-domain engine's solution
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(120, 90, generator=gen, dtype=torch.float64)
    C[:, 7] += offset
    a = torch.full((120,), 1 / 120, dtype=torch.float64)
    b = torch.full((90,), 1 / 90, dtype=torch.float64)
    ker = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-10, lse_mode=False, eps_scaling=False)
    lse = entrokit.sinkhorn(a, b, C, 1e-2, tol=1e-10, lse_mode=True, eps_scaling=False)
    assert bool(ker.converged) and bool(lse.converged)
    assert ker.info.fallbacks == 0
    torch.testing.assert_close(ker.plan, lse.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(ker.value, lse.value, atol=1e-12, rtol=1e-12)
