"""The fused Triton kernels (entrokit.geometry._triton) on CPU tensors under the Triton
interpreter, against float64 references and the torch tiles.

Not collected by the main run (not ``test_*.py``): ``tests/geometry/test_triton.py`` runs this
file in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported. Shapes are
tiny (the interpreter executes every block in Python) and chosen against the 16-wide blocks
used under the interpreter: 37 rows and 21 columns leave tails, ``d = 20`` takes the
coordinate loop, ``k = 18`` two vector blocks.
"""

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the runner
    pytest.skip("run by tests/geometry/test_triton.py under TRITON_INTERPRET=1", allow_module_level=True)

import entrokit
from entrokit import PointCloud
from entrokit.geometry import _online, _triton
from entrokit.geometry.base import combine_lse

F64 = torch.float64
EPS = 0.1


def data(batch=(2,), n=37, m=21, d=3, dtype=F64, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=g, dtype=F64) + shift
    y = 0.8 * torch.rand(*batch, m, d, generator=g, dtype=F64) + 0.1 + shift
    hw = 0.1 * torch.randn(*batch, m, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype), hw.to(dtype)


def cost64(x, y, cost):
    x, y = x.double(), y.double()
    if cost == "sqeuclidean":  # coordinate differences: no cancellation
        return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    return -(x @ y.transpose(-1, -2))


def lse64(x, y, hw, eps, cost):
    return torch.logsumexp((hw.double().unsqueeze(-2) - cost64(x, y, cost)) / eps, -1)


