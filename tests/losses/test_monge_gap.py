"""Monge gap of a map (Uscidda & Cuturi, 2023), OTT-JAX's ``ent_reg_cost`` convention."""

import math

import pytest
import torch

from entrokit import InputError
from entrokit.losses.monge_gap import monge_gap

F64 = torch.float64


def _points(n, d=2, seed=0, dtype=F64):
    return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _spd(d, seed):
    g = torch.Generator().manual_seed(100 + seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=g))
    return Q @ torch.diag(torch.rand(d, dtype=F64, generator=g) * 2.5 + 0.5) @ Q.T


def _rotation(theta):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def _exact_gap(x, Tx):
    """Unregularized empirical gap M_0 (uniform weights) by an exact assignment."""
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment
    C = torch.cdist(x, Tx) ** 2
    r, c = linear_sum_assignment(C.numpy())
    return float(torch.diagonal(C).mean() - C[r, c].mean())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [2, 5])
def test_gradient_of_convex_function_has_only_the_entropic_offset(seed, d):
    # T(x) = A x + b = grad(x'Ax/2 + b'x), A SPD: c-optimal, M_0 = 0, so
    # eps H(a) <= M <= 2 eps H(a) with H(a) = log n (module docstring); eps = 1e-3 keeps
    # the offset below 2 eps log n = 0.0083 ("M ~ 0")
    n, eps = 64, 1e-3
    x = _points(n, d, seed)
    b = torch.linspace(-1, 1, d, dtype=F64)
    Tx = x @ _spd(d, seed) + b
    M = float(monge_gap(x, Tx, eps=eps, tol=1e-6))
    assert eps * math.log(n) - 1e-9 <= M <= 2 * eps * math.log(n) + 1e-6
    assert M <= 0.0084


def test_offset_tends_to_eps_log_n_at_small_eps():
    x = _points(50, seed=3)
    Tx = x @ _spd(2, 3)
    for eps in (1e-3, 1e-4):
        M = float(monge_gap(x, Tx, eps=eps, tol=1e-6))
        assert M == pytest.approx(eps * math.log(50), rel=1e-3)


@pytest.mark.parametrize("theta", [0.5, math.pi / 2, 2.5])
def test_rotation_has_a_clear_gap_sandwiched_around_the_exact_gap(theta):
    # a rotation is not the gradient of a convex function: M_0 > 0, and
    # M_0 + eps log n <= M <= M_0 + 2 eps log n
    n, eps = 64, 1e-2
    x = _points(n, seed=1)
    Tx = x @ _rotation(theta).T
    M = float(monge_gap(x, Tx, eps=eps, tol=1e-4))
    M0 = _exact_gap(x, Tx)
    assert M0 > 0.1
    assert M0 + eps * math.log(n) - 1e-9 <= M <= M0 + 2 * eps * math.log(n) + 1e-3
    assert M > 2 * eps * math.log(n) + 0.1  # clearly outside the band of optimal maps


def test_equals_ott_formula_from_the_plan():
    # OTT: mean_i c(x_i, Tx_i) - (<C, P> - eps H(P)), H(P) = -sum P log P
    eps = 0.3
    x, Tx = _points(20, seed=4), _points(20, seed=5)
    M, res = monge_gap(x, Tx, eps=eps, tol=1e-12, return_result=True)
    P = res.plan
    C = torch.cdist(x, Tx) ** 2
    ent_reg_cost = (C * P).sum() + eps * torch.special.xlogy(P, P).sum()
    ref = ((x - Tx) ** 2).sum(-1).mean() - ent_reg_cost
    torch.testing.assert_close(M, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore::entrokit.ConvergenceWarning")
@pytest.mark.parametrize("max_iter", [5, 10_000])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", range(6))
def test_never_negative(seed, dtype, max_iter):
    # arbitrary (non-optimal) images and weights: M >= eps H(a) > 0, even after 5 iterations,
    # because the Sinkhorn dual objective is a lower bound of the entropic cost at any iterate
    g = torch.Generator().manual_seed(seed)
    n, eps = 30, [1e-2, 0.1, 1.0][seed % 3]
    x = torch.randn(n, 3, generator=g).to(dtype)
    Tx = (torch.randn(n, 3, generator=g) * 2 + x * (seed - 3)).to(dtype)
    a = torch.rand(n, generator=g).to(dtype) + 0.1
    M = float(monge_gap(x, Tx, eps=eps, a=a, max_iter=max_iter))
    w = (a / a.sum()).double()
    H = float(-(w * w.log()).sum())
    scale = float(((x - Tx) ** 2).sum(-1).mean())  # rounding of the float32 difference
    assert M >= eps * H - (1e-9 if dtype == F64 else 1e-6 * scale)
    assert M >= 0


def test_identity_map_is_optimal():
    x = _points(40, seed=6)
    M = float(monge_gap(x, x.clone(), eps=1e-3, tol=1e-9))
    assert 1e-3 * math.log(40) - 1e-9 <= M <= 2e-3 * math.log(40)


def test_batched_matches_loop_and_weights():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 16, 2, dtype=F64, generator=g)
    Tx = x @ _rotation(1.0).T + 0.1 * torch.randn(3, 16, 2, dtype=F64, generator=g)
    a = torch.rand(3, 16, dtype=F64, generator=g) + 0.2
    M = monge_gap(x, Tx, eps=0.05, a=a, tol=1e-9)
    assert M.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(M[i], monge_gap(x[i], Tx[i], eps=0.05, a=a[i], tol=1e-9), rtol=1e-8, atol=1e-10)
    # one weight vector [n] is shared by the batch
    torch.testing.assert_close(
        monge_gap(x, Tx, eps=0.05, a=a[0], tol=1e-9)[2], monge_gap(x[2], Tx[2], eps=0.05, a=a[0], tol=1e-9),
        rtol=1e-8, atol=1e-10,
    )


