"""Top-k (sparsity-constrained) OT: compact evaluators, compact L-BFGS, warm start."""

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

from entrokit import smooth_ot
from entrokit.solvers.omega import TopKSquaredL2
from entrokit.solvers.smooth import lbfgs as smooth_lbfgs
from entrokit.solvers.smooth import objectives as S

D = torch.float64


def _internal(n, m, seed, B=2, ties=False, zero=False):
    g = torch.Generator().manual_seed(seed)
    L = torch.rand(B, m, n, generator=g, dtype=D)
    if ties:
        L = (L * 4).round() / 4  # many exact ties inside every column
    a = torch.rand(B, n, generator=g, dtype=D) + 0.2
    b = torch.rand(B, m, generator=g, dtype=D) + 0.2
    if zero:
        b[:, 0] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return L, a, b


@pytest.mark.parametrize("ties,zero", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compact_semi_dual_matches_generic(k, ties, zero):
    L, a, b = _internal(7, 5, k, ties=ties, zero=zero)
    reg = TopKSquaredL2(0.3, k)
    alpha = torch.randn(2, 7, dtype=D, generator=torch.Generator().manual_seed(1)) * 0.3
    obj, grad, T, _ = S._semi_dual(reg, alpha, a, b, L)
    F, g, (t, I) = S._topk_semi_dual_compact(reg.gamma, k, alpha, a, b, L, torch.empty_like(L))
    torch.testing.assert_close(F, -obj, rtol=0, atol=1e-14)
    torch.testing.assert_close(g, grad, rtol=0, atol=1e-14)
    Tc = S._compact_to_dense(t, I, 7)
    # same objective and marginals; under ties the chosen support may differ, never its size
    assert int((Tc > 0).sum(-1).max()) <= k
    torch.testing.assert_close(Tc.sum(-1), b, rtol=0, atol=1e-14)
    if not ties:
        torch.testing.assert_close(Tc, T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_compact_dual_matches_generic(k):
    L, a, b = _internal(6, 8, 10 + k)
    reg = TopKSquaredL2(0.2, k)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 14, dtype=D, generator=gen) * 0.5
    obj, ga, gb, T = S._dual(reg, x[:, :6], x[:, 6:], a, b, L)
    F, g, (t, I) = S._topk_dual_compact(reg.gamma, k, x, a, b, L)
    torch.testing.assert_close(F, -obj, rtol=0, atol=1e-14)
    torch.testing.assert_close(g, torch.cat([ga, gb], -1), rtol=0, atol=1e-14)
    torch.testing.assert_close(S._compact_to_dense(t, I, 6), T, rtol=0, atol=1e-14)


def _two_loop(g, Slist, Ylist):
    """Reference L-BFGS direction (Nocedal & Wright, Alg. 7.4), one problem."""
    q = g.clone()
    als = []
    for s, y in zip(reversed(Slist), reversed(Ylist)):
        rho = 1.0 / (s @ y)
        al = rho * (s @ q)
        q = q - al * y
        als.append((rho, al))
    q = q * ((Slist[-1] @ Ylist[-1]) / (Ylist[-1] @ Ylist[-1]))
    for (s, y), (rho, al) in zip(zip(Slist, Ylist), reversed(als)):
        q = q + (al - rho * (y @ q)) * s
    return -q


def test_compact_lbfgs_direction_equals_two_loop():
    gen = torch.Generator().manual_seed(3)
    n, h, B = 9, 5, 3
    A = torch.randn(B, n, n, dtype=D, generator=gen)
    H = A @ A.mT + n * torch.eye(n, dtype=D)  # SPD: every pair has s^T y > 0
    Sl = [torch.randn(B, n, dtype=D, generator=gen) for _ in range(h)]
    Yl = [torch.bmm(H, s.unsqueeze(-1)).squeeze(-1) for s in Sl]
    g = torch.randn(B, n, dtype=D, generator=gen)
    d = smooth_lbfgs.lbfgs_direction(g, smooth_lbfgs.lbfgs_memory(Sl, Yl))
    for i in range(B):
        ref = _two_loop(g[i], [s[i] for s in Sl], [y[i] for y in Yl])
        torch.testing.assert_close(d[i], ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(smooth_lbfgs.lbfgs_direction(g, None), -g)


def test_lbfgs_solves_a_smooth_quadratic_to_tolerance():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 12, 12, dtype=D, generator=gen)
    H = A @ A.mT + 0.1 * torch.eye(12, dtype=D)
    c = torch.randn(2, 12, dtype=D, generator=gen)

    def fun(x):
        Hx = torch.bmm(H, x.unsqueeze(-1)).squeeze(-1)
        gr = Hx - c
        return 0.5 * (x * Hx).sum(-1) - (c * x).sum(-1), gr, gr.abs().sum(-1)

    x, n_iter, conv, _ = smooth_lbfgs.lbfgs(fun, torch.zeros(2, 12, dtype=D), 1e-10, 500)
    assert bool(conv.all())
    torch.testing.assert_close(x, torch.linalg.solve(H, c), rtol=1e-8, atol=1e-8)


def _bench_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 2)), rng.random((n, 2)) + 0.5
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    C /= C.max()
    a = np.full(n, 1.0 / n)
    return a, a.copy(), C


