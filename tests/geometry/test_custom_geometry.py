"""The seam holds: a geometry defined only here runs every solver path unchanged, both one
that implements every primitive (tile by tile) and one that implements only its cost."""

import pytest
import torch

import entrokit
from cost_only import CostOnly
from entrokit.geometry import Geometry, plan_block
from entrokit.geometry.base import logsumexp_pair

D = torch.float64


class LowRankCost(Geometry):
    """C = U Vᵀ, evaluated tile by tile (never stored), counting primitive calls."""

    def __init__(self, U, V, calls=None, tile=3):
        self.U, self.V, self.tile = U, V, tile
        self.calls = calls if calls is not None else {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def shape(self):
        return (self.U.shape[-2], self.V.shape[-2])

    @property
    def dtype(self):
        return self.U.dtype

    @property
    def device(self):
        return self.U.device

    @property
    def batch_shape(self):
        return tuple(self.U.shape[:-2])

    @property
    def is_online(self):
        return True

    def reshape_batch(self, batch_shape):
        k = self.U.shape[-1]
        return LowRankCost(self.U.reshape(*batch_shape, self.shape[0], k),
                           self.V.reshape(*batch_shape, self.shape[1], k), self.calls, self.tile)

    def detach(self):
        return LowRankCost(self.U.detach(), self.V.detach(), self.calls, self.tile)

    def tensors(self):
        return (self.U, self.V)

    def rebuild(self, U, V):
        return LowRankCost(U, V, self.calls, self.tile)

    def _rows(self, s, e):
        return self.U[..., s:e, :] @ self.V.transpose(-1, -2)

    def _tiles(self):
        n = self.shape[0]
        return [(s, min(s + self.tile, n)) for s in range(0, n, self.tile)]

    def cost_bounds(self):
        self._count("cost_bounds")
        C = self.cost_matrix().detach().flatten(-2)
        return C.amin(-1), C.amax(-1)

    def cost_matrix(self):
        self._count("cost_matrix")
        return self.U @ self.V.transpose(-1, -2)

    def lse(self, h, log_w, eps, axis):
        self._count("lse")
        hw = h + eps * log_w
        if axis == 1:
            pairs = [logsumexp_pair((hw.unsqueeze(-2) - self._rows(s, e)) / eps, -1) for s, e in self._tiles()]
            return torch.cat([p[0] for p in pairs], -1), torch.cat([p[1] for p in pairs], -1)
        # reduce over rows tile by tile and combine the partial pairs exactly
        pairs = [logsumexp_pair((hw[..., s:e].unsqueeze(-1) - self._rows(s, e)) / eps, -2) for s, e in self._tiles()]
        return entrokit.geometry.combine_lse(pairs)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None):
        self._count("plan_reduce")
        rows, cols, tc = [], 0.0, 0.0
        for s, e in self._tiles():
            C = self._rows(s, e)
            P = plan_block(f[..., s:e], g, a[..., s:e], b, C, eps)
            if accumulate is not None:
                P, C = P.to(accumulate), C.to(accumulate)
            rows.append(P.sum(-1))
            cols = cols + P.sum(-2)
            tc = tc + (P * C).sum((-2, -1))
        return torch.cat(rows, -1), cols, tc

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        self._count("plan_matvec")
        P = plan_block(f, g, a, b, self.cost_matrix(), eps)
        if axis == 1:
            return (P @ vec.unsqueeze(-1)).squeeze(-1)
        return (vec.unsqueeze(-2) @ P).squeeze(-2)


def _problem(seed=0, batch=()):
    gen = torch.Generator().manual_seed(seed)
    U = torch.rand(*batch, 7, 2, generator=gen, dtype=D)
    V = torch.rand(*batch, 5, 2, generator=gen, dtype=D)
    a = torch.rand(*batch, 7, generator=gen, dtype=D) + 0.1
    b = torch.rand(*batch, 5, generator=gen, dtype=D) + 0.1
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), U, V


GEOMETRIES = [LowRankCost, CostOnly]


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
@pytest.mark.parametrize("Geom", GEOMETRIES)
def test_sinkhorn_on_test_geometry_matches_dense(Geom, batch):
    a, b, U, V = _problem(batch=batch)
    geom = Geom(U, V)
    res = entrokit.sinkhorn(a, b, geom, eps=0.05, tol=1e-10)
    ref = entrokit.sinkhorn(a, b, U @ V.transpose(-1, -2), eps=0.05, tol=1e-10)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.value, ref.value)
    torch.testing.assert_close(res.f, ref.f, atol=1e-8, rtol=0)
    if Geom is LowRankCost:
        # the solver reached the cost only through the primitives; never the dense matrix
        assert geom.calls["lse"] > 0 and geom.calls["plan_reduce"] > 0
    assert res.plan.shape == (*batch, 7, 5)


