"""Quadratic, sparsity-constrained and entropic OT by dual / semi-dual ascent."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import entrokit
from entrokit import ConvergenceWarning, InputError, smooth_ot
from entrokit.solvers.omega import (
    Entropy,
    SquaredL2,
    TopKSquaredL2,
    make_regularizer,
    sparse_simplex_projection,
)

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


# ---------------------------------------------------------------- regularizers
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
    with pytest.raises(InputError, match="k is given twice"):
        make_regularizer(SquaredL2(0.1), 0.1, k=2)
