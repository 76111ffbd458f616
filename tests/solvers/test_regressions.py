"""One test per reproducer of a wrong answer or an unhelpful failure."""

import warnings

import numpy as np
import pytest
import torch

import entrokit
from entrokit import InputError

D = torch.float64


def _plan_error(res, a, b):
    P = res.plan.detach().to(D)
    return float((P.sum(-1) - a.to(D)).abs().sum() + (P.sum(-2) - b.to(D)).abs().sum())


def test_float32_sinkhorn_at_huge_cost_over_eps_is_not_called_converged():
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(40, 30, generator=gen, dtype=D) * 1e6
    a, b = torch.full((40,), 1 / 40, dtype=D), torch.full((30,), 1 / 30, dtype=D)
    # the kernel engine absorbs in float64, so its float32 plan really meets the marginals
    res = entrokit.sinkhorn(a.float(), b.float(), C.float(), eps=1e-2, tol=1e-6)
    err = _plan_error(res, a, b)
    assert bool(res.converged) and err <= 1e-6
    assert abs(float(res.marginal_error) - err) <= 1e-6  # the reported error is the plan's
    # float32 log-domain potentials cannot: an honest verdict and the remedy
    with pytest.warns(entrokit.ConvergenceWarning, match="float64"):
        res = entrokit.sinkhorn(a.float(), b.float(), C.float(), eps=1e-2, tol=1e-6, lse_mode=True)
    err = _plan_error(res, a, b)
    assert not bool(res.converged) and err > 1e-6
    assert abs(float(res.marginal_error) - err) <= 1e-6 * max(1.0, err)


@pytest.mark.parametrize("method", ["sinkhorn", "auto"])
def test_two_by_two_small_eps_transport_cost(method):
    a = torch.tensor([0.5, 0.5], dtype=D)
    C = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D)
    res = entrokit.solve(a, a, C, eps=1e-3, method=method)
    assert bool(res.converged)
    torch.testing.assert_close(res.transport_cost, torch.tensor(0.5, dtype=D), atol=1e-6, rtol=0)
    assert _plan_error(res, a, a) <= 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 4)])
def test_degenerate_shapes(shape):
    n, m = shape
    C = torch.rand(n, m, generator=torch.Generator().manual_seed(1), dtype=D)
    a, b = torch.full((n,), 1 / n, dtype=D), torch.full((m,), 1 / m, dtype=D)
    res = entrokit.solve(a, b, C, eps=1e-3)
    assert bool(res.converged) and _plan_error(res, a, b) <= 1e-6
    P = res.plan
    torch.testing.assert_close(res.transport_cost, (P * C).sum())


def test_non_finite_computed_cost_raises_before_iterating():
    x = torch.full((4, 2), 1e200, dtype=D)
    y = torch.zeros(3, 2, dtype=D)
    with pytest.raises(InputError, match="cost contains an infinite value.*rescale the coordinates"):
        entrokit.sinkhorn(None, None, entrokit.PointCloud(x, y), eps=0.1)

    def nan_cost(x, y):
        return torch.full((*x.shape[:-1], y.shape[-2]), float("nan"), dtype=x.dtype)

    with pytest.raises(InputError, match="cost contains NaN"):
        entrokit.sinkhorn(None, None, entrokit.PointCloud(y, y, nan_cost), eps=0.1)


def test_cost_callable_returning_ints():
    y = torch.zeros(3, 2, dtype=D)
    with pytest.raises(TypeError, match="cost callable returned dtype torch.int64"):
        entrokit.sinkhorn(None, None, entrokit.PointCloud(y, y, lambda x, y: torch.ones(x.shape[-2], y.shape[-2], dtype=torch.long)), eps=0.1)


@pytest.mark.parametrize("option,value", [("eps", "0.1"), ("tol", "1e-6"), ("max_iter", "100")])
def test_string_for_numeric_option(option, value):
    C = torch.rand(3, 3, dtype=D)
    kw = {"eps": 0.1, option: value}
    with pytest.raises(TypeError, match=f"{option} must be .*not a string|{option} must be an int"):
        entrokit.solve(None, None, C, **kw)


def test_auto_validates_before_reading_the_cost():
    C = torch.rand(3, 3, dtype=D)
    C[0, 0] = float("nan")
    with pytest.raises(InputError, match="cost contains NaN"):
        entrokit.solve(None, None, C, eps=1e-4, method="auto")


def test_common_options_mean_the_same_for_every_method():
    # ("auto" with a method-specific option: tests/solvers/test_solve.py)
    C = torch.rand(20, 20, generator=torch.Generator().manual_seed(2), dtype=D)
    for method in ("sinkhorn", "ssns", "auto"):
        res = entrokit.solve(None, None, C, eps=1e-2, method=method, eps_scaling="auto")
        assert bool(res.converged)


