"""Gradients: envelope, implicit and unrolled modes against gradcheck and each other."""

import warnings

import pytest
import torch

import entrokit
from entrokit import PointCloud
from generators import random_problem

EPS = 0.2
KW = dict(tol=1e-13, max_iter=100_000)


def _value_of_cost(grad, out="value"):
    def fn(C, a, b):
        res = entrokit.sinkhorn(a, b, C, EPS, grad=grad, **KW)
        return getattr(res, out)

    return fn


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unroll"])
def test_gradcheck_value_wrt_cost(grad):
    a, b, C = random_problem(4, 5, seed=0)
    C.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda C: _value_of_cost(grad)(C, a, b), (C,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
@pytest.mark.parametrize("out", ["transport_cost", "plan"])
def test_gradcheck_primal_outputs_wrt_cost(grad, out):
    a, b, C = random_problem(4, 5, seed=1, zeros=(out == "plan"))
    C.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda C: _value_of_cost(grad, out)(C, a, b), (C,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unroll"])
def test_gradcheck_value_wrt_weights(grad):
    # weights parametrised on the simplex so that finite differences stay balanced
    _, _, C = random_problem(4, 3, seed=2)
    th = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ph = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(th, ph):
        return entrokit.sinkhorn(th.softmax(0), ph.softmax(0), C, EPS, grad=grad, **KW).value

    assert torch.autograd.gradcheck(fn, (th, ph), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_gradcheck_transport_cost_wrt_weights(grad):
    _, _, C = random_problem(3, 4, seed=3)
    th = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ph = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(th, ph):
        return entrokit.sinkhorn(th.softmax(0), ph.softmax(0), C, EPS, grad=grad, **KW).transport_cost

    assert torch.autograd.gradcheck(fn, (th, ph), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["envelope", "implicit", "unroll"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_wrt_points(grad, chunk):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.full((3,), 1 / 3, dtype=torch.float64)
    b = torch.full((4,), 0.25, dtype=torch.float64)

    def fn(x, y):
        geom = PointCloud(x, y, chunk_size=chunk)
        return entrokit.sinkhorn(a, b, geom, 1.0, grad=grad, tol=1e-12, max_iter=10_000).value

    # fast mode checks random projections of the Jacobian (chunked runs are Python-bound)
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6, fast_mode=chunk is not None)


def test_envelope_gradient_is_plan_and_potentials():
    a, b, C = random_problem(6, 7, seed=5)
    C.requires_grad_(True)
    a = a.clone().requires_grad_(True)
    res = entrokit.sinkhorn(a, b, C, EPS, **KW)
    gC, ga = torch.autograd.grad(res.value, (C, a))
    torch.testing.assert_close(gC, res.plan)
    # d value / d a = f (unit masses), up to the gauge constant
    torch.testing.assert_close(ga - ga.mean(), res.f - res.f.mean())


def test_modes_agree_on_value_gradient_and_implicit_matches_unroll():
    a, b, C = random_problem(8, 6, seed=6)
    grads = {}
    for mode in ["envelope", "implicit", "unroll"]:
        Cm = C.clone().requires_grad_(True)
        res = entrokit.sinkhorn(a, b, Cm, 0.05, grad=mode, **KW)
        grads[mode] = torch.autograd.grad(res.value, Cm)[0]
        if mode != "envelope":
            Cm2 = C.clone().requires_grad_(True)
            res2 = entrokit.sinkhorn(a, b, Cm2, 0.05, grad=mode, **KW)
            grads[mode + "_tc"] = torch.autograd.grad(res2.transport_cost, Cm2)[0]
    torch.testing.assert_close(grads["envelope"], grads["implicit"])
    torch.testing.assert_close(grads["envelope"], grads["unroll"])
    torch.testing.assert_close(grads["implicit_tc"], grads["unroll_tc"], atol=1e-7, rtol=1e-6)


def test_finite_difference_along_random_direction():
    a, b, C = random_problem(10, 9, seed=7)
    D = torch.randn(10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    D /= D.norm()
    Cm = C.clone().requires_grad_(True)
    tc = entrokit.sinkhorn(a, b, Cm, 0.1, grad="implicit", **KW).transport_cost
    (g,) = torch.autograd.grad(tc, Cm)
    h = 1e-5
    fd = (
        entrokit.sinkhorn(a, b, C + h * D, 0.1, **KW).transport_cost
        - entrokit.sinkhorn(a, b, C - h * D, 0.1, **KW).transport_cost
    ) / (2 * h)
    torch.testing.assert_close((g * D).sum(), fd, atol=1e-7, rtol=1e-5)


def test_batched_gradients_match_looped():
    a, b, C = random_problem(5, 6, seed=8, batch=3)
    Cb = C.clone().requires_grad_(True)
    res = entrokit.sinkhorn(a, b, Cb, 0.1, grad="implicit", **KW)
    (gb,) = torch.autograd.grad(res.transport_cost.sum(), Cb)
    for i in range(3):
        Ci = C[i].clone().requires_grad_(True)
        ri = entrokit.sinkhorn(a[i], b[i], Ci, 0.1, grad="implicit", **KW)
        (gi,) = torch.autograd.grad(ri.transport_cost, Ci)
        torch.testing.assert_close(gb[i], gi)


def test_envelope_detaches_potentials_and_plan():
    a, b, C = random_problem(5, 5, seed=9)
    C.requires_grad_(True)
    res = entrokit.sinkhorn(a, b, C, 0.1, grad="envelope")
    assert res.value.requires_grad
    assert not res.f.requires_grad and not res.plan.requires_grad


def test_zero_weight_gradients_are_finite():
    a, b, C = random_problem(6, 6, seed=10, zeros=True)
    C.requires_grad_(True)
    ar = a.clone().requires_grad_(True)
    res = entrokit.sinkhorn(ar, b, C, 0.1, grad="implicit", **KW)
    gC, ga = torch.autograd.grad(res.transport_cost, (C, ar))
    assert torch.isfinite(gC).all() and torch.isfinite(ga).all()
    assert (gC[0] == 0).all()  # rows of zero weight carry no plan mass


def test_float32_implicit_gradient_matches_float64_online():
    """The adjoint CG stops at a tolerance float32 plan products can resolve: asking for
    1e-12 broke down on rounding noise and returned gradients 1% off on this seed."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(200, 3, generator=gen, dtype=torch.float64)
    a, b = torch.full((300,), 1 / 300, dtype=torch.float64), torch.full((200,), 1 / 200, dtype=torch.float64)
    grads = []
    for dtype, online, tol in ((torch.float64, False, 1e-10), (torch.float32, True, 1e-5)):
        xs = x.to(dtype).requires_grad_()
        res = entrokit.sinkhorn(a.to(dtype), b.to(dtype), entrokit.PointCloud(xs, y.to(dtype), online=online), 0.05,
                                tol=tol)
        grads.append(torch.autograd.grad(res.transport_cost, xs)[0].double())
    assert float((grads[1] - grads[0]).abs().max() / grads[0].abs().max()) < 1e-3


def test_unroll_emits_no_warning():
    """The stopping test reads the marginal error on the host; under grad="unroll" that
    error used to carry the graph and torch warned about converting it to a scalar."""
    a, b, C = random_problem(6, 5, seed=11)
    C.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = entrokit.sinkhorn(a, b, C, 0.1, grad="unroll", tol=1e-10, callback=lambda it, err: None)
        res.transport_cost.backward()
    assert bool(res.converged) and torch.isfinite(C.grad).all()
    assert not res.errors.requires_grad
