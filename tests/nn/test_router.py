"""OT mixture-of-experts router."""

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit.nn import SparseOTRouter, sparse_ot_route


@pytest.mark.parametrize("capacity", [1, 2, 5, 40])
@pytest.mark.parametrize("mode", ["experts_choose", "tokens_choose"])
def test_capacity_never_exceeded(capacity, mode):
    g = torch.Generator().manual_seed(capacity)
    logits = torch.randn(3, 32, 4, generator=g) * 3
    logits[0, :, 0] += 10.0  # every token prefers expert 0
    out = sparse_ot_route(logits, capacity, mode=mode)
    axis = -2 if mode == "experts_choose" else -1
    assert int(out.dispatch.sum(axis).max()) <= capacity
    m = out.metrics
    if mode == "experts_choose":
        assert m["tokens_per_expert"]["max"] <= capacity
    else:
        assert m["experts_per_token"]["max"] <= capacity
    assert m["dropped_tokens"] == int((out.dispatch.sum(-1) == 0).sum())
    assert bool((out.combine[~out.dispatch] == 0).all())
    # the plan's load per expert is exact (semi-dual on the expert axis)
    if mode == "experts_choose":
        torch.testing.assert_close(out.plan.sum(-2), torch.full((3, 4), 8.0), atol=1e-4, rtol=0)


def test_load_is_balanced_against_skewed_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g)
    logits[:, 0] += 4.0
    out = sparse_ot_route(logits, capacity=10)
    top1 = torch.bincount(logits.argmax(-1), minlength=8)
    assert int(top1.max()) > 30  # softmax top-1 would overload expert 0
    assert out.metrics["tokens_per_expert"]["max"] <= 10


def test_gradient_reaches_logits_through_combine():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = SparseOTRouter(num_experts=4, capacity=6)(logits)
    (out.combine * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # gradient equals the softmax-gate gradient on the dispatched pairs
    lg = logits.detach().clone().requires_grad_()
    (torch.softmax(lg, -1) * out.dispatch * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(logits.grad, lg.grad)


def test_module_and_lazy_subpackage():
    r = entrokit.nn.SparseOTRouter(4, 3, gamma=0.5, n_steps=5)
    assert "capacity=3" in repr(r)
    out = r(torch.randn(10, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert out.dispatch.shape == (10, 4) and out.combine.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(capacity=0), InputError, "capacity must be an int >= 1"),
        (dict(capacity=2, gamma=0.0), InputError, "gamma must be"),
        (dict(capacity=2, n_steps=0), InputError, "n_steps must be"),
        (dict(capacity=2, mode="random"), InputError, "mode must be one of"),
        (dict(capacity=1.5), TypeError, "capacity must be an int"),
    ],
)
def test_bad_router_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sparse_ot_route(torch.randn(8, 4), **kwargs)


def test_bad_logits():
    with pytest.raises(InputError, match="num_experts=4"):
        SparseOTRouter(4, 2)(torch.randn(8, 5))
    with pytest.raises(InputError, match="shape"):
        sparse_ot_route(torch.randn(8), 2)
    with pytest.raises(TypeError, match="floating"):
        sparse_ot_route(torch.ones(8, 4, dtype=torch.long), 2)
    with pytest.raises(InputError, match="NaN"):
        sparse_ot_route(torch.full((8, 4), float("nan")), 2)


@pytest.mark.parametrize("mode,capacity", [("experts_choose", 16), ("tokens_choose", 2)])
def test_marginal_errors_are_fractions_of_the_mass(mode, capacity):
    """metrics['marginal_error'] read 6.51 on a healthy call: an absolute L1 error on a plan
    of total mass G. It is now the unit-mass measure of the solvers, split per side, with
    the capacity-constrained side exact."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 8, generator=g, dtype=torch.float64)
    out = sparse_ot_route(z, capacity, mode=mode)
    P, G, E = out.plan, 64, 8
    rows = float((P.sum(-1) - 1.0).abs().sum()) / G
    cols = float((P.sum(-2) - G / E).abs().sum()) / G
    m = out.metrics
    assert m["token_mass_error"] == pytest.approx(rows, rel=1e-12)
    assert m["expert_load_error"] == pytest.approx(cols, rel=1e-12)
    assert m["marginal_error"] == pytest.approx(rows + cols, rel=1e-12)
    exact = m["expert_load_error"] if mode == "experts_choose" else m["token_mass_error"]
    assert exact < 1e-12
    assert 0.0 < m["marginal_error"] <= 2.0


def test_bfloat16_logits_under_autocast_route_as_float32():
    # what an MoE layer trained under autocast hands the router
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 32, 4, generator=g) * 2).bfloat16().requires_grad_(True)
    ref = sparse_ot_route(logits.detach().float(), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SparseOTRouter(num_experts=4, capacity=8)(logits)
    assert out.combine.dtype == out.plan.dtype == out.gates.dtype == torch.bfloat16
    assert torch.equal(out.dispatch, ref.dispatch)  # the same float32 routing
    assert torch.equal(out.combine, ref.combine.bfloat16())
    assert torch.equal(out.plan, ref.plan.bfloat16())
    out.combine.float().pow(2).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    for dtype in (torch.float16, torch.bfloat16):  # without autocast too
        assert sparse_ot_route(logits.detach().to(dtype), 8).combine.dtype == dtype


def test_module_options_are_checked_when_set_and_used_as_set():
    r = SparseOTRouter(4, 1, n_steps=5)
    with pytest.raises(InputError, match="gamma must be a finite number > 0, got -1.0"):
        r.gamma = -1.0
    assert r.gamma == 1.0  # a refused assignment keeps the old value
    with pytest.raises(TypeError, match="use_softmax_combine must be True or False, got int 1"):
        r.use_softmax_combine = 1
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r.capacity = 3
    r.mode = "tokens_choose"
    ref = sparse_ot_route(logits, 3, n_steps=5, mode="tokens_choose")
    out = r(logits)
    assert torch.equal(out.dispatch, ref.dispatch) and int(out.dispatch.sum(-1).max()) <= 3
    torch.testing.assert_close(out.combine, ref.combine)
