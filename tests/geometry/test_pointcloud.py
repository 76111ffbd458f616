"""PointCloud: the materialised cost is computed once, and never served stale."""

import gc

import pytest
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


def test_derived_geometries_skip_init_keep_the_backend_and_carry_the_caches(monkeypatch):
    """Reshaped, detached, re-typed, rebuilt and self geometries are derived without running
    ``__init__`` (no validation, no backend decision) and compute what a fresh one does."""
    calls = []
    init = PointCloud.__init__
    monkeypatch.setattr(PointCloud, "__init__", lambda self, *a, **k: (calls.append(1), init(self, *a, **k))[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 7, 2, generator=g, dtype=torch.float64)
    for kw in ({"chunk_size": 4}, {"online": False}):
        calls.clear()
        geom = PointCloud(x, y, "pnorm", p=1.5, **kw)
        derived = {
            "reshape": geom.reshape_batch((1, 2)), "detach": geom.detach(), "float32": geom.to_dtype(torch.float32),
            "rebuild": geom.rebuild(x.detach() + 1, y), "xx": geom.self_geometries()[0],
            "yy": geom.self_geometries()[1], "flat": geom.reshape_batch((2,)).flatten_batch(),
        }
        assert len(calls) == 1, kw
        for name, d in derived.items():
            assert type(d._backend) is type(geom._backend) and d.is_online == geom.is_online, name
            assert (d.cost, d.p, d.chunk_size, d.cost_fn) == (geom.cost, geom.p, geom.chunk_size, geom.cost_fn), name
        init(fresh := object.__new__(PointCloud), x.detach(), x.detach(), "pnorm", p=1.5, **kw)
        h = torch.randn(2, 9, generator=g, dtype=torch.float64)
        torch.testing.assert_close(derived["xx"].softmin(h, torch.zeros_like(h), 0.1, 1),
                                   fresh.softmin(h, torch.zeros_like(h), 0.1, 1), rtol=0, atol=1e-13)
    # the kept cost matrix and the bounds carry over to reshaped and detached copies
    dense = PointCloud(x.detach(), y, online=False)
    C = dense._backend.matrix().C
    lo, hi = dense.cost_bounds()
    flat = dense.reshape_batch((1, 2))
    assert flat._backend.matrix().C.data_ptr() == C.data_ptr() and flat.cost_bounds()[0].shape == (1, 2)
    torch.testing.assert_close(flat.cost_bounds()[1].reshape(2), hi)


def test_the_backend_and_kernel_are_decided_once_per_divergence(monkeypatch):
    """The dense-or-online rule runs once (at the user's PointCloud), the kernel rules once
    per online geometry family: derived geometries keep the decision."""
    import collections

    from entrokit.geometry import _online, _triton
    from entrokit.geometry import pointcloud as pc_module

    counts = collections.Counter()
    for mod, name in ((_online, "use_compiled"), (_triton, "use_triton"), (pc_module, "memory_budget")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: (counts.update([_n]), _o(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(30, 2, generator=g, dtype=torch.float64)
    entrokit.sinkhorn_divergence(PointCloud(x, y, chunk_size=16), eps=0.1).backward()
    assert (counts["use_compiled"], counts["use_triton"], counts["memory_budget"]) == (1, 1, 0)
    counts.clear()
    entrokit.sinkhorn_divergence(x, y, eps=0.1).backward()
    assert (counts["use_compiled"], counts["memory_budget"]) == (0, 1)


# -- no reference cycles: the n x m cache is freed with the last reference ---------------------
def _tensors_left_to_the_cyclic_collector(fn) -> list:
    """Tensors that ``fn`` leaves in reference cycles: freed only by Python's cyclic
    collector, at an unbounded time (its thresholds count objects, not bytes). The fake
    tensors that torch.compile traced in an earlier test are not counted: its caches may drop
    them while ``fn`` runs."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    gc.disable()
    try:
        fn()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("points_grad", [False, True])
def test_a_solve_leaves_no_tensor_in_a_reference_cycle(online, points_grad):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 3, generator=g, dtype=torch.float64), torch.rand(50, 3, generator=g, dtype=torch.float64)
    a, b = torch.full((60,), 1 / 60, dtype=torch.float64), torch.full((50,), 1 / 50, dtype=torch.float64)

    def solve():
        xx = x.clone().requires_grad_(points_grad)
        res = entrokit.sinkhorn(a, b, PointCloud(xx, y, online=online), 0.05)
        assert res.plan.shape == (60, 50)
        if points_grad:
            (res.value + res.transport_cost).backward()
        entrokit.sinkhorn_divergence(PointCloud(xx, y, online=online), eps=0.05)

    assert _tensors_left_to_the_cyclic_collector(solve) == []


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_cloud_solves_on_its_own(online, how):
    import copy
    import pickle

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(30, 3, generator=g, dtype=torch.float64), torch.rand(20, 3, generator=g, dtype=torch.float64)
    a, b = torch.full((30,), 1 / 30, dtype=torch.float64), torch.full((20,), 1 / 20, dtype=torch.float64)
    pc = PointCloud(x, y, online=online)
    ref = entrokit.sinkhorn(a, b, pc, 0.1)  # with its cache filled
    clone = copy.deepcopy(pc) if how == "deepcopy" else pickle.loads(pickle.dumps(pc))
    del pc
    gc.collect()  # the original is gone: the copy's backend refers to the copy
    res = entrokit.sinkhorn(a, b, clone, 0.1)
    torch.testing.assert_close(res.value, ref.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.plan, ref.plan, rtol=0, atol=1e-14)