@pytest.mark.parametrize("Geom", GEOMETRIES)
def test_gradients_on_test_geometry_match_dense(Geom):
    a, b, U, V = _problem(seed=1)
    U1, U2 = U.clone().requires_grad_(True), U.clone().requires_grad_(True)
    res = entrokit.sinkhorn(a, b, Geom(U1, V), eps=0.1, tol=1e-12)
    ref = entrokit.sinkhorn(a, b, U2 @ V.T, eps=0.1, tol=1e-12)
    for out in ("transport_cost", "value"):
        (g1,) = torch.autograd.grad(getattr(res, out), U1, retain_graph=True)
        (g2,) = torch.autograd.grad(getattr(ref, out), U2, retain_graph=True)
        torch.testing.assert_close(g1, g2, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
@pytest.mark.parametrize("Geom", GEOMETRIES)
def test_gradcheck_on_test_geometry(Geom, grad):
    a, b, U, V = _problem(seed=2)
    U = U.clone().requires_grad_(True)

    def fn(U):
        res = entrokit.sinkhorn(a, b, Geom(U, V), eps=0.2, tol=1e-13, max_iter=100000, grad=grad)
        return res.transport_cost, res.f

    assert torch.autograd.gradcheck(fn, (U,), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("Geom", GEOMETRIES)
def test_warm_start_on_test_geometry(Geom):
    a, b, U, V = _problem(seed=3)
    geom = Geom(U, V)
    res = entrokit.sinkhorn(a, b, geom, eps=0.05, tol=1e-9, check_every=1)
    again = entrokit.sinkhorn(a, b, geom, eps=0.05, tol=1e-9, init=res, check_every=1)
    assert int(again.n_iter) <= 2 < int(res.n_iter) and bool(again.converged)
    # a point cloud takes a warm start too (its soft-min has no workspace argument)
    pc = entrokit.PointCloud(U, V)
    r1 = entrokit.sinkhorn(a, b, pc, eps=0.05, tol=1e-9)
    r2 = entrokit.sinkhorn(a, b, pc, eps=0.05, tol=1e-9, init=(r1.f, r1.g), lse_mode=True)
    assert bool(r2.converged)


@pytest.mark.parametrize("method", ["ssns", "sns", "smooth", "auto"])
@pytest.mark.parametrize("Geom", GEOMETRIES)
def test_every_method_runs_on_test_geometry(Geom, method):
    a, b, U, V = _problem(seed=4)
    res = entrokit.solve(a, b, Geom(U, V), eps=0.05, method=method, tol=1e-8)
    ref = entrokit.solve(a, b, U @ V.T, eps=0.05, method=method, tol=1e-8)
    assert bool(res.converged) and res.method == ref.method
    P, Q = (r.plan.to_dense() if r.plan.is_sparse else r.plan for r in (res, ref))
    torch.testing.assert_close(P, Q, atol=1e-7, rtol=0)


class LowRankPoints(LowRankCost):
    """The same cost as a geometry of two point sets: it can build its self-costs."""

    def reshape_batch(self, batch_shape):
        return LowRankPoints(*LowRankCost.reshape_batch(self, batch_shape).tensors(), self.calls, self.tile)

    def detach(self):
        return LowRankPoints(self.U.detach(), self.V.detach(), self.calls, self.tile)

    def rebuild(self, U, V):
        return LowRankPoints(U, V, self.calls, self.tile)

    def self_geometries(self):
        return LowRankPoints(self.U, self.U, self.calls, self.tile), LowRankPoints(self.V, self.V, self.calls, self.tile)


def test_divergence_and_its_gradient_on_test_geometry():
    a, b, U, V = _problem(seed=5)
    U1, U2 = U.clone().requires_grad_(True), U.clone().requires_grad_(True)
    geom = LowRankPoints(U1, V)
    s = entrokit.sinkhorn_divergence(geom, a=a, b=b, eps=0.1, tol=1e-12)
    dense = (entrokit.DenseCost(U2 @ V.T), entrokit.DenseCost(U2 @ U2.T), entrokit.DenseCost(V @ V.T))
    ref = entrokit.sinkhorn_divergence(dense, a=a, b=b, eps=0.1, tol=1e-12)
    torch.testing.assert_close(s, ref, atol=1e-11, rtol=0)
    (g1,) = torch.autograd.grad(s, U1)
    (g2,) = torch.autograd.grad(ref, U2)
    torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-7)
    # the divergence reached the cost through the primitives only (this geometry's own
    # cost_bounds is its only materialisation)
    assert geom.calls["lse"] > 0 and geom.calls["cost_matrix"] == geom.calls["cost_bounds"]


def test_divergence_on_geometries_that_implement_only_their_cost():
    a, b, U, V = _problem(seed=6)
    U1, U2 = U.clone().requires_grad_(True), U.clone().requires_grad_(True)
    s = entrokit.sinkhorn_divergence((CostOnly(U1, V), CostOnly(U1, U1), CostOnly(V, V)), a=a, b=b, eps=0.1, tol=1e-12)
    dense = (entrokit.DenseCost(U2 @ V.T), entrokit.DenseCost(U2 @ U2.T), entrokit.DenseCost(V @ V.T))
    ref = entrokit.sinkhorn_divergence(dense, a=a, b=b, eps=0.1, tol=1e-12)
    torch.testing.assert_close(s, ref, atol=1e-11, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(s, U1)[0], torch.autograd.grad(ref, U2)[0], atol=1e-9, rtol=1e-7)


def test_a_geometry_without_its_cost_says_what_is_missing():
    class Nothing(Geometry):
        pass

    with pytest.raises(NotImplementedError, match="Nothing must implement cost_matrix"):
        entrokit.sinkhorn(None, None, Nothing(), 0.1)
