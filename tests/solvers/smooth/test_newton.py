"""Quadratic-OT dual Newton (sparse direct solve), tiny weights, and top-k feasibility limits."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from entrokit import ConvergenceWarning, smooth_ot
from entrokit.solvers.omega import Entropy, SquaredL2
from entrokit.solvers.smooth import api as smooth_api
from entrokit.solvers.smooth import newton as smooth_newton

D = torch.float64


def _gauss(n, mean, std):
    x = torch.arange(n, dtype=D)
    h = torch.exp(-((x - mean) ** 2) / (2 * std**2))
    return h / h.sum()


# the sparse-direct back-end serves sparse (l2) plans; entropic plans are dense
@pytest.mark.parametrize(
    "method, reg",
    [(m, "l2") for m in ("direct", "dense", "cg", "auto")] + [(m, "entropy") for m in ("dense", "cg", "auto")],
)
def test_dual_newton_step_solves_the_shifted_hessian_system(method, reg):
    # the Schur-complement step must equal a dense solve of (H + mu I) d = -g, every back-end
    g = torch.Generator().manual_seed(3)
    R, K, gamma = 7, 5, 0.3
    T = torch.rand(2, K, R, generator=g, dtype=D) * (torch.rand(2, K, R, generator=g, dtype=D) > 0.6)
    grad = torch.randn(2, R + K, generator=g, dtype=D)
    mu = torch.tensor([[0.05], [0.2]], dtype=D)
    omega = SquaredL2(gamma) if reg == "l2" else Entropy(gamma)
    d, _ = smooth_newton.dual_newton_step(omega, T, grad, mu, method=method, rtol=1e-13)
    for k in range(2):
        W = ((T[k] > 0).to(D) if reg == "l2" else T[k]).T  # (R, K)
        H = torch.zeros(R + K, R + K, dtype=D)
        H[:R, :R] = torch.diag(W.sum(1))
        H[R:, R:] = torch.diag(W.sum(0))
        H[:R, R:] = W
        H[R:, :R] = W.T
        H = H / gamma + float(mu[k]) * torch.eye(R + K, dtype=D)
        ref = torch.linalg.solve(H, -grad[k])
        assert torch.allclose(d[k], ref, atol=1e-10, rtol=1e-10)


def test_dual_newton_default_matches_semi_dual():
    g = torch.Generator().manual_seed(0)
    C = torch.rand(30, 25, generator=g, dtype=D)
    a = torch.full((30,), 1 / 30, dtype=D)
    b = torch.full((25,), 1 / 25, dtype=D)
    rd = smooth_ot(a, b, C, reg="l2", gamma=0.05, formulation="dual", tol=1e-9)
    rs = smooth_ot(a, b, C, reg="l2", gamma=0.05, formulation="semi_dual", tol=1e-9)
    assert rd.method == "smooth" and rs.method == "smooth"  # a valid entrokit.solve method
    assert (rd.info["formulation"], rd.info["reg"], rd.info["solver"]) == ("dual", "l2", "newton")
    assert rs.info["formulation"] == "semi_dual"
    assert float(rd.marginal_error) <= 1e-9
    assert abs(float(rd.value) - float(rs.value)) < 1e-9
    assert torch.allclose(rd.plan.to_dense(), rs.plan.to_dense(), atol=1e-7)


def test_tiny_weights_reach_tolerance():
    # two Gaussians on 100 bins: weights down to 1e-56 used to stall Newton at ~1e-3
    n = 100
    a, b = _gauss(n, 20, 5), _gauss(n, 60, 10)
    assert float(a.min()) < 1e-50
    x = torch.arange(n, dtype=D)
    C = (x[:, None] - x[None, :]) ** 2
    C = C / C.max()
    r = smooth_ot(a, b, C, reg="l2", gamma=0.1, tol=1e-6)
    P = r.plan.to_dense()
    err = float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum())
    assert bool(r.converged) and err <= 1e-6
    assert float(P.min()) >= 0.0


@pytest.mark.parametrize("reg", ["l2", "entropy"])
def test_semi_dual_tiny_weights_reach_tolerance(reg):
    # semi-dual Newton from the dual solution: column sums exact, rows within tol
    n = 100
    a, b = _gauss(n, 20, 5), _gauss(n, 60, 10)
    x = torch.arange(n, dtype=D)
    C = (x[:, None] - x[None, :]) ** 2
    C = C / C.max()
    r = smooth_ot(a, b, C, reg=reg, gamma=0.1, formulation="semi_dual", tol=1e-6)
    P = r.plan.to_dense() if r.plan.is_sparse else r.plan
    assert bool(r.converged) and r.info["warm_start"] == "dual"
    assert float((P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum()) <= 1e-6
    assert float((P.sum(0) - b).abs().max()) <= 1e-12


def test_drop_negligible_keeps_mass_and_budget():
    w = torch.tensor([[0.5, 1e-30, 0.3, 1e-12, 0.2 - 1e-12 - 1e-30]], dtype=D)
    w2 = smooth_api._drop_negligible(w, 1e-9)
    assert float(w2[0, 1]) == 0.0 and float(w2[0, 3]) == 0.0
    assert abs(float(w2.sum()) - float(w.sum())) < 1e-15
    assert float((w2 - w).abs().sum()) <= 4e-9


def _best_k1_error(a, b):
    """Smallest L1 row-marginal error of any plan with one nonzero per column and exact
    column sums (brute force over all column -> row assignments)."""
    n, m = len(a), len(b)
    best = float("inf")
    for assign in itertools.product(range(n), repeat=m):
        rows = np.zeros(n)
        for j, i in enumerate(assign):
            rows[i] += b[j]
        best = min(best, float(np.abs(rows - a).sum()))
    return best


def test_topk_infeasible_marginals_are_reported_honestly():
    # k=1 with a not a sum of subsets of b: no 1-sparse plan meets both marginals, so the
    # semi-dual optimum is a kink and the recovered plan must keep a certified error
    a = torch.tensor([0.45, 0.35, 0.2], dtype=D)
    b = torch.tensor([0.3, 0.3, 0.25, 0.15], dtype=D)
    C = torch.tensor([[0.0, 0.4, 0.7, 0.2], [0.5, 0.1, 0.3, 0.6], [0.9, 0.6, 0.2, 0.4]], dtype=D)
    bound = _best_k1_error(a.numpy(), b.numpy())
    assert bound > 0.04
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", ConvergenceWarning)
        r = smooth_ot(a, b, C, reg="topk", k=1, gamma=0.1, max_iter=300)
    assert not bool(r.converged)
    assert any(issubclass(w.category, ConvergenceWarning) for w in rec)
    P = r.plan.to_dense()
    assert int((P > 0).sum(0).max()) <= 1
    assert float(r.marginal_error) >= bound - 1e-12
    assert torch.allclose(P.sum(0), b, atol=1e-12)  # semi-dual: column sums exact
