"""Truncated multiscale Sinkhorn: clustering, the block-sparse geometry, the driver.

The reference is the dense/online Sinkhorn on the same points; the truncation must not
change the answer beyond the stated tolerance, and the certified ``marginal_error`` must
bound the error of the *dense* plan of the returned potentials (recomputed here in
float64 over all pairs).
"""

import functools
import math

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit.geometry import DenseCost, PointCloud
from entrokit.geometry.multiscale import (
    TruncatedPointCloud,
    default_cluster_scale,
    extrapolate_potentials,
    grid_cluster,
)
from entrokit.problem import log_weights
from entrokit.solvers.multiscale import multiscale_sinkhorn

D = torch.float64


def clouds(n, m, d, *, seed=0, dtype=D, shift=0.1, batch=()):
    """x ~ U[0,1]^d, y ~ 0.8 U[0,1]^d + shift (the benchmark's problem)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=gen, dtype=D)
    y = 0.8 * torch.rand(*batch, m, d, generator=gen, dtype=D) + shift
    return x.to(dtype), y.to(dtype)


def weights(n, *, seed=0, zeros=(), dtype=D, batch=()):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(*batch, n, generator=gen, dtype=D) + 0.5
    for k in zeros:
        w[..., k] = 0.0
    return (w / w.sum(-1, keepdim=True)).to(dtype)


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


# ---------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------
class TestGridCluster:
    def test_invariants(self):
        x, _ = clouds(3000, 10, 3, batch=(2,))
        w = weights(3000, zeros=(0, 7), batch=(2,))
        x[1] *= 0.5  # the second problem has its own (finer) grid
        cl = grid_cluster(x, w)
        B, n, K = cl.shape
        for b in range(B):
            perm, labels, kb = cl.perm[b], cl.labels[b], int(cl.n_clusters[b])
            # perm is a permutation and the sorted labels are contiguous (non-decreasing)
            assert torch.equal(torch.sort(perm).values, torch.arange(n))
            sorted_labels = labels[perm]
            assert bool((sorted_labels[1:] >= sorted_labels[:-1]).all())
            # every point in exactly one real cluster; offsets delimit the clusters
            assert int(labels.min()) == 0 and int(labels.max()) == kb - 1
            assert int(cl.counts[b].sum()) == n and bool((cl.counts[b, :kb] > 0).all())
            assert bool((cl.counts[b, kb:] == 0).all())
            off = cl.offsets[b]
            for k in (0, kb // 2, kb - 1):
                assert bool((sorted_labels[off[k]: off[k + 1]] == k).all())
            # weights sum, weighted centroids, radii around the anchors
            assert torch.allclose(cl.weights[b].sum(), w[b].sum())
            k = int(labels[5])
            members = labels == k
            centroid = (w[b, members, None] * x[b, members]).sum(0) / w[b, members].sum()
            assert torch.allclose(cl.centroids[b, k], centroid)
            dist = (x[b] - cl.anchors[b, labels]).norm(dim=-1)
            assert bool((dist <= cl.radii[b, labels] + 1e-12).all())
            # one voxel per cluster: the cluster's box is at most one cell wide
            s = float(cl.scale[b])
            for k in range(0, kb, 97):
                pts = x[b, labels == k]
                assert float((pts.amax(0) - pts.amin(0)).max()) <= s * (1 + 1e-9)

    def test_default_scale_gives_about_2000_cells(self):
        x, y = clouds(20000, 20000, 3)
        s = default_cluster_scale(x[None], y[None])
        assert math.isclose(float(s), math.sqrt(3) / (math.sqrt(3) * 2000 ** (1 / 3)), rel_tol=1e-3)
        cx, cy = grid_cluster(x[None], cluster_scale=s), grid_cluster(y[None], cluster_scale=s)
        assert 1000 <= int(cx.n_clusters) <= 2200
        assert 500 <= int(cy.n_clusters) <= 2000  # y fills 0.8^3 of the box

    def test_zero_weight_points_do_not_set_the_grid(self):
        x, _ = clouds(500, 10, 2)
        w = weights(500)
        x_pad = torch.cat([x, torch.full((100, 2), 1e3, dtype=D)])  # far zero-weight padding
        w_pad = torch.cat([w, torch.zeros(100, dtype=D)])
        s = default_cluster_scale(x[None], None, w[None])
        assert torch.allclose(default_cluster_scale(x_pad[None], None, w_pad[None]), s)
        cl, cl_pad = grid_cluster(x[None], w[None], s), grid_cluster(x_pad[None], w_pad[None], s)
        assert int(cl_pad.n_clusters) == int(cl.n_clusters) + 1  # padding: one more cluster


# ---------------------------------------------------------------------------------------
# the geometry against dense reductions
# ---------------------------------------------------------------------------------------
def _masked_dense(geom: TruncatedPointCloud):
    """Dense cost with +inf outside the kept blocks, and the 0/1 mask of kept pairs."""
    C = geom.cost_matrix().reshape(-1, *geom.shape).to(D)
    lx, ly = geom.x_clusters.labels, geom.y_clusters.labels
    kept = torch.stack([geom.keep[b][lx[b]][:, ly[b]] for b in range(C.shape[0])])
    return C, kept


class TestTruncatedGeometry:
    @pytest.fixture
    def setup(self):
        x, y = clouds(300, 250, 2, batch=(2,), seed=3)
        x[1] = 0.3 * x[1] + 0.5  # different structure per problem
        a = weights(300, zeros=(0, 11), batch=(2,))
        b = weights(250, zeros=(4,), batch=(2,), seed=1)
        eps = 2e-3
        ref = entrokit.sinkhorn(a, b, PointCloud(x, y), eps, tol=1e-9)
        f, g = ref.f, ref.g
        geom = TruncatedPointCloud.from_potentials(x, y, f, g, eps, a=a, b=b, truncate=3.0,
                                                   cluster_scale=0.05, block_entries=4096)
        return x, y, a, b, f, g, eps, geom

    def test_primitives_equal_masked_dense(self, setup):
        x, y, a, b, f, g, eps, geom = setup
        C, kept = _masked_dense(geom)
        assert 0.05 < float(kept.to(D).mean()) < 0.9  # really truncated, really kept
        Cm = torch.where(kept, C, torch.full_like(C, float("inf")))
        dense = DenseCost(Cm)
        for axis, (h, w) in ((1, (g, b)), (0, (f, a))):
            got = geom.softmin(h, log_weights(w), eps, axis)
            want = dense.softmin(h, log_weights(w), eps, axis)
            assert torch.allclose(got, want, rtol=0, atol=1e-12)
        P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps) * kept
        row, col, tc = geom.plan_reduce(f, g, a, b, eps)
        assert torch.allclose(row, P.sum(-1), atol=1e-14) and torch.allclose(col, P.sum(-2), atol=1e-14)
        assert torch.allclose(tc, (P * C).sum((-2, -1)), rtol=1e-12)
        v, u = torch.rand(2, 250, dtype=D), torch.rand(2, 300, dtype=D)
        assert torch.allclose(geom.plan_matvec(f, g, a, b, eps, v, 1), (P @ v.unsqueeze(-1)).squeeze(-1), atol=1e-14)
        assert torch.allclose(geom.plan_matvec(f, g, a, b, eps, u, 0), (u.unsqueeze(-2) @ P).squeeze(-2), atol=1e-14)
        assert torch.allclose(geom.plan(f, g, a, b, eps), P, atol=1e-15)
        lo, hi = geom.cost_bounds()
        assert torch.allclose(lo, C.masked_fill(~kept, float("inf")).flatten(1).amin(-1))
        assert torch.allclose(hi, C.masked_fill(~kept, -float("inf")).flatten(1).amax(-1))
        assert torch.equal(geom.kept_entries, kept.flatten(1).sum(-1))

    def test_large_clusters_are_sliced(self, setup):
        """Blocks larger than ``block_entries`` are cut into row slices: same results."""
        x, y, a, b, f, g, eps, geom = setup
        big = TruncatedPointCloud.from_potentials(x, y, f, g, eps, a=a, b=b, cluster_scale=0.3, block_entries=16)
        ref = TruncatedPointCloud(x, y, big.keep, x_clusters=big.x_clusters, y_clusters=big.y_clusters,
                                  block_entries=1 << 20)
        assert max(grp.rows.shape[1] for grp in big._layouts[1].groups) < int(big.x_clusters.counts.max())
        for axis, (h, w) in ((1, (g, b)), (0, (f, a))):
            assert torch.allclose(big.softmin(h, log_weights(w), eps, axis), ref.softmin(h, log_weights(w), eps, axis),
                                  rtol=0, atol=1e-13)
        for got, want in zip(big.plan_reduce(f, g, a, b, eps), ref.plan_reduce(f, g, a, b, eps)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)

    def test_dropped_mass_bound_is_an_upper_bound(self, setup):
        x, y, a, b, f, g, eps, geom = setup
        C, kept = _masked_dense(geom)
        P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
        dropped = (P * ~kept).flatten(1).sum(-1)
        bound = geom.dropped_mass_bound(f, g, a, b, eps)
        assert bool((dropped <= bound).all()) and bool((dropped > 0).all())
        # every pair with f + g - C >= -tau eps lies in a kept block (the tau rule)
        big = (f.unsqueeze(-1) + g.unsqueeze(-2) - C) >= -3.0 * eps
        assert bool(kept[big].all())

    def test_gradients_flow_through_kept_blocks(self, setup):
        x, y, a, b, f, g, eps, geom = setup
        xr = x.clone().requires_grad_(True)
        g_r = geom.rebuild(xr, y)
        C, kept = _masked_dense(geom)
        _, _, tc = g_r.plan_reduce(f, g, a, b, eps)
        (gx,) = torch.autograd.grad(tc.sum(), xr)
        xd = x.clone().requires_grad_(True)
        Cd = ((xd.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
        Pd = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - Cd) / eps) * kept
        (gd,) = torch.autograd.grad((Pd * Cd).sum(), xd)
        assert torch.allclose(gx, gd, atol=1e-10)

    def test_bad_keep_raises(self, setup):
        x, y, a, b, f, g, eps, geom = setup
        with pytest.raises(InputError, match="keep must be a bool tensor"):
            TruncatedPointCloud(x, y, geom.keep[:, :-1], x_clusters=geom.x_clusters, y_clusters=geom.y_clusters)
        with pytest.raises(InputError, match="clusters do not match"):
            TruncatedPointCloud(x[:, :-1], y, geom.keep, x_clusters=geom.x_clusters, y_clusters=geom.y_clusters)


# ---------------------------------------------------------------------------------------
# the driver against dense Sinkhorn
# ---------------------------------------------------------------------------------------
CASES = [  # (d, dtype, eps, tol)
    (2, torch.float64, 5e-3, 1e-6),
    (3, torch.float64, 1e-2, 1e-6),
    (2, torch.float32, 5e-3, 1e-4),
    (3, torch.float32, 1e-2, 1e-4),
]


@functools.cache
def dense_reference(d, dtype, eps):
    """The problem in ``dtype`` and its dense float64 Sinkhorn solution (tol 1e-8)."""
    n, m = 2000, 1600
    x, y = clouds(n, m, d, dtype=dtype, seed=d)
    a = weights(n, zeros=(0, 5), dtype=dtype, seed=1)
    b = weights(m, zeros=(3,), dtype=dtype, seed=2)
    ref = entrokit.sinkhorn(a.to(D), b.to(D), PointCloud(x.to(D), y.to(D)), eps, tol=1e-8)
    return x, y, a, b, ref


@pytest.mark.parametrize("d,dtype,eps,tol", CASES, ids=["2d-f64", "3d-f64", "2d-f32", "3d-f32"])
def test_matches_dense_sinkhorn(d, dtype, eps, tol):
    x, y, a, b, ref = dense_reference(d, dtype, eps)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert bool(res.converged) and float(res.marginal_error) <= tol
    assert res.f.shape == a.shape and res.g.shape == b.shape and res.f.dtype == dtype
    # the contract, recomputed over all n m pairs in float64 from the returned potentials
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    # the same solution: potentials up to the additive constant, transport cost, marginals
    gap = (2e-3 if dtype == D else 2e-2) * eps
    assert centred_gap(res.f, ref.f, a > 0) <= gap and centred_gap(res.g, ref.g, b > 0) <= gap
    assert math.isclose(float(res.transport_cost), float(ref.transport_cost), rel_tol=1e-6 if dtype == D else 1e-4)
    row, col = res.marginals()
    assert float((row.to(D) - a.to(D)).abs().sum() + (col.to(D) - b.to(D)).abs().sum()) <= tol
    # the certified error splits into the kept plan's and twice the dropped mass
    info = res.info
    assert info.kept_marginal_error[0] + 2 * info.dropped_mass_bound[0] <= tol
    assert 0.0 < info.kept_fraction[0] < 1.0


def test_coarse_grid_continues_the_schedule_on_the_fine_level():
    """Large clusters (s^2 > eps): the coarse solve stops at s^2 and the fine level runs
    the remaining eps stages, re-truncating at each."""
    eps, tol = 1e-2, 1e-6
    x, y, a, b, ref = dense_reference(3, D, eps)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol, cluster_scale=0.2)
    assert res.info.coarse_eps == pytest.approx(0.04) and res.info.stages == 3
    assert bool(res.converged) and float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    assert centred_gap(res.f, ref.f, a > 0) <= 2e-3 * eps


def test_truncation_is_re_expanded_or_reported(monkeypatch):
    """A kept set chosen too small (a 4 tol budget) is enlarged after the solve; with no
    second round allowed, the result says converged=False instead of changing silently."""
    import entrokit.solvers.multiscale as ms

    eps, tol = 1e-2, 1e-6
    x, y, a, b, ref = dense_reference(3, D, eps)
    monkeypatch.setattr(ms, "DROP_PLAN", 4.0)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert res.info.rounds == 2 and bool(res.converged)
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    assert centred_gap(res.f, ref.f, a > 0) <= 2e-3 * eps
    with pytest.warns(entrokit.ConvergenceWarning, match="multiscale_sinkhorn did not converge"):
        bad = multiscale_sinkhorn(a, b, x, y, eps, tol=tol, max_rounds=1)
    assert not bool(bad.converged) and float(bad.marginal_error) > tol
    assert bad.info.dropped_mass_bound[0] > tol / 8
    # the certified bound really bounds the dense plan's error
    assert float(dense_marginal_error(bad, x, y, a, b, eps)) <= float(bad.marginal_error)


def test_batched_equals_per_problem_and_padding_is_inert():
    """B=3 problems with per-problem clusters and zero-weight padding: each equals its
    own solve, and padding points do not change the real points' potentials."""
    n, m, eps, tol = 700, 600, 5e-3, 1e-6
    x, y = clouds(n, m, 2, batch=(3,), seed=7)
    x[1] = 0.5 * x[1] + 0.3  # another scale: another grid
    y[2] = y[2] * torch.tensor([1.0, 0.2], dtype=D)  # elongated
    a = weights(n, batch=(3,), seed=8)
    b = weights(m, batch=(3,), seed=9)
    # problem 0 is padded: its last 150 source points weigh 0 and sit at the origin
    a[0, -150:] = 0.0
    a[0] /= a[0].sum()
    x[0, -150:] = 0.0
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert res.f.shape == (3, n) and res.g.shape == (3, m) and bool(res.converged.all())
    for k in range(3):
        one = multiscale_sinkhorn(a[k], b[k], x[k], y[k], eps, tol=tol)
        assert centred_gap(res.f[k], one.f, a[k] > 0) <= 1e-3 * eps and centred_gap(res.g[k], one.g) <= 1e-3 * eps
        assert math.isclose(float(res.transport_cost[k]), float(one.transport_cost), rel_tol=1e-6)
        assert float(dense_marginal_error(one, x[k], y[k], a[k], b[k], eps)) <= tol
    assert bool((dense_marginal_error(res, x, y, a, b, eps) <= tol).all())
    real = multiscale_sinkhorn(a[0, :-150], b[0], x[0, :-150], y[0], eps, tol=tol)
    assert centred_gap(res.f[0, :-150], real.f) <= 1e-3 * eps and centred_gap(res.g[0], real.g) <= 1e-3 * eps
    # the padding points' potentials are finite soft-mins
    assert bool(torch.isfinite(res.f).all())


