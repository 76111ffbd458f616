"""Sinkhorn divergence: positivity, symmetry, zero on equal measures, references, gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrokit
from entrokit import InputError, PointCloud, sinkhorn_divergence
from entrokit.losses import entropic_ot_value
from entrokit.nn import SinkhornLoss
from generators import gaussian_clouds as _clouds

D = torch.float64



def test_matches_three_independent_converged_solves():
    x, y, a, b = _clouds()
    eps = 0.5
    s = sinkhorn_divergence(x, y, a=a, b=b, eps=eps, tol=1e-12)
    # reference: three alternating solves (no symmetric updates), assembled by hand
    terms = [entrokit.sinkhorn(p, q, PointCloud(u, v), eps, tol=1e-12, max_iter=200_000).value
             for p, q, u, v in ((a, b, x, y), (a, a, x, x), (b, b, y, y))]
    ref = terms[0] - 0.5 * terms[1] - 0.5 * terms[2]
    torch.testing.assert_close(s, ref, atol=1e-10, rtol=0)
    # debias=False is the first term alone
    torch.testing.assert_close(entrokit.losses.entropic_ot_value(x, y, a=a, b=b, eps=eps, tol=1e-12),
                               terms[0], atol=1e-10, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 3), seed=st.integers(0, 10_000),
       log_eps=st.floats(-1.5, 1.0))
def test_nonnegative_and_symmetric(n, m, d, seed, log_eps):
    x, y, a, b = _clouds(n, m, d, seed)
    eps = 10.0**log_eps
    s_xy = sinkhorn_divergence(x, y, a=a, b=b, eps=eps, tol=1e-10, max_iter=100_000)
    s_yx = sinkhorn_divergence(y, x, a=b, b=a, eps=eps, tol=1e-10, max_iter=100_000)
    scale = float(PointCloud(x, y).cost_bounds()[1]) + 1.0
    assert float(s_xy) >= -1e-8 * scale
    assert abs(float(s_xy - s_yx)) <= 1e-8 * scale


def test_zero_on_equal_measures_with_duplicates_and_zero_weights():
    x, _, a, _ = _clouds(n=12)
    assert abs(float(sinkhorn_divergence(x, x, a=a, b=a, eps=0.1, tol=1e-11))) < 1e-9
    # the same measure written with a duplicated point (its mass split) and a zero-weight point
    far = torch.full((1, 2), 50.0, dtype=D)
    x2 = torch.cat([x, x[:1], far])
    a2 = torch.cat([a, torch.zeros(2, dtype=D)])
    a2[0], a2[12] = a[0] / 3, 2 * a[0] / 3
    s = sinkhorn_divergence(x, x2, a=a, b=a2, eps=0.1, tol=1e-11)
    assert abs(float(s)) < 1e-9
    # and it separates distinct measures
    assert float(sinkhorn_divergence(x, x + 0.3, a=a, b=a, eps=0.1)) > 1e-3


def test_gradients_match_finite_differences_points_and_weights():
    x, y, a, b = _clouds(n=6, m=5, d=2, seed=4)
    x = x.requires_grad_(True)
    a = a.requires_grad_(True)

    def fn(x, a):
        # weights enter normalised, so the gradient is tangent to the simplex
        return sinkhorn_divergence(x, y, a=a / a.sum(), b=b, eps=0.3, tol=1e-13, max_iter=100_000)

    assert torch.autograd.gradcheck(fn, (x, a), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cost", ["sqeuclidean", "callable"])
def test_entropic_ot_value_weight_gradient_along_the_mass_direction(cost):
    r"""d/dm OT_eps(m a0, m b0): the direction that normalised weights project out. With
    unit-mass a0, b0 the envelope gradient f - eps r/a + eps sum(b) gives the closed form
    (<a, f> + <b, g>) / m + 2 eps (m - 1) from the potentials of a public solve; finite
    differences check both (a sign flip of eps sum(b) in the envelope gradient gave 2.39 here
    against 3.41)."""
    x, y, a0, b0 = _clouds(n=7, m=6, d=2, seed=8)
    c = "sqeuclidean" if cost == "sqeuclidean" else (lambda u, v: ((u[..., :, None, :] - v[..., None, :, :]) ** 2).sum(-1))
    eps, m0 = 0.3, 1.7
    kw = dict(eps=eps, cost=c, tol=1e-13, max_iter=100_000)

    def value(m):
        return entropic_ot_value(x, y, a=m * a0, b=m * b0, **kw)

    m = torch.tensor(m0, dtype=D, requires_grad=True)
    (dm,) = torch.autograd.grad(value(m), m)
    h = 1e-6
    fd = (value(torch.tensor(m0 + h, dtype=D)) - value(torch.tensor(m0 - h, dtype=D))) / (2 * h)
    res = entrokit.sinkhorn(m0 * a0, m0 * b0, PointCloud(x, y), eps, tol=1e-13, max_iter=100_000)
    closed = ((m0 * a0 * res.f).sum() + (m0 * b0 * res.g).sum()) / m0 + 2 * eps * (m0 - 1)
    torch.testing.assert_close(dm, fd, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(dm, closed, atol=1e-10, rtol=1e-10)


def test_batched_equals_looped_and_online_equals_dense():
    x, y, a, b = _clouds(n=20, m=15, d=3, seed=5, batch=(2, 3))
    s = sinkhorn_divergence(x, y, a=a, b=b, eps=0.2, tol=1e-11)
    assert s.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = sinkhorn_divergence(x[i, j], y[i, j], a=a[i, j], b=b[i, j], eps=0.2, tol=1e-11)
            torch.testing.assert_close(s[i, j], one, atol=1e-10, rtol=0)
    online = sinkhorn_divergence(PointCloud(x, y, chunk_size=4), a=a, b=b, eps=0.2, tol=1e-11)
    torch.testing.assert_close(online, s, atol=1e-10, rtol=0)


def test_float32_follows_inputs_and_is_close_to_float64():
    x, y, a, b = _clouds(n=30, m=30, d=2, seed=6)
    s64 = sinkhorn_divergence(x, y, eps=0.1, tol=1e-5)
    s32 = sinkhorn_divergence(x.float(), y.float(), eps=0.1, tol=1e-5)
    assert s32.dtype == torch.float32
    assert abs(float(s32) - float(s64)) < 1e-4


def test_nonconvergence_warns_with_the_remedy():
    x, y, _, _ = _clouds(n=30, m=30, d=2, seed=7)
    with pytest.warns(entrokit.ConvergenceWarning, match="Raise max_iter"):
        sinkhorn_divergence(x, y, eps=1e-3, tol=1e-12, max_iter=3, eps_scaling=False)


def test_bad_inputs():
    x, y, a, b = _clouds()
    with pytest.raises(InputError, match="same point dimension"):
        sinkhorn_divergence(x, torch.randn(5, 3, dtype=D), eps=0.1)
    with pytest.raises(InputError, match="eps must be a finite number > 0"):
        sinkhorn_divergence(x, y, eps=0.0)
    with pytest.raises(TypeError, match="eps must be a positive real number"):
        sinkhorn_divergence(x, y, eps="0.1")
    with pytest.raises(InputError, match="negative"):
        sinkhorn_divergence(x, y, a=-a, b=b, eps=0.1)
    with pytest.raises(InputError, match="NaN"):
        sinkhorn_divergence(x, y, a=a * float("nan"), b=b, eps=0.1)
    with pytest.raises(InputError, match="a of length 30"):
        sinkhorn_divergence(x, y, a=a[:-1], b=b, eps=0.1)
    with pytest.raises(InputError, match="y is missing"):
        sinkhorn_divergence(x, eps=0.1)
    with pytest.raises(InputError, match="leave y=None"):
        sinkhorn_divergence(PointCloud(x, y), y, eps=0.1)
    with pytest.raises(InputError, match="pass the three geometries"):
        sinkhorn_divergence(entrokit.DenseCost(torch.rand(3, 4, dtype=D)), eps=0.1)
    with pytest.raises(InputError, match="cost must be one of .sqeuclidean."):
        sinkhorn_divergence(x, y, eps=0.1, cost="cosine")
    with pytest.raises(InputError, match="scaling_decay"):
        sinkhorn_divergence(x, y, eps=0.1, scaling_decay=1.5)
    with pytest.raises(TypeError, match="debias"):
        sinkhorn_divergence(x, y, eps=0.1, debias="yes")
    with pytest.raises(InputError, match="shape mismatch"):
        C = entrokit.DenseCost(torch.rand(30, 25, dtype=D))
        sinkhorn_divergence((C, C, C), a=a, b=b, eps=0.1)


def test_slowly_mixing_cross_term_is_handed_to_newton():
    # near-permutation plans at small eps: alternating Sinkhorn needs > 50 000 iterations
    # here; the loop stops on its measured rate and the safe Newton solver finishes
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    pb = make_problem(None, None, PointCloud(x, x + 1.0)).with_batch()
    *_, info = sinkhorn_problem(pb, 0.1, SinkhornOptions(tol=1e-9, stop_when_slow=True))
    assert 20 <= info["stopped_slow"] < 1000
    s = sinkhorn_divergence(x, x + 1.0, eps=0.1, tol=1e-9)  # a ConvergenceWarning would fail
    ref = sum(c * entrokit.solve(None, None, PointCloud(u, v), eps=0.1, method="ssns", tol=1e-10).value
              for c, u, v in ((1.0, x, x + 1.0), (-0.5, x, x), (-0.5, x + 1.0, x + 1.0)))
    torch.testing.assert_close(s, ref, atol=1e-8, rtol=0)


def test_one_convergence_warning_when_newton_takes_over():
    """A dense cross problem handed from Sinkhorn to SSNS that misses tol warned twice
    (SSNS's warning, then the divergence's); the README promises one per call."""
    import warnings

    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, generator=g, dtype=torch.float64)
    y = torch.rand(50, 2, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sinkhorn_divergence(x, y, eps=1e-4, max_iter=21)
    conv = [w for w in caught if issubclass(w.category, entrokit.ConvergenceWarning)]
    assert len(conv) == 1 and "sinkhorn_divergence did not converge" in str(conv[0].message)


def test_float32_point_clouds_do_not_warn():
    # issue 19: 30 x 25 float32 clouds at eps = 0.1 warned on 10 of 10 seeds (the cross
    # problem's Newton finish solved on the float32 rounding of the cost)
    import warnings

    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(30, 2, generator=g), torch.randn(25, 2, generator=g) + 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s32 = entrokit.sinkhorn_divergence(x, y, eps=0.1)
        s64 = entrokit.sinkhorn_divergence(x.double(), y.double(), eps=0.1)
        assert s32.dtype == torch.float32
        assert abs(float(s32) - float(s64)) <= 1e-5 * abs(float(s64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_solved_in_float32(dtype):
    # float16/bfloat16 points and weights: the value and the gradients come back in the
    # caller's dtype and equal the float32 computation on the same (rounded) inputs
    # (weights 1/32 are exact in half precision, so the masses agree)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 2, generator=g).to(dtype).requires_grad_()
    y = torch.rand(16, 2, generator=g).to(dtype)
    a = torch.full((32,), 1 / 32).to(dtype).requires_grad_()
    b = torch.full((16,), 1 / 16).to(dtype)
    x32, a32 = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    for fn in (lambda x_, y_, a_, b_: sinkhorn_divergence(x_, y_, a=a_, b=b_, eps=0.1),
               lambda x_, y_, a_, b_: entropic_ot_value(x_, y_, a=a_, b=b_, eps=0.1),
               lambda x_, y_, a_, b_: SinkhornLoss(blur=0.2)(a_, x_, b_, y_)):
        x.grad = a.grad = x32.grad = a32.grad = None
        s, s32 = fn(x, y, a, b), fn(x32, y.float(), a32, b.float())
        s.backward()
        s32.backward()
        assert s.dtype == x.grad.dtype == a.grad.dtype == dtype
        assert float(s.detach()) == float(s32.detach().to(dtype))
        torch.testing.assert_close(x.grad, x32.grad.to(dtype))
        torch.testing.assert_close(a.grad, a32.grad.to(dtype))


def test_half_precision_weights_of_different_masses_raise():
    # rounding is forgiven (masses equal to half precision); a real mismatch is reported
    x, y = torch.rand(8, 2).half(), torch.rand(4, 2).half()
    a, b = torch.full((8,), 1 / 8).half(), torch.full((4,), 0.3).half()
    with pytest.raises(InputError, match="total masses differ"):
        sinkhorn_divergence(x, y, a=a, b=b, eps=0.1)


def test_gradient_does_not_depend_on_the_solver_that_finished_the_cross_term():
    # the cross term is handed to Newton (slow Sinkhorn rate); its gradient comes from the
    # same builder and envelope VJP as the self-terms: equal to the gradient of three
    # independent converged solves, points and weights
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=D).requires_grad_()
    y = (x.detach() + 1.0).requires_grad_()
    a = torch.full((50,), 1 / 50, dtype=D, requires_grad=True)
    s = sinkhorn_divergence(x, y, a=a, eps=0.1, tol=1e-10)
    grads = torch.autograd.grad(s, (x, y, a))
    ref = 0.0
    for c, (u, v, w1, w2) in ((1.0, (x, y, a, None)), (-0.5, (x, x, a, a)), (-0.5, (y, y, None, None))):
        ref = ref + c * entrokit.solve(w1, w2, PointCloud(u, v), eps=0.1, method="ssns", tol=1e-11).value
    refs = torch.autograd.grad(ref, (x, y, a))
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)
