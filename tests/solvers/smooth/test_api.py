"""Quadratic, sparsity-constrained and entropic OT by dual / semi-dual ascent."""

import warnings

import numpy as np
import pytest
import torch

import entrokit
from entrokit import ConvergenceWarning, InputError, smooth_ot

D = torch.float64


def _problem(n, m, seed, B=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, m) if B is None else (B, n, m)
    C = torch.rand(shape, generator=g, dtype=D)
    a = torch.rand(shape[:-1], generator=g, dtype=D) + 0.5
    b = torch.rand(shape[:-2] + (m,), generator=g, dtype=D) + 0.5
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return a, b, C


# ---------------------------------------------------------------- solvers
@pytest.mark.parametrize("reg", ["l2", "entropy"])
def test_dual_and_semi_dual_agree(reg):
    a, b, C = _problem(12, 9, 0)
    res = {}
    for form, solver in [("semi_dual", "newton"), ("dual", "newton"), ("semi_dual", "lbfgs"), ("dual", "lbfgs")]:
        r = smooth_ot(a, b, C, reg=reg, gamma=0.2, formulation=form, solver=solver, tol=1e-9)
        assert bool(r.converged) and float(r.marginal_error) <= 1e-9
        res[form, solver] = r
    ref = res["semi_dual", "newton"]
    for r in res.values():
        torch.testing.assert_close(r.value, ref.value, atol=1e-9, rtol=0)
        torch.testing.assert_close(r.plan.to_dense() if r.plan.is_sparse else r.plan,
                                   ref.plan.to_dense() if ref.plan.is_sparse else ref.plan, atol=1e-7, rtol=0)
        # strong duality for the convex regularizers: dual value = primal value
        torch.testing.assert_close(r.info["primal_value"], r.value, atol=1e-7, rtol=0)


def test_l2_matches_pot():
    ot = pytest.importorskip("ot")
    a, b, C = _problem(15, 11, 1)
    gamma = 0.05
    r = smooth_ot(a, b, C, reg="l2", gamma=gamma, tol=1e-10)
    G = ot.smooth.smooth_ot_dual(a.numpy(), b.numpy(), C.numpy(), gamma, reg_type="l2", stopThr=1e-14, numItermax=20000)
    pot_obj = float((G * C.numpy()).sum() + 0.5 * gamma * (G ** 2).sum())
    assert abs(float(r.info["primal_value"]) - pot_obj) < 1e-6
    assert abs(float(r.value) - pot_obj) < 1e-6
    np.testing.assert_allclose(r.plan.to_dense().numpy(), G, atol=1e-5)


def test_entropy_matches_sinkhorn_plan():
    # gamma * sum t log t and eps * KL(P | a x b) differ by a constant on U(a, b)
    a, b, C = _problem(10, 8, 2)
    r = smooth_ot(a, b, C, reg="entropy", gamma=0.1, tol=1e-10)
    s = entrokit.sinkhorn(a, b, C, eps=0.1, tol=1e-12)
    torch.testing.assert_close(r.plan, s.plan, atol=1e-9, rtol=0)


def test_k1_is_unregularized_ot():
    ot = pytest.importorskip("ot")
    n = 8
    g = torch.Generator().manual_seed(7)
    C = torch.rand(n, n, generator=g, dtype=D)
    a = torch.full((n,), 1 / n, dtype=D)
    lp = float(ot.emd2(a.numpy(), a.numpy(), C.numpy()))
    gamma = 0.05
    for form in ["dual", "semi_dual"]:
        r = smooth_ot(a, a, C, reg="topk", k=1, gamma=gamma, formulation=form, tol=1e-9)
        assert r.info["max_nnz"] == 1
        assert abs(float(r.transport_cost) - lp) < 1e-8
        # the convexified 1-sparse regularizer is the constant gamma/2 sum_j b_j^2
        assert abs(float(r.value) - (lp + 0.5 * gamma * float((a * a).sum()))) < 1e-8


def test_large_k_is_quadratic_ot():
    a, b, C = _problem(9, 7, 3)
    r2 = smooth_ot(a, b, C, reg="l2", gamma=0.1, tol=1e-10)
    rk = smooth_ot(a, b, C, reg="topk", k=9, gamma=0.1, tol=1e-10)
    torch.testing.assert_close(rk.value, r2.value, atol=1e-10, rtol=0)
    torch.testing.assert_close(rk.plan.to_dense(), r2.plan.to_dense(), atol=1e-8, rtol=0)


