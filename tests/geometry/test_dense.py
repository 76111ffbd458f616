"""The materialised cost's plan products: ``P v``, ``P^T u`` and their several-vector forms
against an independent elementwise sum, with gradients."""

import pytest
import torch

from entrokit import DenseCost
from entrokit.geometry.dense import _apply

F64 = torch.float64


@pytest.mark.parametrize("k", [None, 3], ids=["one-vector", "three-vectors"])
@pytest.mark.parametrize("axis", [1, 0])
def test_plan_products_equal_the_elementwise_sums(axis, k):
    g = torch.Generator().manual_seed(0)
    P = torch.rand(4, 7, 5, generator=g, dtype=F64, requires_grad=True)
    vec = torch.randn(4, 5 if axis == 1 else 7, *(() if k is None else (k,)), generator=g, dtype=F64,
                      requires_grad=True)
    V = vec if k else vec.unsqueeze(-1)
    # (P V)_ik = sum_j P_ij V_jk, (P^T U)_jk = sum_i P_ij U_ik, as broadcast sums
    want = ((P.unsqueeze(-1) * V.unsqueeze(-3)).sum(-2) if axis == 1
            else (P.unsqueeze(-1) * V.unsqueeze(-2)).sum(-3))
    want = want if k else want.squeeze(-1)
    got = _apply(P, vec, axis)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(lambda P, v: _apply(P, v, axis), (P, vec))


def test_dense_plan_matvec_is_the_plan_times_the_vector():
    g = torch.Generator().manual_seed(1)
    C = torch.rand(2, 6, 4, generator=g, dtype=F64)
    f, h = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)
    a, b = torch.rand(2, 6, generator=g, dtype=F64), torch.rand(2, 4, generator=g, dtype=F64)
    geom = DenseCost(C)
    P = a.unsqueeze(-1) * b.unsqueeze(-2) * torch.exp((f.unsqueeze(-1) + h.unsqueeze(-2) - C) / 0.3)
    v, u = torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, 6, generator=g, dtype=F64)
    torch.testing.assert_close(geom.plan_matvec(f, h, a, b, 0.3, v, 1), (P * v.unsqueeze(-2)).sum(-1),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(geom.plan_matvec(f, h, a, b, 0.3, u, 0), (P * u.unsqueeze(-1)).sum(-2),
                               rtol=1e-12, atol=1e-12)


def test_kernel_loop_numpy_and_torch_paths_agree_and_solves_do_not_share_state(monkeypatch):
    import entrokit
    import entrokit.geometry.dense as dense

    gen = torch.Generator().manual_seed(5)
    C1, C2 = (torch.rand(60, 50, generator=gen, dtype=torch.float64) for _ in range(2))
    a, b = torch.full((60,), 1 / 60, dtype=torch.float64), torch.full((50,), 1 / 50, dtype=torch.float64)
    first = entrokit.sinkhorn(a, b, C1, 0.05, tol=1e-9)
    entrokit.sinkhorn(a, b, C2, 0.02, tol=1e-9)  # its kernel buffer is the next solve's
    again = entrokit.sinkhorn(a, b, C1, 0.05, tol=1e-9)
    assert torch.equal(first.f, again.f) and torch.equal(first.g, again.g)
    monkeypatch.setattr(dense, "_NUMPY_MAX", 0)  # the torch mat-vecs
    ref = entrokit.sinkhorn(a, b, C1, 0.05, tol=1e-9)
    assert int(ref.n_iter) == int(first.n_iter) and bool(ref.converged)
    torch.testing.assert_close(ref.f, first.f, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.transport_cost, first.transport_cost, rtol=1e-13, atol=0)
    # the certified transport cost is <C, P> of the returned plan
    torch.testing.assert_close(first.transport_cost, (first.plan * C1).sum(), rtol=1e-12, atol=0)

