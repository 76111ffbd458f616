"""entrokit.solve: the dispatcher's own contract (eps / gamma for method="smooth")."""

import pytest
import torch

import entrokit
from entrokit import InputError


def _cost(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(12, 9, generator=g, dtype=torch.float64)


def test_smooth_takes_gamma_alone():
    """solve(..., method="smooth", gamma=0.1) raised TypeError (missing eps); it now equals
    smooth_ot with the same gamma, and eps=gamma is the same call."""
    C = _cost()
    res = entrokit.solve(None, None, C, method="smooth", gamma=0.1)
    ref = entrokit.smooth_ot(None, None, C, gamma=0.1)
    assert res.method == ref.method and bool(res.converged)
    torch.testing.assert_close(res.plan.to_dense() if res.plan.is_sparse else res.plan,
                               ref.plan.to_dense() if ref.plan.is_sparse else ref.plan)
    same = entrokit.solve(None, None, C, eps=0.1, method="smooth", gamma=0.1)
    assert float(same.transport_cost) == pytest.approx(float(res.transport_cost), rel=1e-12)


def test_eps_and_gamma_that_differ_are_refused():
    with pytest.raises(InputError, match="gamma=0.1 and eps=1.0 disagree: both name the regularization strength"):
        entrokit.solve(None, None, _cost(), eps=1.0, method="smooth", gamma=0.1)


def test_missing_eps_is_a_typed_error():
    with pytest.raises(InputError, match="solve needs eps, the regularization strength"):
        entrokit.solve(None, None, _cost())
    with pytest.raises(InputError, match="gamma= is the strength of method='smooth' only"):
        entrokit.solve(None, None, _cost(), gamma=0.1)
