"""The multiscale geometry: grid clustering, the extrapolated potentials and the truncated
block-sparse point cloud, checked against the dense cost on the same points."""

import math

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit.geometry import DenseCost, PointCloud
from entrokit.geometry.multiscale import (
    TruncatedPointCloud,
    default_cluster_scale,
    grid_cluster,
)
from entrokit.problem import log_weights
from generators import clouds, weights

D = torch.float64


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