def test_uniform_default_weights_and_numpy_out():
    C = np.random.default_rng(0).random((4, 6))
    res = entrokit.solve(None, None, C, eps=0.1)
    assert isinstance(res.plan, np.ndarray) and isinstance(res.f, np.ndarray)
    np.testing.assert_allclose(res.plan.sum(1), np.full(4, 0.25), atol=1e-6)
    np.testing.assert_allclose(res.plan.sum(0), np.full(6, 1 / 6), atol=1e-6)
    ref = entrokit.solve(torch.full((4,), 0.25, dtype=D), torch.full((6,), 1 / 6, dtype=D), torch.as_tensor(C), eps=0.1)
    np.testing.assert_allclose(res.plan, ref.plan.numpy())


@pytest.mark.parametrize("method", ["sinkhorn", "sns", "ssns", "smooth"])
def test_any_number_of_batch_axes(method):
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(2, 3, 5, 4, generator=gen, dtype=D)
    res = entrokit.solve(None, None, C, eps=0.1, method=method, tol=1e-9)
    P = res.plan.to_dense() if res.plan.is_sparse else res.plan
    assert P.shape == (2, 3, 5, 4) and res.f.shape == (2, 3, 5) and res.converged.shape == (2, 3)
    one = entrokit.solve(None, None, C[1, 2], eps=0.1, method=method, tol=1e-9)
    Q = one.plan.to_dense() if one.plan.is_sparse else one.plan
    torch.testing.assert_close(P[1, 2], Q, atol=1e-8, rtol=0)


def test_default_grad_gives_plan_and_transport_cost_their_derivatives():
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(4, 3, generator=gen, dtype=D, requires_grad=True)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    b = torch.tensor([0.5, 0.25, 0.25], dtype=D)

    def plan(C):
        return entrokit.sinkhorn(a, b, C, eps=0.3, tol=1e-13).plan

    def cost(C):
        return entrokit.sinkhorn(a, b, C, eps=0.3, tol=1e-13).transport_cost

    assert torch.autograd.gradcheck(plan, (C,), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(cost, (C,), atol=1e-6, rtol=1e-5)
    # envelope is the frozen-plan mode: its transport-cost gradient is P, not the derivative
    res = entrokit.sinkhorn(a, b, C, eps=0.3, tol=1e-13, grad="envelope")
    (g,) = torch.autograd.grad(res.transport_cost, C)
    torch.testing.assert_close(g, res.plan)
    exact = entrokit.sinkhorn(a, b, C, eps=0.3, tol=1e-13)
    (g_exact,) = torch.autograd.grad(exact.transport_cost, C)
    assert (g_exact - g).abs().max() > 1e-3


def test_value_gradient_needs_no_adjoint_solve(monkeypatch):
    import entrokit.solvers.implicit as imp

    calls = []
    real = imp.adjoint_solve
    monkeypatch.setattr(imp, "adjoint_solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    C = torch.rand(4, 3, dtype=D, requires_grad=True)
    res = entrokit.sinkhorn(None, None, C, eps=0.3)
    res.value.backward()
    assert calls == []  # the envelope theorem: value's gradient is the plan
    torch.testing.assert_close(C.grad, res.plan.detach())


def test_half_precision_is_refused_with_the_remedy():
    C = torch.rand(3, 3)
    with pytest.raises(TypeError, match="bfloat16.*float32 or float64"):
        entrokit.solve(None, None, C.bfloat16(), eps=0.1)


def test_warnings_are_not_duplicated():
    C = torch.rand(40, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 1e6
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        entrokit.sinkhorn(None, None, C, eps=1e-2, tol=1e-6, lse_mode=True)
    assert len([x for x in w if issubclass(x.category, entrokit.ConvergenceWarning)]) == 1


def test_apply_and_marginals_without_materialising():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 9, 2, generator=gen, dtype=D), torch.randn(2, 7, 2, generator=gen, dtype=D)
    res = entrokit.sinkhorn(None, None, entrokit.PointCloud(x, y, chunk_size=4), eps=0.5)
    v = torch.randn(2, 7, generator=gen, dtype=D)
    u = torch.randn(2, 9, generator=gen, dtype=D)
    P = res.plan
    torch.testing.assert_close(res.apply(v, axis=1), (P @ v.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(res.apply(u, axis=0), (u.unsqueeze(-2) @ P).squeeze(-2))
    r, c = res.marginals()
    torch.testing.assert_close(r, P.sum(-1))
    torch.testing.assert_close(c, P.sum(-2))
    with pytest.raises(InputError, match="axis must be 0"):
        res.apply(v, axis=2)


@pytest.mark.parametrize("method", ["sinkhorn", "sns", "ssns", "smooth"])
def test_every_method_takes_the_common_options(method):
    from entrokit.solvers.solve import COMMON_OPTIONS, _accepted_options, _resolve

    assert set(COMMON_OPTIONS) <= _accepted_options(_resolve(method))
    C = torch.rand(5, 4, generator=torch.Generator().manual_seed(6), dtype=D)
    seen = []
    first = entrokit.solve(None, None, C, eps=0.1, method=method, eps_scaling=True,
                           callback=lambda i, e: seen.append(e), normalize=True, check_inputs=True)
    again = entrokit.solve(None, None, C, eps=0.1, method=method, eps_scaling=False,
                           init=first, grad="envelope")
    assert seen and bool(first.converged) and bool(again.converged)
