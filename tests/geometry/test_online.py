"""The online (tiled) point-cloud path: equal to the dense path, O(n+m) memory, the
automatic rule, the compiled kernel and CUDA."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import entrokit
from entrokit import InputError, PointCloud
from entrokit.geometry import _online
from entrokit.geometry.pointcloud import memory_budget, set_memory_budget

F64 = torch.float64


def clouds(n=60, m=45, d=3, batch=(), dtype=F64, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=g, dtype=dtype) + shift
    y = 0.8 * torch.rand(*batch, m, d, generator=g, dtype=dtype) + 0.1 + shift
    return x, y


def uniform(n, batch=(), dtype=F64):
    return torch.full((*batch, n), 1.0 / n, dtype=dtype)


COSTS = [
    ("sqeuclidean", {}),
    ("euclidean", {}),
    ("pnorm", {"p": 1.0}),
    ("pnorm", {"p": 1.5}),
    (lambda u, v: torch.cdist(u, v) ** 3, {}),
]
IDS = ["sqeuclidean", "euclidean", "pnorm1", "pnorm1.5", "callable"]


@pytest.mark.parametrize("cost,kw", COSTS, ids=IDS)
@pytest.mark.parametrize("axis", [0, 1])
def test_online_softmin_equals_dense(cost, kw, axis):
    x, y = clouds(batch=(2,))
    dense = PointCloud(x, y, cost, online=False, **kw).flatten_batch()
    online = PointCloud(x, y, cost, chunk_size=7, **kw).flatten_batch()
    assert online.is_online and not dense.is_online
    size = 45 if axis == 1 else 60
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, size, generator=g, dtype=F64)
    log_w = torch.log(torch.rand(2, size, generator=g, dtype=F64))
    log_w[:, 3] = -float("inf")  # a zero weight drops out exactly
    for eps in (1.0, 0.05, 1e-3):
        torch.testing.assert_close(online.softmin(h, log_w, eps, axis), dense.softmin(h, log_w, eps, axis),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("cost,kw", COSTS, ids=IDS)
def test_online_sinkhorn_potentials_and_gradients_equal_dense(cost, kw):
    x, y = clouds(n=50, m=40)
    a, b = uniform(50), uniform(40)
    out = []
    for online in (False, True):
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        res = entrokit.sinkhorn(a, b, PointCloud(xg, yg, cost, online=online, **kw), 0.05, tol=1e-11)
        assert bool(res.converged)
        out.append((res.f, res.g, res.transport_cost, *torch.autograd.grad(res.value, (xg, yg))))
    for dense_t, online_t in zip(*out):
        torch.testing.assert_close(online_t, dense_t, rtol=0, atol=1e-8)


SMOOTH = [COSTS[0], COSTS[3], COSTS[4]]  # differentiable everywhere (euclidean, p=1: not at 0)


@pytest.mark.parametrize("cost,kw", SMOOTH, ids=[IDS[0], IDS[3], IDS[4]])
def test_online_softmin_gradcheck(cost, kw):
    x, y = clouds(n=9, m=7, d=2)
    x.requires_grad_()
    y.requires_grad_()
    h = torch.randn(1, 7, dtype=F64, requires_grad=True)
    log_w = torch.log(uniform(7, (1,)))

    def fn(x, y, h):
        return PointCloud(x[None], y[None], cost, chunk_size=4, **kw).softmin(h, log_w, 0.3, axis=1)

    assert torch.autograd.gradcheck(fn, (x, y, h))

    def fn0(x, y, h0):
        return PointCloud(x[None], y[None], cost, chunk_size=4, **kw).softmin(h0, log_w0, 0.3, axis=0)

    log_w0 = torch.log(uniform(9, (1,)))
    h0 = torch.randn(1, 9, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn0, (x, y, h0))


def test_compiled_kernel_equals_eager():
    x, y = clouds(n=300, m=200, dtype=torch.float32)
    h = torch.randn(1, 200)
    log_w = torch.log(uniform(200, (1,), torch.float32))
    eager = PointCloud(x, y, online=True, kernel="eager").flatten_batch().softmin(h, log_w, 0.02, 1)
    compiled = PointCloud(x, y, online=True, kernel="compile").flatten_batch().softmin(h, log_w, 0.02, 1)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_kernel_rule():
    assert not _online.use_compiled("eager", 1 << 40)
    assert _online.use_compiled("compile", 1)
    assert not _online.use_compiled("auto", _online.COMPILE_MIN_ENTRIES - 1)


def test_float32_far_from_origin_and_wide_tiles():
    # centring keeps the matmul expansion accurate far from the origin
    x, y = clouds(n=80, m=70, dtype=torch.float32, shift=1000.0)
    a, b = uniform(80, dtype=torch.float32), uniform(70, dtype=torch.float32)
    res = entrokit.sinkhorn(a, b, PointCloud(x, y, online=True), 0.01, tol=1e-4)
    assert bool(res.converged)
    ref = entrokit.sinkhorn(a.double(), b.double(), PointCloud((x - 1000).double(), (y - 1000).double()), 0.01, tol=1e-7)
    assert abs(float(res.transport_cost) - float(ref.transport_cost)) < 1e-4
    # a spread that float32 exponents cannot resolve at this eps switches the tiles to float64
    assert not _online.needs_wide_tiles(_online.radius_sq(x, y), 0.01, torch.float32)
    assert _online.needs_wide_tiles(_online.radius_sq(100 * x, 100 * y), 1e-3, torch.float32)
    assert not _online.needs_wide_tiles(_online.radius_sq(100 * x, 100 * y), 1e-3, torch.float64)
    xw, yw = 3 * (x - 1000), 3 * (y - 1000)
    assert _online.needs_wide_tiles(_online.radius_sq(xw, yw), 0.01, torch.float32)
    res = entrokit.sinkhorn(a, b, PointCloud(xw, yw, online=True), 0.01, tol=1e-3)
    ref = entrokit.sinkhorn(a.double(), b.double(), PointCloud(xw.double(), yw.double()), 0.01, tol=1e-7)
    assert bool(res.converged)
    assert abs(float(res.transport_cost) - float(ref.transport_cost)) < 1e-3 * float(ref.transport_cost)


def test_automatic_rule_picks_online_above_the_budget():
    x, y = clouds(n=100, m=80)
    need = PointCloud(x, y, online=False).dense_bytes()
    assert need == 4 * 100 * 80 * 8
    assert not PointCloud(x, y, memory_budget=need).is_online
    assert PointCloud(x, y, memory_budget=need - 1).is_online
    try:
        set_memory_budget(need - 1)
        assert memory_budget() == need - 1
        assert PointCloud(x, y).is_online
        a, b = uniform(100), uniform(80)
        # the solvers and losses follow the same rule
        res = entrokit.solve(a, b, PointCloud(x, y), eps=0.1)
        assert res.method == "sinkhorn"
    finally:
        set_memory_budget(None)
    assert not PointCloud(x, y).is_online


def test_memory_budget_from_environment(monkeypatch):
    monkeypatch.setenv("ENTROKIT_MEMORY_BUDGET", "1000")
    x, y = clouds(n=20, m=20)
    assert memory_budget() == 1000 and PointCloud(x, y).is_online
    monkeypatch.setenv("ENTROKIT_MEMORY_BUDGET", "lots")
    with pytest.raises(InputError, match="ENTROKIT_MEMORY_BUDGET must be a number of bytes"):
        memory_budget()


# The peak resident set of the script's own address space: VmHWM of /proc/self/status.
# ru_maxrss is not usable here: Linux keeps it across exec, so a child spawned by a large
# pytest process reports at least the parent's size at the fork.
_PEAK_RSS = (
    "def peak_rss_kib():\n"
    "    with open('/proc/self/status') as fh:\n"
    "        return next(int(line.split()[1]) for line in fh if line.startswith('VmHWM:'))\n"
)


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, entrokit
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=g); y = torch.rand(n, 3, generator=g)
    a = torch.full((n,), 1.0 / n); b = torch.full((n,), 1.0 / n)
    geom = entrokit.PointCloud(x, y, online=True, kernel="eager")
    res = entrokit.sinkhorn(a, b, geom, eps=0.5, max_iter=3, tol=1e-12)
    print(json.dumps({"rss_kib": peak_rss_kib()}))
    """
)


