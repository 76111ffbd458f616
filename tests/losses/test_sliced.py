"""Sliced Wasserstein distance and its control-variate estimators."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import wasserstein_distance

from entrokit import InputError
from entrokit.losses.sliced import random_projections, sliced_wasserstein

ot = pytest.importorskip("ot")

D = torch.float64
CVS = [None, "lower", "upper"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def simplex(n, g, *, zeros=False):
    w = torch.rand(n, generator=g, dtype=D) + 0.05
    if zeros:
        w[0] = 0.0
    return w / w.sum()


def circle_quadrature(N):
    """Midpoint rule on the half circle: W(theta) = W(-theta), so this integrates SW over
    S^1 to O(N^-2)."""
    phi = (torch.arange(N, dtype=D) + 0.5) * math.pi / N
    return torch.stack([phi.cos(), phi.sin()], -1)


def pair_2d(seed, n=64, m=80):
    g = gen(seed)
    x = torch.randn(n, 2, generator=g, dtype=D) * torch.tensor([0.5, 2.0], dtype=D)
    y = torch.randn(m, 2, generator=g, dtype=D) * 0.2 + torch.tensor([1.0, -0.5], dtype=D)
    return x, y


# --------------------------------------------------------------------------- d = 1: exact W_p


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,m", [(9, 9), (7, 13), (1, 5)])
def test_d1_is_exact_w1(n, m, weighted):
    g = gen(n * 100 + m)
    u, v = torch.randn(n, generator=g, dtype=D), torch.randn(m, generator=g, dtype=D) + 0.3
    a = simplex(n, g) if weighted else None
    b = simplex(m, g) if weighted else None
    got = sliced_wasserstein(u[:, None], v[:, None], p=1, a=a, b=b, n_projections=3, generator=g)
    ref = wasserstein_distance(u.numpy(), v.numpy(), None if a is None else a.numpy(), None if b is None else b.numpy())
    assert float(got) == pytest.approx(ref, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("cv", CVS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,m", [(10, 10), (6, 11)])
def test_d1_is_exact_w2(n, m, weighted, cv):
    g = gen(n + 7 * m)
    u, v = torch.randn(n, generator=g, dtype=D), 2 * torch.randn(m, generator=g, dtype=D) - 1
    a = simplex(n, g, zeros=True) if weighted else None
    b = simplex(m, g) if weighted else None
    got = sliced_wasserstein(u[:, None], v[:, None], a=a, b=b, n_projections=4, control_variate=cv, generator=g)
    ref = ot.wasserstein_1d(u.numpy(), v.numpy(), None if a is None else a.numpy(), None if b is None else b.numpy(), p=2)
    assert float(got) ** 2 == pytest.approx(ref, rel=1e-12)
    if n == m and not weighted:  # closed form: sorted samples are matched in order
        closed = ((u.sort().values - v.sort().values) ** 2).mean()
        assert float(got) ** 2 == pytest.approx(float(closed), rel=1e-12)


def test_d1_general_p_and_zero_weight_drops_point():
    g = gen(3)
    u, v = torch.randn(8, 1, generator=g, dtype=D), torch.randn(5, 1, generator=g, dtype=D)
    a = simplex(8, g, zeros=True)
    got = sliced_wasserstein(u, v, p=3, a=a, n_projections=2, generator=g)
    ref = ot.wasserstein_1d(u[:, 0].numpy(), v[:, 0].numpy(), a.numpy(), p=3) ** (1 / 3)
    assert float(got) == pytest.approx(ref, rel=1e-12)
    dropped = sliced_wasserstein(u[1:], v, p=3, a=a[1:], n_projections=2, generator=g)
    assert float(dropped) == pytest.approx(float(got), rel=1e-12)


# --------------------------------------------------------------------------- parity with POT


@pytest.mark.parametrize("p", [1, 1.5, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,m", [(40, 40), (30, 47)])
def test_matches_pot_with_same_projections(n, m, weighted, p):
    g = gen(n + m)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = torch.randn(m, 4, generator=g, dtype=D) * 1.3 + 0.4
    th = random_projections(25, 4, generator=g, dtype=D)
    a = simplex(n, g, zeros=True) if weighted else None
    b = simplex(m, g) if weighted else None
    got = sliced_wasserstein(x, y, p=p, a=a, b=b, projections=th)
    ref = ot.sliced_wasserstein_distance(
        x.numpy(), y.numpy(), a=None if a is None else a.numpy(), b=None if b is None else b.numpy(),
        p=p, projections=th.T.numpy(),
    )
    assert float(got) == pytest.approx(float(ref), rel=1e-10)


def test_pot_parity_unnormalised_masses_and_float32():
    g = gen(5)
    x, y = torch.randn(20, 3, generator=g, dtype=D), torch.randn(25, 3, generator=g, dtype=D)
    th = random_projections(10, 3, generator=g, dtype=D)
    a, b = 3 * simplex(20, g), 3 * simplex(25, g)
    got = sliced_wasserstein(x, y, a=a, b=b, projections=th)
    ref = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), a=a.numpy(), b=b.numpy(), projections=th.T.numpy())
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    unit = sliced_wasserstein(x, y, a=a / 3, b=b / 3, projections=th)
    assert float(got) == pytest.approx(math.sqrt(3) * float(unit), rel=1e-12)
    got32 = sliced_wasserstein(x.float(), y.float(), a=a.float(), b=b.float(), projections=th.float())
    assert got32.dtype == torch.float32
    assert float(got32) == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- batching, RNG, I/O


@pytest.mark.parametrize("cv", CVS)
def test_batched_equals_loop(cv):
    g = gen(11)
    B, n, m, d = 3, 12, 17, 3
    x, y = torch.randn(B, n, d, generator=g, dtype=D), torch.randn(B, m, d, generator=g, dtype=D) + 1
    a = torch.stack([simplex(n, g) for _ in range(B)])
    th = random_projections(15, d, generator=g, dtype=D)
    thb = random_projections(B * 15, d, generator=g, dtype=D).reshape(B, 15, d)
    shared = sliced_wasserstein(x, y, a=a, projections=th, control_variate=cv)
    per = sliced_wasserstein(x, y, a=a, projections=thb, control_variate=cv)
    assert shared.shape == per.shape == (B,)
    for i in range(B):
        ref = sliced_wasserstein(x[i], y[i], a=a[i], projections=th, control_variate=cv)
        torch.testing.assert_close(shared[i], ref, rtol=1e-12, atol=0)
        ref = sliced_wasserstein(x[i], y[i], a=a[i], projections=thb[i], control_variate=cv)
        torch.testing.assert_close(per[i], ref, rtol=1e-12, atol=0)
    # an unbatched y is shared by the batch
    one = sliced_wasserstein(x, y[0], projections=th, control_variate=cv)
    torch.testing.assert_close(one[1], sliced_wasserstein(x[1], y[0], projections=th, control_variate=cv))


def test_generator_reproducible_and_numpy_in_out():
    x = torch.randn(30, 5, generator=gen(0), dtype=D)
    y = torch.randn(40, 5, generator=gen(1), dtype=D) + 1
    v1 = sliced_wasserstein(x, y, n_projections=7, generator=gen(42))
    v2 = sliced_wasserstein(x, y, n_projections=7, generator=gen(42))
    v3 = sliced_wasserstein(x, y, n_projections=7, generator=gen(43))
    assert float(v1) == float(v2) != float(v3)
    th = random_projections(7, 5, generator=gen(42), dtype=D)
    assert float(v1) == float(sliced_wasserstein(x, y, projections=th))
    out = sliced_wasserstein(x.numpy(), y.numpy(), n_projections=7, generator=gen(42))
    assert isinstance(out, np.ndarray) and float(out) == pytest.approx(float(v1), rel=1e-14)
    assert sliced_wasserstein(x.float(), y.float(), n_projections=3).dtype == torch.float32


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("cv", CVS)
def test_translation_permutation_identity(cv):
    g = gen(2)
    x, y = torch.randn(25, 3, generator=g, dtype=D), torch.randn(31, 3, generator=g, dtype=D) * 2
    a, b = simplex(25, g), simplex(31, g)
    th = random_projections(12, 3, generator=g, dtype=D)
    base = sliced_wasserstein(x, y, a=a, b=b, projections=th, control_variate=cv)
    shift = torch.tensor([5.0, -3.0, 100.0], dtype=D)
    moved = sliced_wasserstein(x + shift, y + shift, a=a, b=b, projections=th, control_variate=cv)
    torch.testing.assert_close(moved, base, rtol=1e-10, atol=0)
    px, py = torch.randperm(25, generator=g), torch.randperm(31, generator=g)
    perm = sliced_wasserstein(x[px], y[py], a=a[px], b=b[py], projections=th, control_variate=cv)
    torch.testing.assert_close(perm, base, rtol=1e-12, atol=0)
    xr = x.clone().requires_grad_()
    same = sliced_wasserstein(xr, x, projections=th, control_variate=cv)
    assert float(same.detach()) == 0.0
    same.backward()
    assert bool(torch.isfinite(xr.grad).all())


def test_translation_of_one_cloud_in_float32():
    # centring before projection keeps float32 accurate far from the origin
    g = gen(8)
    x, y = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g) + 0.5
    th = random_projections(20, 3, generator=g)
    base = sliced_wasserstein(x.double(), y.double(), projections=th.double())
    far = sliced_wasserstein(x + 1e4, y + 1e4, projections=th)
    assert float(far) == pytest.approx(float(base), rel=1e-3)


small = st.integers(min_value=1, max_value=6)


@settings(max_examples=40, deadline=None)
@given(n=small, m=small, d=st.integers(1, 3), seed=st.integers(0, 10_000), p=st.sampled_from([1.0, 2.0, 3.0]))
def test_properties_metric_and_scaling(n, m, d, seed, p):
    """With fixed directions SW_p is an L^p average of 1-D W_p's: a pseudo-metric,
    symmetric, positively homogeneous; plus d = 1 equals scipy's W_1."""
    g = gen(seed)
    x, y, z = (torch.randn(k, d, generator=g, dtype=D) for k in (n, m, n + 1))
    a, b = simplex(n, g), simplex(m, g)
    th = random_projections(5, d, generator=g, dtype=D)
    xy = float(sliced_wasserstein(x, y, a=a, b=b, p=p, projections=th))
    yx = float(sliced_wasserstein(y, x, a=b, b=a, p=p, projections=th))
    xz = float(sliced_wasserstein(x, z, a=a, p=p, projections=th))
    zy = float(sliced_wasserstein(z, y, b=b, p=p, projections=th))
    assert xy >= 0 and xy == pytest.approx(yx, rel=1e-10, abs=1e-12)
    assert xy <= xz + zy + 1e-10
    scaled = float(sliced_wasserstein(-2.5 * x, -2.5 * y, a=a, b=b, p=p, projections=th))
    assert scaled == pytest.approx(2.5 * xy, rel=1e-10, abs=1e-12)
    if d == 1 and p == 1.0:
        ref = wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy(), a.numpy(), b.numpy())
        assert xy == pytest.approx(ref, rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------- control variates


@pytest.mark.parametrize("cv", CVS)
@pytest.mark.parametrize("seed", [0, 1])
def test_estimators_unbiased_for_sw2_squared(cv, seed):
    """E[SW_2^2 estimate] = SW_2^2 up to the O(1/L) bias of the estimated alpha; the
    reference integrates over the circle (d = 2) with a 20000-point midpoint rule."""
    x, y = pair_2d(seed)
    ref = float(sliced_wasserstein(x, y, projections=circle_quadrature(20_000))) ** 2
    R, L = 1000, 20
    th = random_projections(R * L, 2, generator=gen(100 + seed), dtype=D).reshape(R, L, 2)
    z = sliced_wasserstein(x, y, projections=th, control_variate=cv) ** 2  # R draws at once
    se = float(z.std()) / math.sqrt(R)
    assert abs(float(z.mean()) - ref) < 4 * se, (float(z.mean()), ref, se)


def _draws(x, y, cv, R, L, seed):
    th = random_projections(R * L, x.shape[-1], generator=gen(seed), dtype=D).reshape(R, L, -1)
    return sliced_wasserstein(x, y, projections=th, control_variate=cv) ** 2


@pytest.mark.parametrize("d", [2, 10])
def test_control_variates_reduce_variance_on_gaussian_pairs(d):
    g = gen(d)
    scales = torch.linspace(0.5, 2.0, d, dtype=D)
    pairs = {
        # anisotropic vs concentrated and shifted
        "concentrated": (torch.randn(64, d, generator=g, dtype=D) * scales,
                         torch.randn(80, d, generator=g, dtype=D) * 0.2 + 1.0),
        # isotropic with different scales and a mean shift
        "shifted": (torch.randn(64, d, generator=g, dtype=D),
                    torch.randn(64, d, generator=g, dtype=D) * 1.5 + 0.5),
    }
    for name, (x, y) in pairs.items():
        var = {cv: float(_draws(x, y, cv, 500, 20, seed=7).var()) for cv in CVS}
        assert var["lower"] < var[None], (name, var)
        assert var["upper"] < var[None], (name, var)
    # on the concentrated pair the upper bound is tight: variance falls several-fold
    x, y = pairs["concentrated"]
    var = {cv: float(_draws(x, y, cv, 500, 20, seed=8).var()) for cv in CVS}
    assert var["upper"] < var[None] / 4, var


def test_control_variate_uses_weighted_moments():
    """With weights, a weighted measure and the same measure with repeated points agree."""
    g = gen(4)
    x, y = torch.randn(6, 3, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D) + 1
    reps = torch.tensor([1, 3, 2, 1, 1, 4])
    a = reps.to(D) / reps.sum()
    th = random_projections(9, 3, generator=g, dtype=D)
    for cv in CVS:
        w = sliced_wasserstein(x, y, a=a, projections=th, control_variate=cv)
        r = sliced_wasserstein(x.repeat_interleave(reps, 0), y, projections=th, control_variate=cv)
        torch.testing.assert_close(w, r, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("cv,p", [(None, 1.0), (None, 1.5), (None, 2.0), ("lower", 2.0), ("upper", 2.0)])
@pytest.mark.parametrize("equal", [True, False])
def test_gradcheck_points(cv, p, equal):
    g = gen(9)
    x = torch.randn(5, 3, generator=g, dtype=D, requires_grad=True)
    y = (torch.randn(5 if equal else 7, 3, generator=g, dtype=D) + 0.5).requires_grad_()
    th = random_projections(4, 3, generator=g, dtype=D)
    assert torch.autograd.gradcheck(
        lambda x, y: sliced_wasserstein(x, y, p=p, projections=th, control_variate=cv), (x, y)
    )


@pytest.mark.parametrize("cv", CVS)
def test_gradcheck_weights_and_batch(cv):
    g = gen(10)
    x = torch.randn(2, 5, 2, generator=g, dtype=D, requires_grad=True)
    y = torch.randn(2, 6, 2, generator=g, dtype=D).add(1.0)
    la = torch.randn(2, 5, generator=g, dtype=D, requires_grad=True)
    lb = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    th = random_projections(3, 2, generator=g, dtype=D)

    def f(x, la, lb):
        return sliced_wasserstein(x, y, a=la.softmax(-1), b=lb.softmax(-1), projections=th, control_variate=cv)

    assert torch.autograd.gradcheck(f, (x, la, lb))


def test_upper_gradient_stays_bounded_when_means_match():
    """The upper control variate keeps the variance terms, so its gradient stays close to
    plain Monte Carlo as the mean difference goes to 0 (see the module docstring for the
    lower one)."""
    g = gen(12)
    y = torch.randn(100, 2, generator=g, dtype=D)
    x0 = torch.randn(100, 2, generator=g, dtype=D)
    x0 = x0 - x0.mean(0) + y.mean(0)
    th = random_projections(10, 2, generator=g, dtype=D)
    for eps in (1e-2, 1e-5, 1e-8):
        norms = {}
        for cv in (None, "upper"):
            x = (x0 + torch.tensor([eps, -0.3 * eps], dtype=D)).requires_grad_()
            (grad,) = torch.autograd.grad(sliced_wasserstein(x, y, projections=th, control_variate=cv) ** 2, x)
            norms[cv] = float(grad.norm())
        assert norms["upper"] < 2 * norms[None], (eps, norms)


# --------------------------------------------------------------------------- bad inputs

X = torch.randn(5, 3, dtype=D)
Y = torch.randn(6, 3, dtype=D)
U5 = torch.full((5,), 0.2, dtype=D)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(5, dtype=D)), InputError, r"shape \(n, d\) or \(batch, n, d\)"),
        (dict(y=torch.randn(6, 2, dtype=D)), InputError, r"same dimension: x has d=3"),
        (dict(x=torch.randn(2, 5, 3, dtype=D), y=torch.randn(3, 6, 3, dtype=D)), InputError, "batch sizes differ"),
        (dict(a=torch.full((4,), 0.25, dtype=D)), InputError, r"a must have shape \(5,\).*one weight per point"),
        (dict(b=U5), InputError, r"b must have shape \(6,\)"),
        (dict(a=torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2], dtype=D)), InputError, "a has negative entries"),
        (dict(a=torch.tensor([0.5, float("nan"), 0.2, 0.2, 0.1], dtype=D)), InputError, "a contains NaN"),
        (dict(a=torch.zeros(5, dtype=D)), InputError, "a have zero total mass"),
        (dict(a=2 * U5), InputError, "total masses differ"),
        (dict(a=U5, b=torch.full((6,), 0.5, dtype=D)), InputError, "total masses differ"),
        (dict(p=0.5), InputError, r"p must be a finite real >= 1"),
        (dict(p=float("inf")), InputError, r"p must be a finite real >= 1"),
        (dict(p="2"), TypeError, "p must be a real number"),
        (dict(n_projections=0), InputError, "n_projections must be an int >= 1"),
        (dict(n_projections=2.5), TypeError, "n_projections must be an int"),
        (dict(control_variate="middle"), InputError, "control_variate must be one of"),
        (dict(control_variate="lower", p=1), InputError, "needs p=2"),
        (dict(control_variate="upper", projections=2 * torch.eye(3, dtype=D)), InputError, "unit directions"),
        (dict(x=torch.ones(5, 3, dtype=torch.int64)), TypeError, "floating dtype"),
        (dict(x=X.half(), y=Y.float()), InputError, "dtype mismatch"),
        (dict(x="points"), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.empty(0, 3, dtype=D)), InputError, "x is empty"),
        (dict(x=X.clone().index_fill_(0, torch.tensor([2]), float("nan"))), InputError, "x contains NaN"),
        (dict(y=Y.clone().index_fill_(0, torch.tensor([0]), float("inf"))), InputError, "y contains an infinite value"),
        (dict(y=Y.float()), InputError, "dtype mismatch"),
        (dict(a=U5.float()), InputError, "dtype mismatch"),
        (dict(projections=torch.randn(4, 2, dtype=D)), InputError, r"projections must have shape \(L, 3\)"),
        (dict(projections=torch.full((4, 3), float("nan"), dtype=D)), InputError, "projections contain NaN"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_inputs_raise(kwargs, exc, match):
    kw = dict(x=X, y=Y)
    kw.update(kwargs)
    x, y = kw.pop("x"), kw.pop("y")
    with pytest.raises(exc, match=match):
        sliced_wasserstein(x, y, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    # half points and weights: computed in float32 (the weights' mass, 1 to half precision,
    # is balanced against the uniform x), returned in the caller's dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g).to(dtype).requires_grad_()
    y = torch.randn(30, 3, generator=g).to(dtype)
    b = (torch.rand(30, generator=g) + 0.5).div(30).to(dtype)
    b = (b.float() / b.float().sum()).to(dtype)
    theta = torch.randn(8, 3, generator=g).to(dtype)
    x32 = x.detach().float().requires_grad_()
    sw = sliced_wasserstein(x, y, b=b, projections=theta)
    sw32 = sliced_wasserstein(x32, y.float(), b=b.float() / b.float().sum(), projections=theta.float())
    sw.backward()
    sw32.backward()
    assert sw.dtype == x.grad.dtype == dtype
    torch.testing.assert_close(sw.detach(), sw32.detach().to(dtype))
    torch.testing.assert_close(x.grad, x32.grad.to(dtype))
