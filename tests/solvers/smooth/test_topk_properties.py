"""Property tests: the top-k plan has at most k nonzeros per column (row), always."""

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrokit import ConvergenceWarning, smooth_ot


@st.composite
def problems(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7))
    # costs from a tiny alphabet: many exact ties
    C = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n * m, max_size=n * m)),
                     dtype=torch.float64).reshape(n, m)
    a = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n)), dtype=torch.float64)
    b = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=m, max_size=m)), dtype=torch.float64)
    a[0] += 1.0
    b[0] += 1.0
    k = draw(st.integers(1, 8))
    gamma = draw(st.sampled_from([1e-3, 0.1, 10.0]))
    form = draw(st.sampled_from(["semi_dual", "dual"]))
    axis = draw(st.sampled_from(["columns", "rows"]))
    solver = draw(st.sampled_from(["lbfgs", "adam"]))
    return a, b, C, k, gamma, form, axis, solver


@settings(max_examples=60, deadline=None)
@given(problems())
def test_cardinality_exact(p):
    a, b, C, k, gamma, form, axis, solver = p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r = smooth_ot(a, b, C, reg="topk", k=k, gamma=gamma, formulation=form, sparse_axis=axis,
                      solver=solver, max_iter=30, normalize=True)
    P = r.plan.to_dense()
    nnz = (P != 0).sum(0 if axis == "columns" else 1)
    assert int(nnz.max()) <= k
    assert bool((P >= 0).all()) and bool(torch.isfinite(P).all())
    assert r.info["max_nnz"] <= k