def _peak_rss_kib(n: int) -> int:
    import warnings

    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PEAK_RSS + _RSS_SCRIPT, str(n)], capture_output=True,
                         text=True, timeout=300, check=True)
    warnings.filterwarnings("ignore")
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_kib"]


def test_online_memory_does_not_grow_with_n_times_m():
    small, large = _peak_rss_kib(2_000), _peak_rss_kib(16_000)
    grown_mib = (large - small) / 1024
    dense_mib = 16_000**2 * 4 / 2**20  # one float32 cost matrix: 977 MiB
    assert grown_mib < 64, (small, large)
    assert grown_mib < dense_mib / 15


_GRAD_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, entrokit
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=g).requires_grad_(True)
    y = torch.rand(n, 3, generator=g).requires_grad_(True)
    a = torch.full((n,), 1.0 / n); b = torch.full((n,), 1.0 / n)
    res = entrokit.sinkhorn(a, b, entrokit.PointCloud(x, y, online=True, kernel="eager"), eps=1.0, tol=1e-2)
    (res.value + res.transport_cost).backward()
    finite = bool(torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all())
    print(json.dumps({"rss_kib": peak_rss_kib(), "finite": finite,
                      "converged": bool(res.converged)}))
    """
)


def test_online_memory_with_differentiable_points_stays_flat():
    # forward (boundary checks, certification, the differentiable plan sums) and backward
    # (implicit adjoint, tile recomputation) at n = m = 12000. The process peaks near 290 MiB
    # (flat in n: 296 MiB at n = 14000, 298 MiB at n = 20000); one float32 n x m buffer alone
    # (549 MiB) would cross the 700 MiB bound
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PEAK_RSS + _GRAD_RSS_SCRIPT, "12000"], capture_output=True,
                         text=True, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["converged"], got
    assert got["rss_kib"] / 2**10 < 700, got


_CALLABLE_GRAD_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, entrokit
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=g).requires_grad_(True)
    y = torch.rand(n, 3, generator=g).requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)  # the cost's own parameter
    def cost(xs, ys):  # sum_k w_k (x_k - y_k)^2 by the expansion
        return ((xs.pow(2) * w).sum(-1, keepdim=True) - 2 * (xs * w) @ ys.mT
                + (ys.pow(2) * w).sum(-1).unsqueeze(-2))
    a = torch.full((n,), 1.0 / n); b = torch.full((n,), 1.0 / n)
    res = entrokit.sinkhorn(a, b, entrokit.PointCloud(x, y, cost, online=True, kernel="eager"), eps=1.0, tol=1e-2)
    (res.value + res.transport_cost).backward()
    finite = bool(torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all() and torch.isfinite(w.grad).all())
    print(json.dumps({"rss_kib": peak_rss_kib(), "finite": finite, "w_grad": w.grad.abs().sum().item(),
                      "converged": bool(res.converged)}))
    """
)