def _l1_err(T, a, b):
    return float(np.abs(T.sum(1) - a).sum() + np.abs(T.sum(0) - b).sum())


@pytest.mark.parametrize("gamma", [0.1, 0.01])
@pytest.mark.parametrize("formulation", ["semi_dual", "dual"])
def test_topk_at_least_as_good_as_pot_sparsity_constrained(formulation, gamma):
    # same problem as the benchmark, small: the warm-started solver reaches a (convexified)
    # dual value at least POT's L-BFGS-B one, at POT's marginal error or better (+10%)
    ot = pytest.importorskip("ot")
    a, b, C = _bench_problem(80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = smooth_ot(*map(torch.from_numpy, (a, b, C)), reg="topk", k=2, gamma=gamma, formulation=formulation)
        with contextlib.redirect_stdout(io.StringIO()):
            fn = ot.smooth.smooth_ot_dual if formulation == "dual" else ot.smooth.smooth_ot_semi_dual
            Tp, log = fn(a, b, C, gamma, reg_type="sparsity_constrained", max_nz=2, log=True)
    reg = TopKSquaredL2(gamma, 2)
    L, at, bt = torch.from_numpy(C).T[None], torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    alpha_p = torch.as_tensor(np.asarray(log["alpha"]))[None]
    if formulation == "dual":
        pot_value = S._dual(reg, alpha_p, torch.as_tensor(np.asarray(log["beta"]))[None], at, bt, L)[0]
    else:
        pot_value = S._semi_dual(reg, alpha_p, at, bt, L)[0]
    assert float(r.value) >= float(pot_value) - 1e-12
    P = r.plan.to_dense().numpy()
    assert int((P > 0).sum(0).max()) <= 2
    assert r.info["warm_start"] == "l2"
    assert float(r.marginal_error) <= 1.1 * _l1_err(Tp, a, b)
    assert abs(float(r.marginal_error) - _l1_err(P, a, b)) < 1e-12
    # the dual value bounds the convexified primal from below: the returned plan's
    # primal value (with its small marginal error) stays close to it
    assert float(r.info["primal_value"]) == pytest.approx(float(r.value), rel=2e-2)


def test_topk_returns_quadratic_solution_when_it_is_k_sparse():
    # k >= the quadratic plan's largest column support: the l2 optimum is feasible and
    # optimal for the convexified problem, hence the exact top-k solution (1e-6 reached)
    a, b, C = map(torch.from_numpy, _bench_problem(60))
    r2 = smooth_ot(a, b, C, reg="l2", gamma=0.1)
    k = int(r2.info["max_nnz"])
    for form in ("semi_dual", "dual"):
        rk = smooth_ot(a, b, C, reg="topk", k=k, gamma=0.1, formulation=form)
        assert bool(rk.converged) and float(rk.marginal_error) <= 1e-6
        assert rk.info["solved_as"].startswith("l2")
        torch.testing.assert_close(rk.plan.to_dense(), r2.plan.to_dense(), rtol=0, atol=1e-9)


def test_topk_explicit_init_skips_warm_start():
    a, b, C = map(torch.from_numpy, _bench_problem(30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r0 = smooth_ot(a, b, C, reg="topk", k=2, gamma=0.1)
        r1 = smooth_ot(a, b, C, reg="topk", k=2, gamma=0.1, init=r0.info["x"].unsqueeze(0))
    assert "warm_start" not in r1.info
    assert float(r1.marginal_error) <= float(r0.marginal_error) * 1.5


@pytest.mark.parametrize("solver,other", [("auto", "newton"), ("lbfgs", "newton"), ("newton", "lbfgs")])
def test_warning_suggests_the_other_solver(solver, other):
    """The top-k warning suggested solver='lbfgs' to a run that used L-BFGS (the "auto"
    choice for top-k); it now names the semi-dual solver that did not run."""
    g = torch.Generator().manual_seed(0)
    C = torch.rand(30, 20, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = smooth_ot(None, None, C, reg="topk", gamma=0.1, k=1, solver=solver, max_iter=50)
    msgs = [str(w.message) for w in caught]
    assert not bool(res.converged) and len(msgs) == 1
    used = res.info["solver"]
    assert f"try solver='{other}'" in msgs[0] and f"solver='{used}'" not in msgs[0]
