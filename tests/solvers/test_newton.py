"""Tests of the Newton-accelerated Sinkhorn solvers (SNS and SSNS)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrokit
from entrokit import InputError, sinkhorn, sinkhorn_newton
from entrokit.solvers import _newton_linalg as nl
from entrokit.solvers import newton as newton_mod

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny problems: thread synchronisation only adds noise on shared CI machines
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _problem(n, m, seed, dtype=D, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, m) if batch is None else (batch, n, m)
    C = torch.rand(*shape, generator=g, dtype=D)
    a = torch.rand(*shape[:-1], generator=g, dtype=D) + 0.1
    b = torch.rand(*shape[:-2], m, generator=g, dtype=D) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return a.to(dtype), b.to(dtype), C.to(dtype)


def _marginal_error(P, a, b):
    return ((P.sum(-1) - a).abs().sum(-1) + (P.sum(-2) - b).abs().sum(-1))


@pytest.mark.parametrize("variant", ["ssns", "sns"])
def test_agrees_with_sinkhorn(variant):
    a, b, C = _problem(30, 25, 0)
    eps = 0.02
    ref = sinkhorn(a, b, C, eps, tol=1e-13, max_iter=200_000)
    res = sinkhorn_newton(a, b, C, eps, variant=variant, tol=1e-12)
    assert res.converged and res.method == variant
    assert torch.allclose(res.plan, ref.plan, atol=1e-8, rtol=0)
    assert abs(res.transport_cost.item() - ref.transport_cost.item()) < 1e-8
    assert abs(res.value.item() - ref.value.item()) < 1e-8
    # independent marginal check of the returned plan
    assert _marginal_error(res.plan, a, b).item() < 1e-11


def test_solve_dispatch_and_small_eps_random_assignment():
    g = torch.Generator().manual_seed(1)
    n = 120
    C = torch.rand(n, n, generator=g, dtype=D)
    a = torch.full((n,), 1.0 / n, dtype=D)
    for method in ("sns", "ssns"):
        res = entrokit.solve(a, a, C, eps=1 / 1200, method=method, tol=1e-8)
        assert res.method == method and bool(res.converged)
        assert _marginal_error(res.plan, a, a).item() <= 1e-8
        info = res.info
        assert info["n_newton"] >= 1
        assert res.n_iter.item() == info["n_sinkhorn"] + info["n_newton"]
        assert len(info["objective"]) == len(info["marginal_error"]) == len(info["time"])
    assert entrokit.solve(a, a, C, eps=1 / 1200).method == "ssns"  # the "auto" rule


def test_ssns_monotone_and_far_fewer_iterations_than_sinkhorn():
    g = torch.Generator().manual_seed(2)
    n = 60
    C = torch.rand(n, n, generator=g, dtype=D)
    a = torch.full((n,), 1.0 / n, dtype=D)
    eps, tol = 1e-2, 1e-9
    res = sinkhorn_newton(a, a, C, eps, tol=tol)
    obj = res.info["objective"]
    assert all(y >= x - 1e-12 * abs(x) for x, y in zip(obj, obj[1:]))  # ascent on the dual
    ref = sinkhorn(a, a, C, eps, tol=tol, eps_scaling=False, max_iter=200_000)
    assert bool(res.converged) and bool(ref.converged)
    assert 20 * res.n_iter.item() < ref.n_iter.item()
    err = res.info["marginal_error"]
    assert err[-1] < 1e-2 * err[-2]  # quadratic last step


def test_gauge_invariance():
    a, b, C = _problem(20, 20, 5)
    eps = 0.01
    res = sinkhorn_newton(a, b, C, eps, tol=1e-11)
    shifted = sinkhorn_newton(a, b, C, eps, tol=1e-11, init=(res.f + 3.0, res.g - 3.0))
    assert torch.allclose(shifted.plan, res.plan, atol=1e-12, rtol=0)
    assert abs(shifted.value.item() - res.value.item()) < 1e-10
    # a shifted optimum is still optimal: no Newton step is needed
    assert shifted.info["n_newton"] == 0


def test_float32_small_eps_is_finite():
    a, b, C = _problem(40, 30, 6, dtype=torch.float32)
    with warnings.catch_warnings():
        # float32 potentials resolve exponents to ~6e-8 |f| / eps = 6e-4 here: the plan
        # may miss tol=1e-5, and then the solver must say so
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        res = sinkhorn_newton(a, b, C, 1e-4, tol=1e-5)
    assert res.f.dtype == torch.float32 and res.plan.dtype == torch.float32
    for t in (res.f, res.g, res.plan, res.value, res.transport_cost):
        assert torch.isfinite(t).all()
    err = _marginal_error(res.plan.double(), a.double(), b.double()).item()
    assert err < 1e-4
    assert bool(res.converged) == (err <= 1e-5)  # converged only if the returned plan meets tol
    # at a tolerance float32 can carry, it converges
    res = sinkhorn_newton(a, b, C, 1e-4, tol=3e-4)
    assert bool(res.converged) and _marginal_error(res.plan.double(), a.double(), b.double()).item() <= 3e-4


def test_batched_equals_looped():
    a, b, C = _problem(15, 12, 7, batch=3)
    eps = 0.02
    res = sinkhorn_newton(a, b, C, eps, tol=1e-11)
    assert res.f.shape == (3, 15) and res.n_iter.shape == (3,)
    assert isinstance(res.info["n_newton"], list) and len(res.info["n_newton"]) == 3
    for k in range(3):
        one = sinkhorn_newton(a[k], b[k], C[k], eps, tol=1e-11)
        assert torch.allclose(res.plan[k], one.plan, atol=1e-13, rtol=0)
        assert res.n_iter[k] == one.n_iter
        assert torch.allclose(res.value[k], one.value, atol=1e-13)


def test_zero_weights_match_sinkhorn():
    a, b, C = _problem(12, 10, 8)
    a = a.clone()
    a[[2, 5]] = 0.0
    b = b.clone()
    b[3] = 0.0
    a, b = a / a.sum(), b / b.sum()
    eps = 0.05
    ref = sinkhorn(a, b, C, eps, tol=1e-13, max_iter=100_000)
    res = sinkhorn_newton(a, b, C, eps, tol=1e-12)
    assert torch.allclose(res.plan, ref.plan, atol=1e-10, rtol=0)
    assert res.plan[[2, 5]].abs().max() == 0 and res.plan[:, 3].abs().max() == 0
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    # potentials of empty rows are their soft c-transforms, as in Sinkhorn
    assert torch.allclose(res.f[[2, 5]] - res.f[0], ref.f[[2, 5]] - ref.f[0], atol=1e-8)


def test_implicit_gradient_gradcheck():
    a, b, C = _problem(4, 3, 9)
    eps = 0.5

    def fn(C, a, b):
        res = sinkhorn_newton(a, b, C, eps, tol=1e-14, grad="implicit", normalize=True)
        return res.transport_cost, res.plan

    inputs = (C.clone().requires_grad_(True), a.clone().requires_grad_(True), b.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_envelope_gradient_is_the_plan():
    a, b, C = _problem(8, 9, 10)
    Cg = C.clone().requires_grad_(True)
    res = sinkhorn_newton(a, b, Cg, 0.05, tol=1e-12)
    (gC,) = torch.autograd.grad(res.value, Cg)
    assert torch.allclose(gC, res.plan, atol=1e-12)


def test_failed_linear_solves_fall_back_to_sinkhorn(monkeypatch):
    a, b, C = _problem(20, 20, 11)
    real = nl.schur_solve
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] <= 2:  # two stalled/NaN solves, then normal ones
            dx, dy, it, _ = real(*args, **kw)
            return dx * float("nan"), dy, it, False
        return real(*args, **kw)

    monkeypatch.setattr(newton_mod, "schur_solve", flaky)
    res = sinkhorn_newton(a, b, C, 0.01, tol=1e-10)
    assert res.info["fallbacks"] == 2 and res.info["cg_failures"] == 2
    assert res.converged and torch.isfinite(res.f).all()
    assert "sinkhorn" in res.info["phase"]


def test_time_limit_and_nonconvergence_warning():
    a, b, C = _problem(30, 30, 12)
    with pytest.warns(entrokit.ConvergenceWarning, match="max_iter"):
        res = sinkhorn_newton(a, b, C, 1e-3, tol=1e-12, max_iter=1, warmup_max_iter=0)
    assert not bool(res.converged)
    assert torch.isfinite(res.plan).all()


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(2, 25),
    m=st.integers(2, 25),
    log_eps=st.floats(-2.5, 0.0),
    seed=st.integers(0, 10_000),
    variant=st.sampled_from(["ssns", "sns"]),
)
def test_property_random_problems(n, m, log_eps, seed, variant):
    a, b, C = _problem(n, m, seed)
    eps = 10.0 ** log_eps
    res = sinkhorn_newton(a, b, C, eps, variant=variant, tol=1e-9)
    assert bool(res.converged)
    P = res.plan
    assert (P >= 0).all()
    assert _marginal_error(P, a, b).item() <= 1e-9 * (1 + 1e-6)
    # dual value = primal value at the optimum (strong duality)
    kl = (P * torch.log(torch.where(P > 0, P, torch.ones_like(P)) / (a[:, None] * b[None, :]))).sum() - P.sum() + 1
    primal = (P * C).sum() + eps * kl
    assert math.isclose(primal.item(), res.value.item(), abs_tol=1e-7)


def test_bad_inputs():
    a, b, C = _problem(5, 4, 13)
    with pytest.raises(InputError, match="variant"):
        sinkhorn_newton(a, b, C, 0.1, variant="newton")
    with pytest.raises(InputError, match="unroll"):
        sinkhorn_newton(a, b, C, 0.1, grad="unroll")
    with pytest.raises(InputError, match="density"):
        sinkhorn_newton(a, b, C, 0.1, variant="sns", density=2.0)
    with pytest.raises(InputError, match="eps"):
        sinkhorn_newton(a, b, C, -1.0)
    with pytest.raises(InputError, match="linear_solver"):
        sinkhorn_newton(a, b, C, 0.1, linear_solver="lu")
    with pytest.raises(InputError, match="warmup_max_iter"):
        sinkhorn_newton(a, b, C, 0.1, warmup_max_iter=-1)
    with pytest.raises(InputError, match="shape mismatch"):
        sinkhorn_newton(a[:3], b, C, 0.1)
    with pytest.raises(InputError, match="NaN"):
        sinkhorn_newton(a, b, C * float("nan"), 0.1)
    with pytest.raises(TypeError, match="a must be a torch.Tensor, a NumPy array or a list"):
        sinkhorn_newton("uniform", b, C, 0.1)
    with pytest.raises(TypeError):
        sinkhorn_newton(a, b, C, 0.1, max_iter=2.5)


def _digits_w1(side=8, floor=1e-3):
    """Two load_digits images (8x8 grid), L1 ground cost on the grid scaled to [0, 1]."""
    sk = pytest.importorskip("sklearn.datasets")
    X = torch.as_tensor(sk.load_digits().images[:2], dtype=D)
    if side != 8:
        X = torch.nn.functional.interpolate(X[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    w = X.clamp_min(0).reshape(2, -1)
    w = w / w.sum(1, keepdim=True) + floor
    w = w / w.sum(1, keepdim=True)
    ii, jj = torch.meshgrid(torch.arange(side, dtype=D), torch.arange(side, dtype=D), indexing="ij")
    pts = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1)
    C = (pts[:, None] - pts[None]).abs().sum(-1)
    return w[0].contiguous(), w[1].contiguous(), C / C.max()


def test_ssns_converges_on_w1_grid_at_small_eps():
    # W1 on a pixel grid has a non-unique OT solution: Sinkhorn needs > 1e6 iterations
    # here and plain Newton steps are damped to a few percent; SSNS must still converge
    a, b, C = _digits_w1()
    eps = 1 / 1200
    res = sinkhorn_newton(a, b, C, eps, tol=1e-11)
    assert bool(res.converged) and res.info["fallbacks"] == 0
    assert res.info["eps_schedule"] and res.info["eps_schedule"][-1] == eps  # continuation used
    assert all(x > y for x, y in zip(res.info["eps_schedule"], res.info["eps_schedule"][1:]))
    P = res.plan
    # optimality certificate, independent of the solver: a Gibbs-form plan
    # P = a b^T exp((f + g - C) / eps) with exact marginals is the entropic optimum
    gibbs = a[:, None] * b[None, :] * torch.exp((res.f[:, None] + res.g[None, :] - C) / eps)
    assert torch.allclose(P, gibbs, atol=1e-14, rtol=1e-12)
    assert _marginal_error(P, a, b).item() < 1e-11
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    # without continuation the trust-region shift alone still converges (more steps)
    direct = sinkhorn_newton(a, b, C, eps, tol=1e-11, eps_scaling=False)
    assert bool(direct.converged) and not direct.info["eps_schedule"]
    assert torch.allclose(direct.plan, P, atol=1e-10, rtol=0)


def test_ssns_matches_sinkhorn_plan_on_w1_grid():
    a, b, C = _digits_w1()
    eps = 1e-2  # where Sinkhorn reaches 1e-12 in a few thousand iterations
    ref = sinkhorn(a, b, C, eps, tol=1e-12, max_iter=200_000)
    for variant in ("ssns", "sns"):
        res = sinkhorn_newton(a, b, C, eps, variant=variant, tol=1e-12, eps_scaling=True)
        assert bool(res.converged)
        assert torch.allclose(res.plan, ref.plan, atol=1e-10, rtol=0)
        assert abs(res.value.item() - ref.value.item()) < 1e-10


def test_sns_increases_density_when_progress_stalls():
    a, b, C = _digits_w1()
    eps = 1e-3
    res = sinkhorn_newton(a, b, C, eps, variant="sns", tol=1e-10)
    assert bool(res.converged)
    assert res.info["density_increases"] >= 1
    dens = res.info["density"]
    assert max(dens) > 2 * dens[0]  # more of the Hessian kept than the paper's 2/n


def test_eps_scaling_option():
    a, b, C = _problem(10, 10, 14)
    with pytest.raises(InputError, match="eps_scaling"):
        sinkhorn_newton(a, b, C, 0.1, eps_scaling="yes")
    res = sinkhorn_newton(a, b, C, 1e-3, tol=1e-10, eps_scaling=True)
    assert bool(res.converged) and len(res.info["eps_schedule"]) >= 2
    assert sinkhorn_newton(a, b, C, 1e-3, tol=1e-10, eps_scaling=False).info["eps_schedule"] == []


@pytest.mark.parametrize("linear_solver", ["cg", "direct"])
def test_sparse_implicit_gradient_matches_core_dense_implicit(linear_solver):
    a, b, C = _problem(12, 10, 15)
    eps = 0.05
    W = torch.randn(12, 10, generator=torch.Generator().manual_seed(16), dtype=D)
    outputs = {
        "plan": lambda r: (r.plan * W).sum(),
        "transport_cost": lambda r: r.transport_cost,
        "potentials": lambda r: r.f[0] - r.g[1],
    }
    for name, out in outputs.items():
        grads = []
        for solve in ("newton", "sinkhorn"):
            leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
            if solve == "newton":
                r = sinkhorn_newton(leaves[1], leaves[2], leaves[0], eps, tol=1e-13, grad="implicit",
                                    linear_solver=linear_solver)
                assert r.grad == "implicit"
            else:  # the core's dense adjoint CG
                r = sinkhorn(leaves[1], leaves[2], leaves[0], eps, tol=1e-13, grad="implicit", max_iter=100_000)
            grads.append(torch.autograd.grad(out(r), leaves))
        (gC, ga, gb), (rC, ra, rb) = grads
        assert torch.allclose(gC, rC, atol=1e-10, rtol=0), name
        # d/da and d/db agree up to the all-ones direction: changing the total mass of
        # one marginal alone leaves the balanced problem, so that component is a
        # convention (ours: the minimum-norm adjoint, orthogonal to the gauge)
        assert torch.allclose(ga - ga.mean(), ra - ra.mean(), atol=1e-10, rtol=0), name
        assert torch.allclose(gb - gb.mean(), rb - rb.mean(), atol=1e-10, rtol=0), name


def test_adjoint_solve_residual_at_a_newton_solution():
    # the one implicit-gradient adjoint (Jacobi-PCG on J, solvers/implicit.py) at a Newton optimum
    from entrokit.geometry import DenseCost
    from entrokit.solvers.implicit import adjoint_solve

    a, b, C = _problem(40, 30, 17)
    eps = 1e-2
    res = sinkhorn_newton(a, b, C, eps, tol=1e-12)
    P = res.plan
    g = torch.Generator().manual_seed(18)
    x, y = torch.randn(40, generator=g, dtype=D), torch.randn(30, generator=g, dtype=D)
    lx, ly = adjoint_solve(DenseCost(C[None]), res.f[None], res.g[None], a[None], b[None], eps, x[None], y[None])
    lx, ly = lx[0], ly[0]
    # J lam equals the rhs projected onto range(J) (gauge component removed)
    p = (x.sum() - y.sum()) / 70
    Jx = (P.sum(1) * lx + P @ ly) / eps
    Jy = (P.t() @ lx + P.sum(0) * ly) / eps
    assert torch.allclose(Jx, x - p, atol=1e-9) and torch.allclose(Jy, y + p, atol=1e-9)


def test_internal_entry_takes_the_public_defaults():
    # newton_problem (what solve() and the divergence call) fills the options it is not given
    # from sinkhorn_newton's signature: the same run, the same iterates
    from entrokit._validation import solver_options_of
    from entrokit.problem import make_problem

    assert set(newton_mod._OPTION_DEFAULTS) == solver_options_of("ssns") - {"grad", "init"}
    assert newton_mod._OPTION_DEFAULTS["tol"] == 1e-8 and newton_mod._OPTION_DEFAULTS["variant"] == "ssns"
    g = torch.Generator().manual_seed(3)
    C = torch.rand(30, 20, generator=g, dtype=torch.float64)
    a = torch.rand(30, generator=g, dtype=torch.float64)
    b = torch.rand(20, generator=g, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    res = sinkhorn_newton(a, b, C, 1e-2)
    f, gg, n_iter, _, _, info = newton_mod.newton_problem(make_problem(a, b, C).with_batch(), 1e-2)
    assert int(n_iter[0]) == int(res.n_iter) and info["n_newton"] == res.info["n_newton"]
    torch.testing.assert_close(f[0] - f[0, 0], res.f - res.f[0], rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match=r"newton_problem got unknown option\(s\) \['tolerance'\]"):
        newton_mod.newton_problem(make_problem(a, b, C).with_batch(), 1e-2, tolerance=1e-3)