def test_original_order_is_restored():
    x, y = clouds(600, 500, 3, seed=11)
    p = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    q = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    res = multiscale_sinkhorn(None, None, x, y, 1e-2, tol=1e-7)
    res_p = multiscale_sinkhorn(None, None, x[p], y[q], 1e-2, tol=1e-7)
    assert torch.allclose(res_p.f, res.f[p], atol=1e-7) and torch.allclose(res_p.g, res.g[q], atol=1e-7)


def test_truncation_keeps_a_small_fraction_in_3d():
    """20k points per side in 3-D: the driver's truncation, built from the coarse solve,
    keeps a small fraction of the n m pairs; its soft-mins are exact on the kept blocks."""
    n = m = 20000
    eps, tol = 1e-3, 1e-4
    x, y = clouds(n, m, 3, dtype=torch.float32, seed=5)
    x3, y3 = x[None], y[None]
    a3 = torch.full((1, n), 1.0 / n)
    s = default_cluster_scale(x3, y3, a3, a3)
    cx, cy = grid_cluster(x3, a3, s), grid_cluster(y3, a3, s)
    coarse = entrokit.sinkhorn(cx.weights.double(), cy.weights.double(),
                               PointCloud(cx.centroids.double(), cy.centroids.double()), eps,
                               tol=1e-3, eps_scaling=True, grad="envelope", check_inputs=False)
    f, g = extrapolate_potentials(x3, y3, cx, cy, coarse.f, coarse.g, eps)
    geom = TruncatedPointCloud.from_potentials(x3, y3, f, g, eps, a=a3, b=a3, mass_budget=tol / 32,
                                               clusters=(cx, cy))
    assert float(geom.kept_fraction) < 0.1  # far fewer than n m pairs
    bound = float(geom.dropped_mass_bound(f, g, a3, a3, eps))
    assert bound <= tol / 32
    # 64 rows against all 20k columns in float64: the truncated soft-min is the dense one
    # restricted to the kept blocks, and the dropped part is within the bound
    rows = torch.arange(0, n, n // 64)
    C = ((x[rows, None].double() - y[None].double()) ** 2).sum(-1)
    kept = geom.keep[0][cx.labels[0, rows]][:, cy.labels[0]]
    z = (g.double() - C) / eps + math.log(1.0 / m)
    want = -eps * torch.logsumexp(z.masked_fill(~kept, -float("inf")), -1)
    got = geom.softmin(g, log_weights(a3), eps, 1)[0, rows].double()
    assert float((got - want).abs().max()) <= 1e-3 * eps  # float32 rounding of the exponents
    dropped = (torch.exp(z + f[0, rows, None].double() / eps) / n * ~kept).sum()
    assert float(dropped) <= bound
@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_gradients_match_dense(grad):
    """Gradients of the truncated solve (through the kept blocks) equal the dense ones:
    value (envelope theorem) and transport cost plus a potential term (implicit)."""
    x, y = clouds(240, 200, 2, seed=2)
    a = weights(240, seed=3)
    eps = 5e-3
    probe = torch.linspace(0.0, 1.0, 240, dtype=D)

    def loss(res):
        if grad == "envelope":
            return res.value
        return res.transport_cost + 1e-2 * (res.f * probe).sum()

    xr, ar = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    gx, ga = torch.autograd.grad(loss(multiscale_sinkhorn(ar, None, xr, y, eps, tol=1e-10, grad=grad)), (xr, ar))
    xd, ad = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    gxd, gad = torch.autograd.grad(loss(entrokit.sinkhorn(ad, None, PointCloud(xd, y), eps, tol=1e-10, grad=grad)),
                                   (xd, ad))
    assert torch.allclose(gx, gxd, atol=1e-7 * float(gxd.abs().max()))
    assert torch.allclose(ga, gad, atol=1e-7 * float(gad.abs().max()))


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
class TestBadInputs:
    x, y = clouds(50, 40, 2)

    def test_dimension_above_three(self):
        x4, y4 = clouds(50, 40, 4)
        with pytest.raises(InputError, match=r"needs d <= 3; got d=4.*PointCloud\(x, y, chunk_size"):
            multiscale_sinkhorn(None, None, x4, y4, 1e-2)

    @pytest.mark.parametrize("bad,what", [(float("nan"), "NaN"), (float("inf"), "infinite")])
    def test_non_finite_points(self, bad, what):
        x = self.x.clone()
        x[3, 1] = bad
        with pytest.raises(InputError, match=f"x contains (an )?{what}.*expected finite coordinates"):
            multiscale_sinkhorn(None, None, x, self.y, 1e-2)
        y = self.y.clone()
        y[0, 0] = bad
        with pytest.raises(InputError, match=f"y contains (an )?{what}.*expected finite coordinates"):
            multiscale_sinkhorn(None, None, self.x, y, 1e-2)

    @pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "5", True])
    def test_bad_truncate(self, value):
        with pytest.raises(InputError, match=r"truncate must be a finite number > 0.*truncate=5.0"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, truncate=value)

    @pytest.mark.parametrize("value", [0.0, -0.1, float("inf"), "auto"])
    def test_bad_cluster_scale(self, value):
        with pytest.raises(InputError, match=r"cluster_scale must be a finite number > 0.*or None"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, cluster_scale=value)

    def test_mismatched_shapes(self):
        with pytest.raises(InputError, match=r"weights do not match the points: expected a of shape \(50,\)"):
            multiscale_sinkhorn(torch.full((49,), 1 / 49, dtype=D), None, self.x, self.y, 1e-2)
        with pytest.raises(InputError, match="same point dimension"):
            multiscale_sinkhorn(None, None, self.x, clouds(40, 40, 3)[1], 1e-2)
        with pytest.raises(InputError, match="batch axes of x and y differ"):
            multiscale_sinkhorn(None, None, self.x.expand(2, 50, 2), self.y.expand(3, 40, 2), 1e-2)
        with pytest.raises(InputError, match=r"shapes \(\.\.\., n, d\)"):
            multiscale_sinkhorn(None, None, self.x[:, 0], self.y[:, 0], 1e-2)

    def test_bad_options_and_weights(self):
        with pytest.raises(InputError, match="does not unroll"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, grad="unroll")
        with pytest.raises(InputError, match="total masses differ"):
            multiscale_sinkhorn(torch.full((50,), 0.03, dtype=D), None, self.x, self.y, 1e-2)
        with pytest.raises(InputError, match="eps must be a finite number > 0"):
            multiscale_sinkhorn(None, None, self.x, self.y, -1.0)