def test_topk_sparsity_and_rows_axis():
    a, b, C = _problem(20, 15, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rc = smooth_ot(a, b, C, reg="topk", k=3, gamma=0.05, max_iter=200)
        rr = smooth_ot(a, b, C, reg="topk", k=3, gamma=0.05, sparse_axis="rows", max_iter=200)
    P, Q = rc.plan.to_dense(), rr.plan.to_dense()
    assert int((P > 0).sum(0).max()) <= 3 and rc.info["max_nnz"] <= 3
    assert int((Q > 0).sum(1).max()) <= 3
    # semi-dual: the constrained axis' marginal is exact
    torch.testing.assert_close(P.sum(0), b, atol=1e-12, rtol=0)
    torch.testing.assert_close(Q.sum(1), a, atol=1e-12, rtol=0)
    # the sparse plan is better than independent coupling and worse than the LP bound
    assert float(rc.transport_cost) < float((a[:, None] * b[None] * C).sum())


def test_batched_matches_loop_and_solve_dispatch():
    a, b, C = _problem(10, 8, 5, B=3)
    rb = smooth_ot(a, b, C, reg="l2", gamma=0.1, formulation="dual", tol=1e-9)
    assert rb.value.shape == (3,) and rb.plan.shape == (3, 10, 8)
    for i in range(3):
        ri = entrokit.solve(a[i], b[i], C[i], eps=0.1, method="smooth", reg="l2", formulation="dual", tol=1e-9)
        torch.testing.assert_close(rb.value[i], ri.value, atol=1e-10, rtol=0)
        torch.testing.assert_close(rb.plan.to_dense()[i], ri.plan.to_dense(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("form", ["semi_dual", "dual"])
def test_envelope_gradients_finite_differences(form):
    a, b, C = _problem(7, 6, 6)
    gamma = 0.2
    Cg, ag, bg = C.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
    r = smooth_ot(ag, bg, Cg, reg="l2", gamma=gamma, formulation=form, tol=1e-11)
    gC, ga, gb = torch.autograd.grad(r.value, (Cg, ag, bg))
    torch.testing.assert_close(gC, r.plan.to_dense(), atol=1e-9, rtol=0)
    g = torch.Generator().manual_seed(0)
    h = 1e-5

    def val(a_, b_, C_):
        return float(smooth_ot(a_, b_, C_, reg="l2", gamma=gamma, formulation=form, tol=1e-11).value)

    E = torch.randn(7, 6, generator=g, dtype=D)
    fd = (val(a, b, C + h * E) - val(a, b, C - h * E)) / (2 * h)
    assert abs(fd - float((gC * E).sum())) < 1e-6
    # weights: directions that keep the masses equal
    va = torch.randn(7, generator=g, dtype=D)
    va -= va.mean()
    fd = (val(a + h * va, b, C) - val(a - h * va, b, C)) / (2 * h)
    assert abs(fd - float((ga * va).sum())) < 1e-6
    vb = torch.randn(6, generator=g, dtype=D)
    vb -= vb.mean()
    fd = (val(a, b + h * vb, C) - val(a, b - h * vb, C)) / (2 * h)
    assert abs(fd - float((gb * vb).sum())) < 1e-6


def test_dtype_zero_weights_and_sparse_layout():
    a, b, C = _problem(8, 6, 8)
    a = a.clone()
    a[2] = 0.0
    a = a / a.sum()
    r = smooth_ot(a.float(), b.float(), C.float(), reg="l2", gamma=0.1, tol=1e-5)
    assert r.value.dtype == torch.float32 and r.f.dtype == torch.float32
    assert r.plan.is_sparse and r.plan.dtype == torch.float32
    P = r.plan.to_dense()
    assert float(P[2].abs().sum()) == 0.0
    assert float(r.marginal_error) <= 1e-5
    re = smooth_ot(a, b, C, reg="entropy", gamma=0.5)
    assert not re.plan.is_sparse


def test_adam_mode_never_warns_and_reports():
    a, b, C = _problem(10, 8, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = smooth_ot(a, b, C, reg="topk", k=2, gamma=1.0, solver="adam", max_iter=5)
    assert int(r.n_iter) == 5 and r.errors.shape == (6,)


def test_non_convergence_warns():
    a, b, C = _problem(10, 8, 10)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        r = smooth_ot(a, b, C, reg="l2", gamma=0.01, solver="lbfgs", max_iter=2)
    assert not bool(r.converged)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(reg="topk", gamma=0.1, k=0), InputError, "k must be an int >= 1"),
        (dict(reg="topk", gamma=0.1, k=2.5), TypeError, "k must be an int"),
        (dict(reg="topk", gamma=0.1), InputError, "needs k"),
        (dict(reg="l2", gamma=0.1, k=3), InputError, "only applies to reg='topk'"),
        (dict(reg="l2", gamma=0.0), InputError, "gamma must be a finite number > 0"),
        (dict(reg="l2", gamma=-1.0), InputError, "gamma must be a finite number > 0"),
        (dict(reg="l2"), InputError, "needs gamma"),
        (dict(reg="kl", gamma=0.1), InputError, "reg must be one of"),
        (dict(reg="l2", gamma=0.1, formulation="primal"), InputError, "formulation must be one of"),
        (dict(reg="l2", gamma=0.1, sparse_axis="both"), InputError, "sparse_axis must be one of"),
        (dict(reg="l2", gamma=0.1, solver="sgd"), InputError, "solver must be one of"),
        (dict(reg="l2", gamma=0.1, tol=0), InputError, "tol must be"),
        (dict(reg=3, gamma=0.1), TypeError, "reg must be a string"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    a, b, C = _problem(4, 3, 11)
    with pytest.raises(exc, match=match):
        smooth_ot(a, b, C, **kwargs)


def test_bad_data():
    a, b, C = _problem(4, 3, 12)
    with pytest.raises(InputError, match="shape mismatch"):
        smooth_ot(a[:3], b, C, gamma=0.1)
    with pytest.raises(InputError, match="total masses differ"):
        smooth_ot(a * 2, b, C, gamma=0.1)
    with pytest.raises(TypeError, match="must be a torch.Tensor, a NumPy array or a list"):
        smooth_ot("uniform", b, C, gamma=0.1)
    with pytest.raises(InputError, match="disagree"):
        smooth_ot(a, b, C, 0.2, gamma=0.1)

