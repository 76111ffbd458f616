"""smooth_ot: method name, honest convergence and init validation."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entrokit
from entrokit import InputError, smooth_ot
from ot_checks import check_ot_result

D = torch.float64


def _problem(n, m, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, m, generator=g, dtype=D)
    a = torch.rand(n, generator=g, dtype=D) + 0.1
    b = torch.rand(m, generator=g, dtype=D) + 0.1
    return (a / a.sum()).to(dtype), (b / b.sum()).to(dtype), C.to(dtype)


def _dense(P):
    return P.to_dense() if P.is_sparse else P


@pytest.mark.parametrize(
    "options",
    [
        dict(reg="l2"),
        dict(reg="l2", formulation="semi_dual"),
        dict(reg="entropy"),
        dict(reg="topk", k=2),
        dict(reg="l2", solver="lbfgs"),
    ],
)
def test_method_is_a_valid_solve_method_and_details_are_in_info(options):
    a, b, C = _problem(8, 6, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)  # top-k may miss the marginals
        res = smooth_ot(a, b, C, gamma=0.1, **options)
    assert res.method == "smooth" and res.method in entrokit.METHODS
    assert res.info["reg"] == options["reg"]
    assert res.info["formulation"] in ("dual", "semi_dual")
    assert res.info["solver"] in ("newton", "lbfgs", "adam")
    # the method name round-trips through entrokit.solve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        again = entrokit.solve(a, b, C, eps=0.1, method=res.method, **options)
    assert torch.allclose(_dense(again.plan), _dense(res.plan), atol=1e-10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 8),
    m=st.integers(1, 8),
    reg=st.sampled_from(["l2", "entropy", "topk"]),
    log_gamma=st.floats(-2.0, 0.5),
    double=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_converged_means_the_returned_plan_is_feasible(n, m, reg, log_gamma, double, seed):
    dtype = D if double else torch.float32
    a, b, C = _problem(n, m, seed, dtype)
    tol = 1e-8 if double else 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        res = smooth_ot(a, b, C, gamma=10.0**log_gamma, reg=reg, k=2 if reg == "topk" else None, tol=tol)
    assert res.plan.dtype == dtype
    err, _ = check_ot_result(res, a, b, C, tol, check_reported=False, cost_rtol=1e-6 if double else 1e-4, cost_atol=1e-12)
    assert res.info["certified_error"] == pytest.approx(err, rel=1e-6, abs=1e-15)


def test_float32_results_are_certified_in_float64():
    a, b, C = _problem(30, 20, 1, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
        res = smooth_ot(a, b, C, gamma=0.05, reg="l2", tol=1e-9)  # below float32 resolution
    P = _dense(res.plan).double()
    err = float((P.sum(-1) - a.double()).abs().sum() + (P.sum(-2) - b.double()).abs().sum())
    assert bool(res.converged) == (err <= 1e-9)
    res = smooth_ot(a, b, C, gamma=0.05, reg="l2", tol=1e-5)
    P = _dense(res.plan).double()
    assert bool(res.converged)
    assert float((P.sum(-1) - a.double()).abs().sum() + (P.sum(-2) - b.double()).abs().sum()) <= 1e-5


# ------------------------------------------------------------------ init validation
def test_init_round_trip():
    a, b, C = _problem(7, 5, 2)
    for formulation in ("dual", "semi_dual"):
        res = smooth_ot(a, b, C, gamma=0.1, formulation=formulation, tol=1e-10)
        warm = smooth_ot(a, b, C, gamma=0.1, formulation=formulation, tol=1e-10, init=res.info["x"])
        assert bool(warm.converged) and int(warm.n_iter) <= 2
        warm = smooth_ot(a, b, C, gamma=0.1, formulation=formulation, tol=1e-10, init=res.info["x"][0])
        assert bool(warm.converged)


@pytest.mark.parametrize(
    "formulation, sparse_axis, size", [("dual", "columns", 12), ("semi_dual", "columns", 7), ("semi_dual", "rows", 5)]
)
def test_init_wrong_size(formulation, sparse_axis, size):
    a, b, C = _problem(7, 5, 3)
    bad = torch.zeros(size + 1, dtype=D)
    with pytest.raises(InputError, match=rf"init has shape \({size + 1},\).*expects .*{size}.*Pass"):
        smooth_ot(a, b, C, gamma=0.1, formulation=formulation, sparse_axis=sparse_axis, init=bad)
    with pytest.raises(InputError, match="init has shape"):
        smooth_ot(a, b, C, gamma=0.1, formulation=formulation, sparse_axis=sparse_axis,
                  init=torch.zeros(2, size, dtype=D))  # batch of 2 for one problem


def test_init_wrong_type_and_values():
    a, b, C = _problem(7, 5, 4)
    with pytest.raises(TypeError, match=r"init must be a pair of tensors \(f, g\), an OTResult or a tensor; got list"):
        smooth_ot(a, b, C, gamma=0.1, init=[0.0] * 12)
    with pytest.raises(InputError, match="init potentials must have 7 and 5 entries"):
        smooth_ot(a, b, C, gamma=0.1, init=(torch.zeros(7, dtype=a.dtype), torch.zeros(4, dtype=a.dtype)))
    res = smooth_ot(a, b, C, gamma=0.1)
    again = smooth_ot(a, b, C, gamma=0.1, init=res)  # the common form: a previous result
    assert bool(again.converged) and int(again.n_iter.max()) <= int(res.n_iter.max())
    with pytest.raises(TypeError, match="floating-point"):
        smooth_ot(a, b, C, gamma=0.1, init=torch.zeros(12, dtype=torch.long))
    nan = torch.zeros(12, dtype=D)
    nan[3] = float("nan")
    with pytest.raises(InputError, match="init contains NaN or inf; expected finite"):
        smooth_ot(a, b, C, gamma=0.1, init=nan)
    with pytest.raises(InputError, match="NaN or inf"):
        smooth_ot(a, b, C, gamma=0.1, formulation="semi_dual", init=torch.full((7,), float("inf"), dtype=D))


def test_init_batched():
    g = torch.Generator().manual_seed(5)
    C = torch.rand(3, 6, 4, generator=g, dtype=D)
    a = torch.full((3, 6), 1 / 6, dtype=D)
    b = torch.full((3, 4), 1 / 4, dtype=D)
    res = smooth_ot(a, b, C, gamma=0.1, tol=1e-10)
    warm = smooth_ot(a, b, C, gamma=0.1, tol=1e-10, init=res.info["x"])
    assert bool(warm.converged.all())
    with pytest.raises(InputError, match=r"expects .* shape \(3, 10\)"):
        smooth_ot(a, b, C, gamma=0.1, init=res.info["x"][:2])