@pytest.mark.parametrize("n", [300, 1000])
def test_one_dimensional_points_converge_with_the_defaults(n):
    """d = 1: the extrapolated potentials are nearly a fixed point in f alone, so a first
    check on the unsymmetric pair stopped the fine solve after one sweep (certified error
    ~1e-5, converged=False on every seed). Each fine solve now starts from g = softmin(f)."""
    eps, tol = 1e-2, 1e-6
    x, y = clouds(n, n, 1, seed=n)
    a, b = weights(n, seed=1), weights(n, seed=2)
    res = multiscale_sinkhorn(a, b, x, y, eps)
    assert bool(res.converged) and float(res.marginal_error) <= tol
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    ref = entrokit.sinkhorn(a, b, PointCloud(x, y), eps, tol=1e-8)
    assert centred_gap(res.f, ref.f) <= 2e-3 * eps


def test_result_built_under_inference_mode_is_usable_afterwards():
    """plan / apply of a result made in torch.inference_mode() write into the geometry's
    workspaces outside it (RuntimeError: Inplace update to inference tensor, before)."""
    eps = 1e-2
    x, y = clouds(300, 200, 2, seed=3)
    with torch.inference_mode():
        res = multiscale_sinkhorn(None, None, x, y, eps)
    ref = multiscale_sinkhorn(None, None, x, y, eps)
    P = res.plan
    torch.testing.assert_close(P, ref.plan)
    v = torch.linspace(0.0, 1.0, 200, dtype=D)
    torch.testing.assert_close(res.apply(v), P @ v)
    row, col = res.marginals()
    torch.testing.assert_close(row, P.sum(-1))


def test_block_entries_must_be_a_positive_int():
    x, y = clouds(50, 40, 2)
    with pytest.raises(InputError, match="block_entries must be an int >= 1, got 0"):
        multiscale_sinkhorn(None, None, x, y, 1e-2, block_entries=0)
    with pytest.raises(TypeError, match="block_entries must be an int >= 1"):
        multiscale_sinkhorn(None, None, x, y, 1e-2, block_entries=2.5)


def test_one_convergence_warning_per_call():
    """float32 at a tol it cannot certify: the certification of the kept plan and the final
    verdict were two ConvergenceWarnings; now one, carrying both reasons."""
    import warnings

    x, y = clouds(300, 300, 1, seed=0, dtype=torch.float32)
    x, y = x * 1e6, y * 1e6  # coordinates 1e6 (eps in squared units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = multiscale_sinkhorn(None, None, x, y, 1e9)
    conv = [w for w in caught if issubclass(w.category, entrokit.ConvergenceWarning)]
    assert not bool(res.converged)
    assert len(conv) == 1 and "multiscale_sinkhorn did not converge" in str(conv[0].message)
