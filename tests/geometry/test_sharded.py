"""ShardedPointCloud on 2 gloo processes equals the single-process solve (float64, 1e-10).

One spawned run (module fixture, bounded in time) executes every distributed scenario and
saves what each rank saw, including the exceptions it raised; the tests compare with the
single-process solver and re-raise the recorded exceptions under ``pytest.raises``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import entrokit
from entrokit import InputError
from entrokit.distributed import scatter_problems, solve_batch_distributed
from entrokit.geometry.pointcloud import PointCloud
from entrokit.geometry.sharded import CommCounter, ShardedPointCloud
from entrokit.problem import make_problem
from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem
from gloo_ranks import run_on_ranks

WORLD, N, M, D, EPS, TOL = 2, 60, 50, 3, 0.05, 1e-9
X_SPLIT, Y_SPLIT = [35], [28]  # uneven shards: 35 + 25 rows, 28 + 22 columns (ring)
FIXED_ITERS = 20
TIMEOUT_S = 120
F64 = torch.float64


def _data(batch: tuple[int, ...] = ()):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(*batch, N, D, generator=gen, dtype=F64)
    y = 0.8 * torch.rand(*batch, M, D, generator=gen, dtype=F64) + 0.1
    a = torch.rand(*batch, N, generator=gen, dtype=F64) + 0.1
    a[..., 3] = 0.0  # a zero weight
    b = torch.rand(*batch, M, generator=gen, dtype=F64) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _shard(t, split, rank):
    return t.tensor_split(split, dim=-1 if t.dim() == 1 else -2)[rank] if t is not None else None


def _fields(res):
    return {k: getattr(res, k).detach().clone() for k in
            ("f", "g", "value", "transport_cost", "marginal_error", "converged", "n_iter")}


def _raised(fn):
    """The exception ``fn`` raises (``None`` if it returns)."""
    try:
        fn()
    except Exception as err:  # recorded, re-raised by the tests
        return err
    return None


def _scenarios(rank: int) -> dict:
    x, y, a, b = _data()
    xs, as_ = _shard(x, X_SPLIT, rank), a.tensor_split(X_SPLIT)[rank]
    ys, bs = _shard(y, Y_SPLIT, rank), b.tensor_split(Y_SPLIT)[rank]
    out = {}

    # uniform weights (filled in from the global sizes) and given weights with a zero
    out["replicated"] = _fields(entrokit.sinkhorn(None, None, ShardedPointCloud(xs, y), EPS, tol=TOL))
    geom = ShardedPointCloud(xs, y, chunk_size=16)
    res = entrokit.sinkhorn(as_, b, geom, EPS, tol=TOL)
    out["weights"] = _fields(res)
    v_m, v_n = torch.linspace(0, 1, M, dtype=F64), torch.linspace(1, 2, N, dtype=F64)
    out["weights"].update(
        rows=res.marginals()[0], cols=res.marginals()[1], plan=res.plan,
        Pv=res.apply(v_m, 1), PTu=res.apply(_shard(v_n, X_SPLIT, rank), 0),
    )
    ring = entrokit.sinkhorn(as_, bs, ShardedPointCloud(xs, ys, ring=True), EPS, tol=TOL)
    out["ring"] = _fields(ring)
    out["ring"].update(
        cols=ring.marginals()[1], Pv=ring.apply(_shard(v_m, Y_SPLIT, rank), 1),
        PTu=ring.apply(_shard(v_n, X_SPLIT, rank), 0),
    )
    out["ring_plan"] = _raised(lambda: ring.plan)

    # batched geometry (2, n_local, d)
    xb, yb, ab, bb = _data((2,))
    geom_b = ShardedPointCloud(_shard(xb, X_SPLIT, rank), yb)
    out["batched"] = _fields(entrokit.sinkhorn(ab.tensor_split(X_SPLIT, -1)[rank], bb, geom_b, EPS, tol=TOL))

    # bytes per iteration: FIXED_ITERS iterations of the solver loop
    for name, g in (("replicated", ShardedPointCloud(xs, y)), ("ring", ShardedPointCloud(xs, ys, ring=True))):
        pb = make_problem(as_, b if name == "replicated" else bs, g).with_batch()
        opts = SinkhornOptions(fixed_iter=True, max_iter=FIXED_ITERS)
        with CommCounter() as counter:
            sinkhorn_problem(pb, EPS, opts)
        out[f"bytes_{name}"] = counter.bytes_sent
        with CommCounter() as counter:
            solved = entrokit.sinkhorn(None, None, g, EPS, tol=TOL)
        out[f"solve_bytes_{name}"] = (counter.bytes_sent, int(solved.n_iter))

    # envelope gradient of value with respect to the local points (and this rank's share of y.grad)
    xg, yg = xs.clone().requires_grad_(True), y.clone().requires_grad_(True)
    value = entrokit.sinkhorn(as_, b, ShardedPointCloud(xg, yg), EPS, tol=TOL, grad="envelope").value
    value.backward()
    y_grad = yg.grad.clone()
    dist.all_reduce(y_grad)
    out["grad"] = {"x": xg.grad.clone(), "y": y_grad}
    out["implicit"] = _raised(lambda: entrokit.sinkhorn(as_, b, ShardedPointCloud(xg, yg), EPS))
    out["unroll"] = _raised(lambda: entrokit.sinkhorn(as_, b, ShardedPointCloud(xs, y), EPS, grad="unroll"))

    # bad inputs: every rank raises the same error
    out["dims"] = _raised(lambda: ShardedPointCloud(xs[:, : 3 - rank], y[:, : 3 - rank]))
    bad = xs.clone()
    if rank == 1:
        bad[2, 0] = float("nan")
    out["nonfinite"] = _raised(lambda: ShardedPointCloud(bad, y))
    out["y_differs"] = _raised(lambda: ShardedPointCloud(xs, y + rank))
    # each shard of a sums to 1: the global mass is 2 != 1 (a local sum would not see it)
    out["mass"] = _raised(lambda: entrokit.sinkhorn(as_ / as_.sum(), b, ShardedPointCloud(xs, y), EPS))

    # spreading a batch of independent problems
    xb4, yb4, _, _ = _data((4,))
    spread = solve_batch_distributed(xb4[..., :20, :], yb4[..., :15, :], eps=EPS, tol=TOL)
    out["spread"] = {k: getattr(spread, k) for k in ("f", "g", "value", "converged", "n_iter")}
    out["spread_local"] = spread.local.f.shape
    out["indivisible"] = _raised(lambda: scatter_problems(xb4[:3], group=None))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("sharded"), timeout_s=TIMEOUT_S)


def _reference(a=None, b=None, batch=(), **kw):
    x, y, _, _ = _data(batch)
    return entrokit.sinkhorn(a, b, PointCloud(x, y), EPS, tol=TOL, lse_mode=True, **kw)


def _assert_same(ranks, key, ref, ring=False):
    f = torch.cat([r[key]["f"] for r in ranks], -1)
    g = torch.cat([r[key]["g"] for r in ranks], -1) if ring else ranks[0][key]["g"]
    torch.testing.assert_close(f, ref.f, rtol=0, atol=1e-10)
    torch.testing.assert_close(g, ref.g, rtol=0, atol=1e-10)
    for r in ranks:
        for k in ("value", "transport_cost", "marginal_error"):
            torch.testing.assert_close(r[key][k], getattr(ref, k), rtol=0, atol=1e-10)
        assert torch.equal(r[key]["converged"], ref.converged) and bool(ref.converged.all())
        assert torch.equal(r[key]["n_iter"], ref.n_iter)
        if not ring:  # g is replicated bit for bit (control flow agrees on every rank)
            assert torch.equal(r[key]["g"], ranks[0][key]["g"])


def test_replicated_uniform_weights_equal_single_process(ranks):
    _assert_same(ranks, "replicated", _reference())


def test_replicated_given_weights_equal_single_process(ranks):
    _, _, a, b = _data()
    ref = _reference(a, b)
    _assert_same(ranks, "weights", ref)
    rows = torch.cat([r["weights"]["rows"] for r in ranks])
    torch.testing.assert_close(rows, ref.marginals()[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0]["weights"]["cols"], ref.marginals()[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["weights"]["plan"] for r in ranks]), ref.plan, rtol=0, atol=1e-12)
    v_m, v_n = torch.linspace(0, 1, M, dtype=F64), torch.linspace(1, 2, N, dtype=F64)
    torch.testing.assert_close(torch.cat([r["weights"]["Pv"] for r in ranks]), ref.apply(v_m, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[1]["weights"]["PTu"], ref.apply(v_n, 0), rtol=0, atol=1e-12)


def test_ring_mode_equals_single_process(ranks):
    _, _, a, b = _data()
    ref = _reference(a, b)
    _assert_same(ranks, "ring", ref, ring=True)
    v_m, v_n = torch.linspace(0, 1, M, dtype=F64), torch.linspace(1, 2, N, dtype=F64)
    cols = torch.cat([r["ring"]["cols"] for r in ranks])
    torch.testing.assert_close(cols, ref.marginals()[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["ring"]["Pv"] for r in ranks]), ref.apply(v_m, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["ring"]["PTu"] for r in ranks]), ref.apply(v_n, 0), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="ring mode never gathers all of y"):
        raise ranks[0]["ring_plan"]


def test_batched_geometry_equals_single_process(ranks):
    _, _, a, b = _data((2,))
    _assert_same(ranks, "batched", _reference(a, b, batch=(2,)))


def test_bytes_per_iteration(ranks):
    itemsize, n_shard, m_shard = 8, (35, 25), (28, 22)
    for rank, r in enumerate(ranks):
        # replicated: one all-reduce MAX and one SUM of m numbers per g-update, plus the
        # one marginal error of the (single) convergence check
        assert r["bytes_replicated"] == FIXED_ITERS * 2 * M * itemsize + itemsize
        assert r["bytes_replicated"] / FIXED_ITERS <= 2 * (N + M) * itemsize
        # ring: this rank's y block and x block, each with one packed column, per iteration
        ring = FIXED_ITERS * (n_shard[rank] + m_shard[rank]) * (D + 1) * itemsize + itemsize
        assert r["bytes_ring"] == ring
        # a full solve: set-up and certification add a few (n + m)-sized messages
        total, n_iter = r["solve_bytes_replicated"]
        assert total / n_iter <= 2 * (N + M) * itemsize


def test_envelope_gradient_equals_single_process(ranks):
    x, y, a, b = _data()
    x, y = x.requires_grad_(True), y.requires_grad_(True)
    entrokit.sinkhorn(a, b, PointCloud(x, y), EPS, tol=TOL, lse_mode=True, grad="envelope").value.backward()
    torch.testing.assert_close(torch.cat([r["grad"]["x"] for r in ranks]), x.grad, rtol=0, atol=1e-10)
    for r in ranks:  # the per-rank shares of y.grad sum to the full gradient
        torch.testing.assert_close(r["grad"]["y"], y.grad, rtol=0, atol=1e-10)


def test_unsupported_gradient_modes_raise(ranks):
    for r in ranks:
        with pytest.raises(InputError, match="grad='implicit' is not supported on ShardedPointCloud"):
            raise r["implicit"]
        with pytest.raises(InputError, match="grad='unroll' is not supported"):
            raise r["unroll"]


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("dims", r"point dimension differs across ranks \(d=3 on rank 0, d=2 on rank 1\)"),
        ("nonfinite", r"invalid input on rank\(s\) \[1\]: x_local contains NaN or inf"),
        ("y_differs", "y differs across ranks.*ring=True"),
        ("mass", r"total masses differ: sum\(a\)=2"),
        ("indivisible", "world size 2 does not divide the batch of 3 problems"),
    ],
)
def test_bad_inputs_raise_on_every_rank(ranks, key, match):
    for r in ranks:
        assert isinstance(r[key], InputError), r[key]
        with pytest.raises(InputError, match=match):
            raise r[key]


def test_batch_spreading_equals_batched_solve(ranks):
    x, y, _, _ = _data((4,))
    ref = entrokit.sinkhorn(None, None, PointCloud(x[..., :20, :], y[..., :15, :]), EPS, tol=TOL)
    for r in ranks:
        assert r["spread_local"] == (2, 20)
        torch.testing.assert_close(r["spread"]["f"], ref.f, rtol=0, atol=1e-12)
        torch.testing.assert_close(r["spread"]["g"], ref.g, rtol=0, atol=1e-12)
        torch.testing.assert_close(r["spread"]["value"], ref.value, rtol=0, atol=1e-12)
        assert torch.equal(r["spread"]["converged"], ref.converged)
        assert torch.equal(r["spread"]["n_iter"], ref.n_iter)


def test_without_torch_distributed_raises():
    assert not dist.is_initialized()
    x, y, _, _ = _data()
    with pytest.raises(InputError, match="needs an initialised torch.distributed process group"):
        ShardedPointCloud(x, y)
    with pytest.raises(InputError, match="init_process_group"):
        scatter_problems(x[None])