def test_zero_weight_drops_the_point_and_weights_are_normalised():
    x, Tx = _points(12, seed=8), _points(12, seed=9)
    a = torch.ones(12, dtype=F64)
    a[3] = 0.0
    keep = a > 0
    M = monge_gap(x, Tx, eps=0.5, a=5.0 * a, tol=1e-9)
    torch.testing.assert_close(M, monge_gap(x[keep], Tx[keep], eps=0.5, tol=1e-9), rtol=1e-7, atol=1e-8)


def test_relative_eps_is_eps_times_mean_cost():
    x = _points(24, seed=10)
    Tx = x @ _rotation(0.7).T * 1.5
    mean_cost = float((torch.cdist(x, Tx) ** 2).mean())
    M_rel = monge_gap(x, Tx, eps=0.05, relative_eps=True, tol=1e-8)
    M_abs = monge_gap(x, Tx, eps=0.05 * mean_cost, tol=1e-8)
    torch.testing.assert_close(M_rel, M_abs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean", "callable"])
def test_gradcheck(cost):
    c = (lambda u, v: torch.cdist(u, v, p=1)) if cost == "callable" else cost
    x = _points(6, seed=11)
    Tx = (x @ _rotation(0.8).T + 0.3).requires_grad_()
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda u, v: monge_gap(u, v, eps=0.5, cost=c, tol=1e-13), (xr, Tx), atol=1e-6, rtol=1e-5
    )


def test_gradcheck_batched():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 2, dtype=F64, generator=g)
    Tx = torch.randn(2, 5, 2, dtype=F64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: monge_gap(x, v, eps=0.3, tol=1e-13), (Tx,), atol=1e-6, rtol=1e-5)


def test_relative_eps_scale_is_a_constant():
    # like OTT's stop_gradient on the mean cost: the gradient is the one at a fixed eps
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 7, 2, dtype=F64, generator=g)
    Tx = torch.randn(2, 7, 2, dtype=F64, generator=g).requires_grad_()
    monge_gap(x, Tx, eps=0.1, relative_eps=True, tol=1e-12).sum().backward()
    mean_cost = (torch.cdist(x, Tx.detach()) ** 2).mean((-2, -1))
    for i in range(2):
        Ti = Tx.detach()[i].clone().requires_grad_()
        monge_gap(x[i], Ti, eps=0.1 * float(mean_cost[i]), tol=1e-12).backward()
        torch.testing.assert_close(Tx.grad[i], Ti.grad, rtol=1e-7, atol=1e-9)


def test_float32_runs_and_backpropagates():
    x = _points(128, seed=13, dtype=torch.float32)
    Tx = (x @ _rotation(1.2).T.float()).requires_grad_()
    M = monge_gap(x, Tx, eps=0.01, relative_eps=True)
    M.backward()
    assert M.dtype == torch.float32 and float(M.detach()) > 0.5
    assert bool(torch.isfinite(Tx.grad).all()) and float(Tx.grad.norm()) > 0


def test_bad_inputs():
    x = _points(10)
    with pytest.raises(InputError, match="x and Tx must have the same shape"):
        monge_gap(x, _points(10, d=3), eps=0.1)
    with pytest.raises(InputError, match="x and Tx must have the same shape"):
        monge_gap(x, _points(9), eps=0.1)
    with pytest.raises(InputError, match="x and Tx must have the same shape"):
        monge_gap(x[:, 0], x[:, 0], eps=0.1)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="eps must be a finite number > 0"):
            monge_gap(x, x, eps=eps)
    with pytest.raises(InputError, match="a has negative entries"):
        monge_gap(x, x, eps=0.1, a=torch.linspace(-1, 1, 10, dtype=F64))
    with pytest.raises(InputError, match=r"a must have shape \(10,\)"):
        monge_gap(x, x, eps=0.1, a=torch.ones(9, dtype=F64))
    with pytest.raises(InputError, match="zero total mass"):
        monge_gap(x, x, eps=0.1, a=torch.zeros(10, dtype=F64))
    with pytest.raises(InputError, match="a contains NaN"):
        monge_gap(x, x, eps=0.1, a=torch.full((10,), float("nan"), dtype=F64))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(InputError, match="Tx contains NaN"):
        monge_gap(x, bad, eps=0.1)
    with pytest.raises(InputError, match="cost must be 'sqeuclidean', 'euclidean' or a callable"):
        monge_gap(x, x, eps=0.1, cost="l1")
    with pytest.raises(InputError, match="dtype mismatch"):
        monge_gap(x, x.float(), eps=0.1)
    with pytest.raises(TypeError, match="relative_eps must be True or False"):
        monge_gap(x, x, eps=0.1, relative_eps="mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_solved_in_float32(dtype):
    # the gap and the map's gradient come back in the caller's dtype, equal to the float32
    # computation on the same rounded points
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g).to(dtype)
    Tx = (x.float() @ torch.tensor([[1.0, 0.5], [-0.5, 1.0]])).to(dtype).requires_grad_()
    Tx32 = Tx.detach().float().requires_grad_()
    gap, gap32 = monge_gap(x, Tx, eps=0.5), monge_gap(x.float(), Tx32, eps=0.5)
    gap.backward()
    gap32.backward()
    assert gap.dtype == Tx.grad.dtype == dtype
    assert float(gap.detach()) == float(gap32.detach().to(dtype))
    torch.testing.assert_close(Tx.grad, Tx32.grad.to(dtype))