def test_online_memory_with_a_differentiable_cost_callable_stays_flat():
    # a cost callable holding a parameter w, the points and w requiring gradients, at
    # n = m = 12000: the forward runs without a graph and backward recomputes the tiles, as
    # for the named costs. The process peaks near 350 MiB (flat in n: 343 MiB at n = 20000);
    # one float32 n x m buffer alone (549 MiB) would cross the 700 MiB bound
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PEAK_RSS + _CALLABLE_GRAD_RSS_SCRIPT, "12000"],
                         capture_output=True, text=True, timeout=900, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["converged"] and got["w_grad"] > 0, got
    assert got["rss_kib"] / 2**10 < 700, got


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean", "pnorm"])
def test_online_plan_sums_and_products_gradcheck(cost):
    gen = torch.Generator().manual_seed(3)
    kw = {"p": 1.5} if cost == "pnorm" else {}

    def r(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, y, f, g, a, b, V, U = r(2, 7, 2), r(2, 5, 2), r(2, 7), r(2, 5), r(2, 7), r(2, 5), r(2, 5, 3), r(2, 7, 3)

    def reduce(x, y, f, g, a, b):
        return PointCloud(x, y, cost, chunk_size=3, **kw).plan_reduce(f, g, a, b, 0.3)

    def matvec(axis):
        def fn(x, y, f, g, a, b, v):
            return PointCloud(x, y, cost, chunk_size=3, **kw).plan_matvec(f, g, a, b, 0.3, v, axis)
        return fn

    assert torch.autograd.gradcheck(reduce, (x, y, f, g, a, b))
    assert torch.autograd.gradcheck(matvec(1), (x, y, f, g, a, b, V))
    assert torch.autograd.gradcheck(matvec(0), (x, y, f, g, a, b, U))
    # the same values and gradients as the dense path (an independent autograd graph)
    for fn, args in ((reduce, (x, y, f, g, a, b)), (matvec(1), (x, y, f, g, a, b, V))):
        online = fn(*args)
        online = online if isinstance(online, tuple) else (online,)
        g_on = torch.autograd.grad(sum(t.sum() for t in online), args)
        dense = PointCloud(x, y, cost, online=False, **kw)
        ref = dense.plan_reduce(f, g, a, b, 0.3) if fn is reduce else (dense.plan_matvec(f, g, a, b, 0.3, V, 1),)
        g_ref = torch.autograd.grad(sum(t.sum() for t in ref), args)
        for u, v in zip((*online, *g_on), (*ref, *g_ref)):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_online_plan_zero_weights_have_finite_gradients():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    a = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64, requires_grad=True)
    b = torch.full((4,), 0.25, dtype=torch.float64)
    f = torch.zeros(6, dtype=torch.float64)
    f[0] = 1e4  # a huge potential on a zero weight: the exponent is clamped, not inf
    row, col, tc = PointCloud(x, y, chunk_size=2).plan_reduce(f, torch.zeros(4, dtype=torch.float64), a, b, 0.1)
    (row.sum() + col.sum() + tc).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad).all()


