"""Tests of the sparsified Hessian and the Schur-complement solves of the Newton solvers
(:mod:`entrokit.solvers._newton_linalg`)."""

from __future__ import annotations

import pytest
import torch

from entrokit.solvers import _newton_linalg as nl

D = torch.float64


def _phi(al, be, C, a, b, eps):
    T = torch.exp((al[:, None] + be[None, :] - C) / eps)
    return a @ al + b @ be - eps * T.sum()


@pytest.mark.parametrize("storage", ["dense", "csr"])
def test_hessian_matches_finite_differences_and_sparsified_is_psd(storage, monkeypatch):
    # the kept block is stored dense above DENSE_ABOVE, as CSR below: both must agree
    monkeypatch.setattr(nl, "DENSE_ABOVE", 0.0 if storage == "dense" else 1.0)
    g = torch.Generator().manual_seed(3)
    C = torch.rand(7, 6, generator=g, dtype=D)
    a, b = torch.rand(7, generator=g, dtype=D) + 0.1, torch.rand(6, generator=g, dtype=D) + 0.1
    a, b = a / a.sum(), b / b.sum()
    eps = 0.3
    g = torch.Generator().manual_seed(4)
    al = 0.1 * torch.randn(7, generator=g, dtype=D)
    be = 0.1 * torch.randn(6, generator=g, dtype=D)
    T = torch.exp((al[:, None] + be[None, :] - C) / eps)
    K = nl.dense_hessian(T)
    # central finite differences of the analytic gradient (a - T1, b - T^T 1)
    z = torch.cat([al, be])
    h = 1e-6

    def grad(z):
        Tz = torch.exp((z[:7, None] + z[None, 7:] - C) / eps)
        return torch.cat([a - Tz.sum(1), b - Tz.sum(0)])

    H_fd = torch.stack([(grad(z + h * e) - grad(z - h * e)) / (2 * h) for e in torch.eye(13, dtype=D)], 1)
    assert torch.allclose(-K / eps, H_fd, atol=1e-7)
    # and the gradient itself is the derivative of the dual objective
    zz = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(_phi(zz[:7], zz[7:], C, a, b, eps), zz)
    assert torch.allclose(gz, grad(z), atol=1e-12)
    # gauge null vector
    gauge = torch.cat([torch.ones(7, dtype=D), -torch.ones(6, dtype=D)])
    assert (K @ gauge).abs().max() < 1e-14
    r, c = T.sum(1), T.sum(0)
    for sp, bound in [
        (nl.threshold_safe(T, r, c, delta=1.0), 1.0),
        (nl.threshold_density(T, r, c, density=0.3), None),
    ]:
        Ks = sp.to_dense_hessian()
        assert (sp._dense is not None) == (storage == "dense")
        v = torch.randn(13, generator=g, dtype=D)
        hx, hy = sp.hess_mv(v[:7], v[7:], 0.0)
        assert torch.allclose(torch.cat([hx, hy]), Ks @ v, atol=1e-14)
        w = torch.rand(7, generator=g, dtype=D)
        Ts = Ks[:7, 7:]
        assert torch.allclose(sp.col_sq_sum(w), (w.unsqueeze(1) * Ts * Ts).sum(0), atol=1e-15)
        assert torch.equal(Ks, Ks.T)
        assert torch.equal(torch.diagonal(Ks), torch.diagonal(K))  # exact diagonal kept
        assert torch.linalg.eigvalsh(Ks).min() > -1e-14  # PSD
        assert sp.nnz < T.numel()
        if bound is not None:  # safe rule: ||K - K_s||_2 <= delta
            assert torch.linalg.matrix_norm(K - Ks, ord=2) <= bound + 1e-15
        # the Schur-complement solves (CG and direct) solve the shifted system
        rhs = torch.randn(13, generator=g, dtype=D)
        for method in ("cg", "direct"):
            dx, dy, _, ok = nl.schur_solve(sp, rhs[:7], rhs[7:], 1e-3, method=method, rtol=1e-13, max_iter=500)
            assert ok
            assert torch.allclose((Ks + 1e-3 * torch.eye(13, dtype=D)) @ torch.cat([dx, dy]), rhs, atol=1e-10)
