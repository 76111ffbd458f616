"""LogitCost: the attention layers' geometry equals the dense cost C = -eps0 * L."""

import pytest
import torch

import entrokit
from entrokit.geometry import DenseCost, LogitCost

D = torch.float64


def _logits(seed=0, forbidden=True):
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(2, 5, 4, generator=gen, dtype=D)
    if forbidden:
        L[0, 1, 2] = -float("inf")  # a forbidden pair: C = +inf, P = 0
    a = torch.rand(2, 5, generator=gen, dtype=D) + 0.1
    b = torch.rand(2, 4, generator=gen, dtype=D) + 0.1
    a[1, 0] = 0.0
    return L, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("eps", [0.5, 0.2])  # at the logits' temperature and below it
def test_reductions_equal_the_dense_cost(eps):
    L, a, b = _logits()
    logit, dense = LogitCost(L, 0.5), DenseCost(-0.5 * L)
    gen = torch.Generator().manual_seed(1)
    f, g = torch.randn(2, 5, generator=gen, dtype=D), torch.randn(2, 4, generator=gen, dtype=D)
    for axis, h, w in ((1, g, b), (0, f, a)):
        log_w = entrokit.geometry.base.log_weights(w)
        torch.testing.assert_close(logit.softmin(h, log_w, eps, axis), dense.softmin(h, log_w, eps, axis))
    P = logit.plan(f, g, a, b, eps)
    assert P[0, 1, 2] == 0  # exactly (DenseCost floors the exponent instead)
    torch.testing.assert_close(P, dense.plan(f, g, a, b, eps), rtol=1e-12, atol=1e-250)
    rows, cols, tc = logit.plan_reduce(f, g, a, b, eps)
    torch.testing.assert_close((rows, cols), (P.sum(-1), P.sum(-2)))
    # <C, P> over the allowed pairs (the forbidden one has P = 0 and C = +inf)
    torch.testing.assert_close(tc, torch.where(P > 0, P * dense.C, 0.0).sum((-2, -1)))


def test_sinkhorn_on_logits_equals_sinkhorn_on_the_cost():
    L, a, b = _logits(2, forbidden=False)
    ref = entrokit.sinkhorn(a, b, -0.5 * L, 0.5, tol=1e-12)
    res = entrokit.sinkhorn(a, b, LogitCost(L, 0.5), 0.5, tol=1e-12)
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.transport_cost, ref.transport_cost)


def test_the_former_import_path_still_works():
    from entrokit.nn.attention import LogitCost as FromAttention

    assert FromAttention is LogitCost


@pytest.mark.parametrize("axis", [1, 0])
def test_softmin_is_the_log_sum_exp_with_its_gradient(axis):
    """The soft-min against torch.logsumexp: values (an all-forbidden slice gives +inf), the
    inputs untouched, and float64 gradcheck through the saved exponentials."""
    L, a, b = _logits()
    L[1, :, 3] = -float("inf")  # column 3 of problem 1 is forbidden everywhere
    L[1, 4, :] = -float("inf")  # and row 4
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 4 if axis == 1 else 5, generator=gen, dtype=D)
    w = b if axis == 1 else a
    log_w = entrokit.geometry.base.log_weights(w)
    dim = -1 if axis == 1 else -2
    z = L + (h / 0.5 + log_w).unsqueeze(-2 if axis == 1 else -1)
    ref = -0.5 * torch.logsumexp(z, dim)
    L0 = L.clone()
    out = LogitCost(L, 0.5).softmin(h, log_w, 0.5, axis)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=0)
    assert bool(torch.equal(L, L0))  # the in-place exponentials work on a temporary
    assert bool(torch.isinf(out[1, 3 if axis == 0 else 4])) and float(out[1, 3 if axis == 0 else 4]) > 0
    # gradients (one forbidden pair; an all-forbidden slice has no gradient, as with torch.logsumexp)
    L, _, _ = _logits()
    Lg, hg = L.clone().requires_grad_(), h.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda L_, h_: LogitCost(L_, 0.5).softmin(h_, log_w, 0.5, axis), (Lg, hg))
    (LogitCost(Lg, 0.5).softmin(hg, log_w, 0.5, axis) ** 2).sum().backward()
    assert float(Lg.grad[0, 1, 2]) == 0.0 and bool(torch.isfinite(Lg.grad).all())
