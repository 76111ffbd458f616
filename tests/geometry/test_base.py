"""Shared geometry helpers (geometry/base.py)."""

from __future__ import annotations

import math

import pytest
import torch

from entrokit.geometry import plan_block

D = torch.float64


def _inputs(seed=0, B=2, n=5, m=4):
    g = torch.Generator().manual_seed(seed)
    f, gg = torch.randn(B, n, generator=g, dtype=D), torch.randn(B, m, generator=g, dtype=D)
    a, b = torch.rand(B, n, generator=g, dtype=D), torch.rand(B, m, generator=g, dtype=D)
    C = torch.rand(B, n, m, generator=g, dtype=D)
    return f, gg, a, b, C


def _reference(f, g, a, b, C, eps):
    S = (f.double().unsqueeze(-1) + g.double().unsqueeze(-2) - C.double()) / eps
    return torch.exp(S) * a.double().unsqueeze(-1) * b.double().unsqueeze(-2)


def test_plan_block_in_place_path_equals_the_graph_path():
    f, g, a, b, C = _inputs()
    eps = 0.3
    with torch.no_grad():
        fast = plan_block(f, g, a, b, C, eps)  # no graph: one buffer updated in place
    fg = f.clone().requires_grad_(True)
    slow = plan_block(fg, g, a, b, C, eps)
    assert slow.requires_grad and not fast.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=1e-14, atol=0)
    assert torch.allclose(fast, _reference(f, g, a, b, C, eps), rtol=1e-13, atol=0)
    # the inputs are not touched by the in-place path
    assert torch.equal(C, _inputs()[4]) and torch.equal(f, _inputs()[0])


def test_plan_block_broadcasts_and_promotes_without_graph():
    f, g, a, b, C = _inputs(1)
    eps = 0.5
    # potentials of one problem against a batch of costs, float32 cost with float64 potentials
    C32 = C.float()
    P = plan_block(f[0], g[0], a[0], b[0], C32, eps)
    assert P.shape == (2, 5, 4) and P.dtype == D
    assert torch.allclose(P, _reference(f[0], g[0], a[0], b[0], C32, eps), rtol=1e-13, atol=0)
    # zero weights give exact zeros, whatever the exponent
    a0 = a.clone()
    a0[:, 0] = 0.0
    P = plan_block(f + 1e3, g, a0, b, C, eps)
    assert (P[:, 0] == 0).all() and torch.isfinite(P).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_pair_in_base_two_is_the_natural_pair(dtype):
    from entrokit.geometry.base import logsumexp_pair

    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(7, 40, generator=gen, dtype=torch.float64) * 30).to(dtype)
    z[3] = -float("inf")  # an empty slice: M = -inf, S = 0 in both bases
    z[4, :5] = -float("inf")
    ref = torch.logsumexp(z.double(), dim=-1)
    for dim, zz in ((-1, z), (-2, z.t().contiguous())):
        m2, s2 = logsumexp_pair(zz / math.log(2.0), dim, overwrite=True, base2=True)
        m, s = logsumexp_pair(zz.clone(), dim)
        assert torch.equal(m2 == -float("inf"), ref == -float("inf")) and float(s2[3]) == 0.0
        ok = ref > -float("inf")
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close((m2 + s2.log()).double()[ok], ref[ok], rtol=tol, atol=tol)
        torch.testing.assert_close((m2 + s2.log())[ok], (m + s.log())[ok], rtol=tol, atol=tol)