def test_bad_inputs():
    x, y = clouds(n=5, m=4)
    with pytest.raises(InputError, match="cost='pnorm' needs the exponent p"):
        PointCloud(x, y, "pnorm")
    for bad in (0.5, float("inf"), float("nan"), True, "2"):
        with pytest.raises(InputError, match="needs a finite exponent p >= 1"):
            PointCloud(x, y, "pnorm", p=bad)
    with pytest.raises(InputError, match="only used with cost='pnorm'; got cost='sqeuclidean'"):
        PointCloud(x, y, p=2)
    with pytest.raises(InputError, match="contradicts online=False"):
        PointCloud(x, y, online=False, chunk_size=3)
    with pytest.raises(InputError, match="online must be True, False or None"):
        PointCloud(x, y, online="yes")
    with pytest.raises(InputError, match="memory_budget must be a positive number"):
        PointCloud(x, y, memory_budget=0)
    with pytest.raises(InputError, match="kernel must be one of"):
        PointCloud(x, y, kernel="fast")
    with pytest.raises(InputError, match="memory budget must be a positive number"):
        set_memory_budget(-1)
    with pytest.raises(InputError, match="same point dimension"):
        PointCloud(x, torch.rand(4, 2, dtype=F64), online=True)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="x contains NaN"):
        entrokit.sinkhorn(uniform(5), uniform(4), PointCloud(bad, y, online=True), 0.1)
    huge = x.clone().float() * 1e30
    with pytest.raises(InputError, match="cost contains"):
        entrokit.sinkhorn(uniform(5, dtype=torch.float32), uniform(4, dtype=torch.float32),
                          PointCloud(huge, y.float(), online=True), 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("online", [False, True])
def test_cuda_matches_cpu(online):
    x, y = clouds(n=500, m=400)
    a, b = uniform(500), uniform(400)
    cpu = entrokit.sinkhorn(a, b, PointCloud(x, y, online=online), 0.02, tol=1e-9)
    gpu = entrokit.sinkhorn(a.cuda(), b.cuda(), PointCloud(x.cuda(), y.cuda(), online=online), 0.02, tol=1e-9)
    assert gpu.f.device.type == "cuda" and bool(gpu.converged)
    torch.testing.assert_close(gpu.f.cpu(), cpu.f, rtol=0, atol=1e-8)
    torch.testing.assert_close(gpu.transport_cost.cpu(), cpu.transport_cost, rtol=0, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fixed_iterations_do_not_sync():
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    x, y = clouds(n=256, m=256, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    pb = make_problem(uniform(256, dtype=torch.float32).cuda(), uniform(256, dtype=torch.float32).cuda(),
                      PointCloud(x, y, online=True, kernel="eager"), check_inputs=False).with_batch()
    opts = SinkhornOptions(max_iter=20, fixed_iter=True)
    sinkhorn_problem(pb, 0.05, opts)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        sinkhorn_problem(pb, 0.05, opts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cost,kw", COSTS, ids=IDS)
@pytest.mark.parametrize("axis", [0, 1])
def test_online_plan_products_equal_dense(cost, kw, axis):
    """One vector or k vectors at once (the closed-form transport-cost gradient applies
    the plan to all d coordinates in one pass)."""
    x, y = clouds(n=70, m=50, batch=(2,))
    g = torch.Generator().manual_seed(3)
    f, h = 0.01 * torch.randn(2, 70, generator=g, dtype=F64), 0.01 * torch.randn(2, 50, generator=g, dtype=F64)
    a, b = torch.rand(2, 70, generator=g, dtype=F64), torch.rand(2, 50, generator=g, dtype=F64)
    a[0, 3] = 0.0
    dense = PointCloud(x, y, cost, online=False, **kw)
    online = PointCloud(x, y, cost, chunk_size=16, **kw)
    V = torch.randn(2, 50 if axis == 1 else 70, 4, generator=g, dtype=F64)
    for vec in (V, V[..., 0]):
        torch.testing.assert_close(online.plan_matvec(f, h, a, b, 0.1, vec, axis),
                                   dense.plan_matvec(f, h, a, b, 0.1, vec, axis), rtol=0, atol=1e-12)


def test_online_marginals_one_pass_equal_dense():
    x, y = clouds(n=70, m=50, batch=(2,))
    g = torch.Generator().manual_seed(5)
    f, h = 0.01 * torch.randn(2, 70, generator=g, dtype=F64), 0.01 * torch.randn(2, 50, generator=g, dtype=F64)
    a, b = torch.rand(2, 70, generator=g, dtype=F64), torch.rand(2, 50, generator=g, dtype=F64)
    b[1, 7] = 0.0
    for got, want in zip(PointCloud(x, y, online=True).marginals(f, h, a, b, 0.1),
                         PointCloud(x, y, online=False).marginals(f, h, a, b, 0.1)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_an_online_squared_euclidean_solve_starts_from_the_multiscale_potentials():
    """sinkhorn on an online squared-Euclidean cloud in d <= 3 starts from
    multiscale_sinkhorn's potentials: the same certified result as the dense path (value,
    cost, potentials up to the gauge, gradients in the points); here their plan meets tol,
    so no online loop runs (``n_iter``: the start's truncated iterations); a d = 4 cloud,
    an ``init`` or ``grad="unroll"`` keep the plain start."""
    from entrokit.solvers.multiscale import online_warm_start

    x, y = clouds(n=300, m=240, d=2, seed=3)
    a, b = uniform(300), uniform(240)
    out = {}
    for online in (False, True):
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        res = entrokit.sinkhorn(a, b, PointCloud(xg, yg, online=online), 0.01, tol=1e-7)
        assert bool(res.converged) and float(res.marginal_error) <= 1e-7
        out[online] = (res, *torch.autograd.grad(res.value + res.transport_cost, (xg, yg)))
    dense, online = out[False][0], out[True][0]
    assert online.info["multiscale_start"] and online.info["stages"] == 0 and len(online.errors) == 0
    torch.testing.assert_close(online.value, dense.value, rtol=1e-6, atol=0)
    torch.testing.assert_close(online.transport_cost, dense.transport_cost, rtol=1e-6, atol=0)
    shift = (online.f - dense.f).mean()
    torch.testing.assert_close(online.f - shift, dense.f, rtol=0, atol=1e-5)
    torch.testing.assert_close(online.g + shift, dense.g, rtol=0, atol=1e-5)
    for u, v in zip(out[True][1:], out[False][1:]):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)
    pb = entrokit.problem.OTProblem(a, b, PointCloud(x, y, online=True)).with_batch()
    # the start is the multiscale potentials alone: no result is built (nor certified) for them
    from entrokit.geometry.multiscale import default_cluster_scale
    from entrokit.solvers import multiscale

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multiscale, "_certified_result", lambda *a, **k: pytest.fail("the warm start built a result"))
        start = online_warm_start(pb, 0.01, 1e-7)
    assert start.reached is True  # its truncated loop met the tolerance
    capped = online_warm_start(pb, 0.01, 1e-7, max_iter=3)  # the caller's max_iter bounds it
    assert int(capped.n_iter.max()) <= 3 and capped.reached is False
    # the eps rule (cost range > 50 eps) is shown by the distances to one target point where
    # they can (no pass over n x m for the exact bounds), by the exact bounds otherwise
    # (the coarse solve's own centroid cloud may read its bounds: only the user's cloud counts)
    real_bounds, bounds = PointCloud.cost_bounds, []

    def counted(self):
        bounds.append(self is pb.geometry)
        return real_bounds(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PointCloud, "cost_bounds", counted)
        assert online_warm_start(pb, 0.01, 1e-4) is not None and not any(bounds)
        mp.setattr(multiscale, "_cost_range_lower_bound", lambda x, y: torch.zeros(x.shape[:-2], dtype=F64))
        assert online_warm_start(pb, 0.01, 1e-4) is not None and any(bounds)  # range 1.52 > 0.5
        assert online_warm_start(pb, 0.1, 1e-4) is None  # range 1.52 < 5
    # the O(n + m) bound is below the range, and equal to it where the extremes meet one point
    for seed in range(4):
        xs, ys = clouds(n=50, m=40, d=3, batch=(2,), seed=seed)
        lo, hi = PointCloud(xs, ys).cost_bounds()
        assert (multiscale._cost_range_lower_bound(xs, ys) <= hi - lo + 1e-12).all()
    ring = torch.stack([torch.linspace(0, 6.0, 300, dtype=F64).cos(), torch.linspace(0, 6.0, 300, dtype=F64).sin()], -1)
    inner = torch.cat([torch.zeros(1, 2, dtype=F64), 0.05 * ring[:239]], 0)  # range about 1.05^2 - 0.95^2
    lo, hi = PointCloud(ring, inner).cost_bounds()
    torch.testing.assert_close(multiscale._cost_range_lower_bound(ring, inner), hi - lo, rtol=1e-4, atol=0)
    # multiscale_sinkhorn's potentials at the warm start's voxel count, up to the gauge
    scale = float(default_cluster_scale(x[None], y[None], a[None], b[None], cells=multiscale.WARM_START_CELLS))
    ref = entrokit.multiscale_sinkhorn(a, b, x, y, 0.01, tol=1e-7, cluster_scale=scale)
    gauge = (start[0].reshape(-1) - ref.f).mean()
    torch.testing.assert_close(start[0].reshape(-1) - gauge, ref.f, rtol=0, atol=1e-12)
    torch.testing.assert_close(start[1].reshape(-1) + gauge, ref.g, rtol=0, atol=1e-12)
    x4, y4 = clouds(n=30, m=20, d=4)
    assert online_warm_start(entrokit.problem.OTProblem(uniform(30), uniform(20),
                                                        PointCloud(x4, y4, online=True)).with_batch(), 0.1, 1e-6) is None
    assert online_warm_start(entrokit.problem.OTProblem(a, b, PointCloud(x, y, online=False)).with_batch(),
                             0.01, 1e-7) is None
    with pytest.warns(entrokit.ConvergenceWarning, match="did not converge"):  # the plain start
        plain = entrokit.sinkhorn(a, b, PointCloud(x, y, online=True), 0.01, tol=1e-7, grad="unroll", max_iter=50)
    assert int(plain.n_iter) == 50 and not bool(plain.converged)
