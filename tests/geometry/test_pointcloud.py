"""PointCloud: the materialised cost is computed once, and never served stale."""

import torch

import entrokit
from entrokit import PointCloud

D = torch.float64


def _clouds(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(20, 2, generator=gen, dtype=D), torch.rand(15, 2, generator=gen, dtype=D)


def test_in_place_edit_of_the_points_invalidates_the_kept_cost():
    x, y = _clouds()
    geom = PointCloud(x, y)
    before = entrokit.sinkhorn(None, None, geom, 0.1, tol=1e-10).transport_cost
    x.mul_(2.0)  # the same geometry object, new coordinates
    after = entrokit.sinkhorn(None, None, geom, 0.1, tol=1e-10).transport_cost
    fresh = entrokit.sinkhorn(None, None, PointCloud(x.clone(), y), 0.1, tol=1e-10).transport_cost
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-12)
    assert abs(float(after - before)) > 1e-3
    lo, hi = geom.cost_bounds()
    C = torch.cdist(x, y).square()
    torch.testing.assert_close((lo, hi), (C.min().reshape(()), C.max().reshape(())), rtol=1e-12, atol=1e-12)


def test_points_that_require_grad_keep_no_graph_between_calls():
    x, y = _clouds(1)
    x.requires_grad_(True)
    geom = PointCloud(x, y)
    for _ in range(2):  # a second backward through the same geometry must not hit a freed graph
        entrokit.sinkhorn(None, None, geom, 0.1).transport_cost.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_inference_mode_tensors_are_accepted():
    x, y = _clouds(2)
    ref = entrokit.sinkhorn_divergence(x, y, eps=0.1)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        res = entrokit.sinkhorn(None, None, PointCloud(xi, yi), 0.1)
        s = entrokit.sinkhorn_divergence(xi, yi, eps=0.1)
    assert bool(res.converged)
    torch.testing.assert_close(s, ref, rtol=0, atol=1e-12)


def test_multi_chunk_plan_reduce_gradients_equal_the_dense_ones():
    """The online reductions under autograd, over 7 row chunks of 3, against the dense
    cost: rows, columns and <C, P> and their gradients in every argument."""
    x, y = _clouds(3)
    gen = torch.Generator().manual_seed(3)
    f, g = torch.randn(20, generator=gen, dtype=D), torch.randn(15, generator=gen, dtype=D)
    a, b = torch.rand(20, generator=gen, dtype=D), torch.rand(15, generator=gen, dtype=D)
    u, v = torch.randn(20, generator=gen, dtype=D), torch.randn(15, generator=gen, dtype=D)
    out = {}
    for chunk in (None, 3):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, f, g, a, b)]
        geom = PointCloud(*leaves[:2], chunk_size=chunk, online=chunk is not None)
        assert geom.is_online == (chunk is not None)
        rows, cols, tc = geom.plan_reduce(*leaves[2:], 0.3)
        loss = (rows * u).sum() + (cols * v).sum() + tc
        out[chunk] = (rows, cols, tc, *torch.autograd.grad(loss, leaves))
    for dense, online in zip(out[None], out[3]):
        torch.testing.assert_close(online, dense, rtol=1e-12, atol=1e-12)