@pytest.mark.parametrize("cost", _triton.COSTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch,d", [((2,), 3), ((2, 3), 3), ((), 20)], ids=["B2-d3", "B2x3-d3", "noB-d20"])
def test_lse_pairs_match_float64_logsumexp(cost, dtype, batch, d):
    x, y, hw = data(batch=batch, d=d, dtype=dtype)
    hw[..., 4] = -math.inf  # a zero weight
    mx, s = _triton.lse_pairs(x, y, hw, EPS, cost)
    assert mx.shape == s.shape == (*batch, 37) and mx.dtype == dtype
    ref = lse64(x, y, hw, EPS, cost)
    # float32: the exponent's rounding ~ |z| u with |z| up to ~ d R^2 / eps
    tol = 1e-12 if dtype == F64 else 3e-5 * (1 + ref.abs().max().item())
    torch.testing.assert_close((mx + torch.log(s)).double(), ref, rtol=0, atol=tol)
    # pairs are the shifted form: S in [1, m] for the row maxima
    assert bool((s >= 1 - 1e-6).all()) and bool((s <= 21 + 1e-6).all())


def test_all_minus_inf_row_gives_the_empty_pair():
    x, y, hw = data()
    hw[1] = -math.inf
    mx, s = _triton.lse_pairs(x, y, hw, EPS)
    assert bool((mx[1] == -math.inf).all()) and bool((s[1] == 0).all())
    assert bool(torch.isfinite(mx[0]).all())


def test_pairs_merge_across_column_shards():
    """The (max, sum-exp) pairs of two column shards combine into the full soft-min."""
    x, y, hw = data()
    full = _triton.lse_pairs(x, y, hw, EPS)
    # the same centring for both shards: the pairs of the cost are invariant to it
    left = _triton.lse_pairs(x, y[:, :9], hw[:, :9], EPS)
    right = _triton.lse_pairs(x, y[:, 9:], hw[:, 9:], EPS)
    mx, s = combine_lse([left, right])
    torch.testing.assert_close(mx + torch.log(s), full[0] + torch.log(full[1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cost", _triton.COSTS)
def test_online_lse_gradcheck(cost):
    x, y, hw = data(batch=(2,), n=5, m=4, d=2)
    x, y, hw = (t.requires_grad_() for t in (x, y, hw))
    assert torch.autograd.gradcheck(lambda a, b, c: _triton.online_lse(a, b, c, 0.5, cost), (x, y, hw),
                                    eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("cost", _triton.COSTS)
def test_online_lse_gradients_match_autograd_of_the_reference(cost):
    x, y, hw = data()
    hw[0, 2] = -math.inf
    g = torch.randn(2, 37, generator=torch.Generator().manual_seed(3), dtype=F64)
    ins = [t.clone().requires_grad_() for t in (x, y, hw)]
    ours = torch.autograd.grad((_triton.online_lse(*ins, EPS, cost) * g).sum(), ins)
    ins2 = [t.clone().requires_grad_() for t in (x, y, hw)]
    ref = torch.autograd.grad((lse64(*ins2, EPS, cost) * g).sum(), ins2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def plan64(x, y, row, col, eps, cost):
    return torch.exp((row.double().unsqueeze(-1) + col.double().unsqueeze(-2) - cost64(x, y, cost)) / eps)


@pytest.mark.parametrize("cost", _triton.COSTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [1, 18])
def test_plan_products_and_marginals_match_the_dense_plan(cost, dtype, k):
    x, y, col = data(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    row = (0.1 * torch.randn(2, 37, generator=g, dtype=F64)).to(dtype)
    row[0, 3] = -math.inf  # zero weights: exactly zero rows and columns of the plan
    col[1, 7] = -math.inf
    V = torch.randn(2, 21, k, generator=g, dtype=F64).to(dtype)
    U = torch.randn(2, 37, k, generator=g, dtype=F64).to(dtype)
    P = plan64(x, y, row, col, EPS, cost)
    PV, PTU = _triton.plan_products(x, y, row, col, EPS, V, U, cost)
    r, c = _triton.marginals(x, y, row, col, EPS, cost)
    rtol = 1e-12 if dtype == F64 else 2e-5
    for got, ref in ((PV, P @ V.double()), (PTU, P.transpose(-1, -2) @ U.double()), (r, P.sum(-1)), (c, P.sum(-2))):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    assert bool((PV[0, 3] == 0).all()) and bool(r[0, 3] == 0) and bool(c[1, 7] == 0)
    only_v, none_u = _triton.plan_products(x, y, row, col, EPS, V, None, cost)
    assert none_u is None and torch.equal(only_v, PV)


def test_tf32_opt_in_stays_within_the_stated_bound():
    """Under the interpreter tl.dot is exact float32 whatever the precision, so this checks the
    plumbing and the bound of the docstring (2^-9 R^2 / eps per exponent) holds."""
    x, y, hw = data(dtype=torch.float32)
    mx, s = _triton.lse_pairs(x, y, hw, EPS, allow_tf32=True)
    r2 = _online.radius_sq(x.double(), y.double())
    torch.testing.assert_close((mx + torch.log(s)).double(), lse64(x, y, hw, EPS, "sqeuclidean"), rtol=0,
                               atol=2.0 ** -9 * r2 / EPS)


def test_wide_float32_clouds_run_the_kernel_in_float64():
    """Far from the origin a float32 expansion loses the exponent: ``wide`` recovers float64 accuracy."""
    x, y, hw = data(dtype=torch.float32, shift=0.0)
    x, y = x * 30.0, y * 30.0  # R^2 / eps large: needs_wide_tiles
    r2 = _online.radius_sq(x, y)
    eps = 1.0
    assert _online.needs_wide_tiles(r2, eps, torch.float32)
    mx, s = _triton.lse_pairs(x, y, hw, eps, wide=True)
    assert mx.dtype == torch.float32
    torch.testing.assert_close((mx + torch.log(s)).double(), lse64(x, y, hw, eps, "sqeuclidean"), rtol=1e-6, atol=0)


# PointCloud(kernel="triton") against the torch tiles


def pc_pair(dtype=F64, batch=(2,), n=19, m=17):
    x, y, _ = data(batch=batch, n=n, m=m, dtype=dtype)
    return (PointCloud(x, y, online=True, kernel="triton"), PointCloud(x, y, online=True, kernel="eager"))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [0, 1])
def test_pointcloud_softmin_equals_the_torch_tiles(dtype, axis):
    fused, tiles = pc_pair(dtype)
    size = 17 if axis == 1 else 19
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, size, generator=g, dtype=F64).to(dtype)
    log_w = torch.log(torch.rand(2, size, generator=g, dtype=F64)).to(dtype)
    log_w[:, 3] = -math.inf
    tol = 1e-12 if dtype == F64 else 1e-4
    torch.testing.assert_close(fused.softmin(h, log_w, 0.05, axis), tiles.softmin(h, log_w, 0.05, axis),
                               rtol=0, atol=tol)


def test_pointcloud_plan_operations_equal_the_torch_tiles():
    fused, tiles = pc_pair()
    g = torch.Generator().manual_seed(4)
    f, gg = torch.randn(2, 19, generator=g, dtype=F64) * 0.1, torch.randn(2, 17, generator=g, dtype=F64) * 0.1
    a, b = torch.rand(2, 19, generator=g, dtype=F64), torch.rand(2, 17, generator=g, dtype=F64)
    a[0, 0] = 0.0
    for axis, size in ((1, 17), (0, 19)):
        v = torch.randn(2, size, 3, generator=g, dtype=F64)
        torch.testing.assert_close(fused.plan_matvec(f, gg, a, b, 0.2, v, axis),
                                   tiles.plan_matvec(f, gg, a, b, 0.2, v, axis), rtol=1e-12, atol=1e-14)
    for got, ref in zip(fused.marginals(f, gg, a, b, 0.2), tiles.marginals(f, gg, a, b, 0.2)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_sinkhorn_with_the_triton_kernel_matches_the_tiles_and_its_gradients():
    x, y, _ = data(batch=(), n=13, m=11, d=2)
    a, b = torch.full((13,), 1 / 13, dtype=F64), torch.full((11,), 1 / 11, dtype=F64)
    out = {}
    for kernel in ("triton", "eager"):
        xr = x.clone().requires_grad_()
        res = entrokit.sinkhorn(a, b, PointCloud(xr, y, online=True, kernel=kernel), 0.5, tol=1e-9)
        assert bool(res.converged)
        (grad,) = torch.autograd.grad(res.transport_cost, xr)
        out[kernel] = (res.f, res.g, res.transport_cost, grad)
    for u, v in zip(out["triton"], out["eager"]):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


def test_pointcloud_softmin_gradient_goes_through_the_fused_backward():
    x, y, _ = data(n=9, m=7)
    h = torch.randn(2, 7, dtype=F64, generator=torch.Generator().manual_seed(6))
    grads = {}
    for kernel in ("triton", "eager"):
        xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
        geom = PointCloud(xr, y, online=True, kernel=kernel)
        val = geom.softmin(hr, torch.zeros_like(hr), 0.3, 1).sum()
        grads[kernel] = torch.autograd.grad(val, (xr, hr))
    for u, v in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_pointcloud_keeps_its_prepared_points_only_while_they_hold():
    """The centred, scaled points are reused across calls, and rebuilt for a new eps or after
    an in-place change of the points."""
    x, y, _ = data(n=9, m=7)
    geom = PointCloud(x, y, online=True, kernel="triton")
    h, log_w = torch.randn(2, 7, dtype=F64, generator=torch.Generator().manual_seed(8)), torch.zeros(2, 7, dtype=F64)

    def eager(eps):
        return PointCloud(x.clone(), y, online=True, kernel="eager").softmin(h, log_w, eps, 1)

    first = geom.softmin(h, log_w, 0.3, 1)
    kept = geom._backend._fused_points[(1, False)][2]
    torch.testing.assert_close(geom.softmin(h, log_w, 0.3, 1), first, rtol=0, atol=0)
    assert geom._backend._fused_points[(1, False)][2] is kept
    torch.testing.assert_close(geom.softmin(h, log_w, 0.1, 1), eager(0.1), rtol=0, atol=1e-12)
    x.mul_(1.5)  # in place: the kept points are stale
    torch.testing.assert_close(geom.softmin(h, log_w, 0.1, 1), eager(0.1), rtol=0, atol=1e-12)
