"""The OT problem: weights and geometry validated once, uniform defaults, batch axes flattened and restored."""

import numpy as np
import pytest
import torch

import entrokit
from entrokit import DenseCost, InputError, PointCloud
from entrokit.geometry import base
from entrokit.problem import OTProblem, log_weights, make_problem

D = torch.float64


def _cost(*batch, n=4, m=3, dtype=D, seed=0):
    return torch.rand(*batch, n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_missing_weights_are_uniform_in_the_costs_dtype(dtype):
    pb = make_problem(None, None, _cost(2, dtype=dtype))
    assert isinstance(pb, OTProblem) and isinstance(pb.geometry, DenseCost)
    assert pb.a.dtype == pb.b.dtype == dtype and pb.batch_shape == (2,) and pb.batched
    torch.testing.assert_close(pb.a, torch.full((2, 4), 0.25, dtype=dtype), rtol=0, atol=0)
    torch.testing.assert_close(pb.b, torch.full((2, 3), 1 / 3, dtype=dtype), rtol=0, atol=0)
    x = torch.rand(5, 2, dtype=dtype)
    cloud = make_problem(None, None, PointCloud(x, x[:2]))
    assert cloud.shape == (5, 2) and float(cloud.a.sum()) == pytest.approx(1.0) and float(cloud.b[0]) == 0.5


def test_numpy_and_list_weights_take_the_costs_dtype():
    C = _cost(dtype=torch.float32)
    pb = make_problem(np.full(4, 0.25), [0.5, 0.25, 0.25], C)
    assert pb.a.dtype == pb.b.dtype == torch.float32
    torch.testing.assert_close(pb.b, torch.tensor([0.5, 0.25, 0.25]))
    assert make_problem(None, None, np.ones((4, 3))).a.dtype == torch.float64  # a NumPy cost


def test_with_batch_flattens_the_batch_axes_and_squeeze_batch_restores_them():
    a = torch.rand(2, 3, 4, dtype=D) + 0.1
    b = torch.rand(2, 3, 3, dtype=D) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    pb = make_problem(a, b, _cost(2, 3))
    flat = pb.with_batch()
    assert flat.a.shape == (6, 4) and flat.b.shape == (6, 3) and flat.geometry.batch_shape == (6,)
    assert flat.user_batch_shape == (2, 3) and flat.with_batch() is flat
    torch.testing.assert_close(flat.geometry.cost_matrix(), pb.geometry.cost_matrix().reshape(6, 4, 3))
    back = flat.squeeze_batch()
    assert back.user_batch_shape is None and back.squeeze_batch() is back
    assert torch.equal(back.a, a) and torch.equal(back.b, b) and back.geometry.batch_shape == (2, 3)
    single = make_problem(None, None, _cost()).with_batch()  # no batch axis: one of size 1
    assert single.a.shape == (1, 4) and single.user_batch_shape == ()
    assert single.squeeze_batch().a.shape == (4,)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_normalize_scales_each_problem_to_unit_mass(check_inputs):
    a = torch.tensor([[1.0, 2.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=D)
    b = torch.tensor([[1.0, 1.0, 2.0], [4.0, 2.0, 2.0]], dtype=D)
    pb = make_problem(a, b, _cost(2), normalize=True, check_inputs=check_inputs)
    torch.testing.assert_close(pb.a, a / a.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    torch.testing.assert_close(pb.b, b / b.sum(-1, keepdim=True), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("a", "b", "cost", "error", "match"),
    [
        (torch.full((4,), 0.25, dtype=D), torch.full((1, 3), 1 / 3, dtype=D), _cost(), InputError,
         r"same batch axes; got \(4,\) and \(1, 3\)"),
        (torch.full((5,), 0.2, dtype=D), None, _cost(), InputError, "shape mismatch: a has 5 entries"),
        (torch.full((3, 4), 0.25, dtype=D), torch.full((3, 3), 1 / 3, dtype=D), _cost(2), InputError,
         "batch mismatch"),
        (torch.tensor([0.5, 0.5, 0.25, -0.25], dtype=D), None, _cost(), InputError, "a has negative entries"),
        (torch.full((4,), 0.5, dtype=D), None, _cost(), InputError, "total masses differ.*normalize=True"),
        (None, None, torch.tensor([[0.0, float("nan")]], dtype=D), InputError, "NaN"),
        (torch.full((4,), 0.25, dtype=torch.float32), None, _cost(), InputError, "dtype"),
        ("uniform", None, _cost(), TypeError, "a must be a torch.Tensor, a NumPy array or a list"),
    ],
)
def test_bad_problems_raise_typed_errors(a, b, cost, error, match):
    with pytest.raises(error, match=match):
        make_problem(a, b, cost)


def test_log_weights_is_reexported_from_its_new_home():
    assert log_weights is base.log_weights
    w = torch.tensor([0.5, 0.0, 0.5], dtype=D)
    assert torch.equal(log_weights(w), torch.tensor([np.log(0.5), -np.inf, np.log(0.5)], dtype=D))
    assert entrokit.problem.make_problem is make_problem
