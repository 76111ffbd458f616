"""The regularizers of smooth OT: Fenchel-Young conjugates, their gradients, the simplex projections."""

import itertools
import math

import pytest
import torch

from entrokit import InputError
from entrokit.solvers.omega import (
    Entropy,
    SquaredL2,
    TopKSquaredL2,
    make_regularizer,
    sparse_simplex_projection,
)

D = torch.float64
REGS = [Entropy(0.3), SquaredL2(0.3), TopKSquaredL2(0.3, 2)]


@pytest.mark.parametrize("reg", REGS, ids=lambda r: r.name)
def test_fenchel_young_delta(reg):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(20, 6, generator=g, dtype=D)
    val, t = reg.delta(s)
    # equality at t = grad delta(s): Omega(t) + delta(s) = <s, t>
    torch.testing.assert_close(reg.omega(t) + val, (s * t).sum(-1), atol=1e-12, rtol=1e-10)
    # inequality at any feasible y >= 0 (k-sparse for top-k)
    for _ in range(5):
        y = torch.rand(20, 6, generator=g, dtype=D)
        if reg.name == "topk":
            y = y * (torch.rand(20, 6, generator=g, dtype=D) < 0.3)
        assert bool((reg.omega(y) + val >= (s * y).sum(-1) - 1e-12).all())


@pytest.mark.parametrize("reg", REGS, ids=lambda r: r.name)
def test_fenchel_young_max(reg):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(20, 6, generator=g, dtype=D)
    b = torch.rand(20, generator=g, dtype=D) + 0.1
    val, t, beta = reg.max_omega(s, b)
    torch.testing.assert_close(t.sum(-1), b)
    assert bool((t >= 0).all())
    torch.testing.assert_close(reg.omega(t) + val, (s * t).sum(-1), atol=1e-12, rtol=1e-10)
    for _ in range(5):
        y = torch.rand(20, 6, generator=g, dtype=D)
        if reg.name == "topk":
            y = y * (torch.arange(6) < 2)  # a 2-sparse point
        y = y / y.sum(-1, keepdim=True) * b.unsqueeze(-1)
        assert bool((reg.omega(y) + val >= (s * y).sum(-1) - 1e-12).all())
    # the multiplier beta turns the semi-dual column into a dual one: t = grad delta(s + beta)
    _, t2 = reg.delta(s + beta.unsqueeze(-1))
    torch.testing.assert_close(t2, t, atol=1e-10, rtol=1e-8)


def test_topk_delta_brute_force():
    """delta_k(s) = max over supports |S| <= k of the quadratic delta on S."""
    g = torch.Generator().manual_seed(3)
    gamma, k, n = 0.7, 2, 5
    reg = TopKSquaredL2(gamma, k)
    s = torch.randn(30, n, generator=g, dtype=D)
    val, t = reg.delta(s)
    best = torch.zeros(30, dtype=D)
    for S in itertools.combinations(range(n), k):
        sub = s[:, list(S)].clamp_min(0)
        best = torch.maximum(best, (sub * sub).sum(-1) / (2 * gamma))
    torch.testing.assert_close(val, best)
    assert int((t > 0).sum(-1).max()) <= k


def test_sparse_simplex_projection_brute_force():
    g = torch.Generator().manual_seed(4)
    n, k = 6, 3
    u = torch.randn(40, n, generator=g, dtype=D) * 2
    p, _, _, _ = sparse_simplex_projection(u, k)
    assert int((p > 0).sum(-1).max()) <= k
    torch.testing.assert_close(p.sum(-1), torch.ones(40, dtype=D))
    best = torch.full((40,), math.inf, dtype=D)
    for S in itertools.combinations(range(n), k):
        q, _, _, _ = sparse_simplex_projection(u[:, list(S)], None)
        best = torch.minimum(best, ((q - u[:, list(S)]) ** 2).sum(-1) + (u ** 2).sum(-1) - (u[:, list(S)] ** 2).sum(-1))
    torch.testing.assert_close(((p - u) ** 2).sum(-1), best)
    # plain projection (adaptive window) equals the full sort-based one
    q, _, _, _ = sparse_simplex_projection(u, None, k_start=1)
    q_full, _, _, _ = sparse_simplex_projection(u, n)
    torch.testing.assert_close(q, q_full)


@pytest.mark.parametrize("reg", REGS, ids=lambda r: r.name)
def test_conjugate_gradients_finite_differences(reg):
    """The returned columns are the gradients of the values; values are Danskin-differentiable."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 6, generator=g, dtype=D, requires_grad=True)
    b = (torch.rand(4, generator=g, dtype=D) + 0.2).requires_grad_()
    val, t, _ = reg.max_omega(s, b)
    gs, gb = torch.autograd.grad(val.sum(), (s, b))
    torch.testing.assert_close(gs, t)
    h = 1e-6
    v = torch.randn(4, 6, generator=g, dtype=D)
    with torch.no_grad():
        fd = (reg.max_omega(s + h * v, b)[0] - reg.max_omega(s - h * v, b)[0]) / (2 * h)
        fdb = (reg.max_omega(s, b + h)[0] - reg.max_omega(s, b - h)[0]) / (2 * h)
    torch.testing.assert_close((gs * v).sum(-1), fd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gb, fdb, atol=1e-6, rtol=1e-5)
    val_d, t_d = reg.delta(s)
    (gd,) = torch.autograd.grad(val_d.sum(), s)
    torch.testing.assert_close(gd, t_d)


def test_a_regularizer_object_and_a_k_are_refused_together():
    with pytest.raises(InputError, match="k is given twice"):
        make_regularizer(SquaredL2(0.1), 0.1, k=2)
