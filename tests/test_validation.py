"""Every bad input raises a typed error whose message says what to fix."""

import importlib

import pytest
import torch

import entrokit
from entrokit import InputError, PointCloud
from generators import random_problem


@pytest.fixture
def prob():
    return random_problem(4, 5, seed=0)


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), float("inf")])
def test_eps_must_be_positive(prob, bad):
    a, b, C = prob
    with pytest.raises(InputError, match="eps must be a finite number > 0"):
        entrokit.sinkhorn(a, b, C, bad)
    with pytest.raises(InputError, match="eps must be a finite number > 0"):
        entrokit.solve(a, b, C, eps=bad)


def test_eps_type(prob):
    a, b, C = prob
    with pytest.raises(TypeError, match="eps must be a positive real number"):
        entrokit.sinkhorn(a, b, C, "0.1")


def test_negative_weights(prob):
    a, b, C = prob
    a = a.clone()
    a[0] = -0.1
    with pytest.raises(InputError, match="a has negative entries"):
        entrokit.sinkhorn(a, b, C, 0.1)


@pytest.mark.parametrize("val,msg", [(float("nan"), "contains NaN"), (float("inf"), "contains an infinite value")])
def test_nonfinite_weights_and_costs(prob, val, msg):
    a, b, C = prob
    b2 = b.clone()
    b2[1] = val
    with pytest.raises(InputError, match=f"b {msg}"):
        entrokit.sinkhorn(a, b2, C, 0.1)
    C2 = C.clone()
    C2[0, 0] = val
    with pytest.raises(InputError, match=f"cost {msg}"):
        entrokit.sinkhorn(a, b, C2, 0.1)


def test_unequal_masses(prob):
    a, b, C = prob
    with pytest.raises(InputError, match="total masses differ.*normalize=True"):
        entrokit.sinkhorn(2 * a, b, C, 0.1)
    entrokit.sinkhorn(2 * a, b, C, 0.1, normalize=True)


def test_zero_mass(prob):
    a, b, C = prob
    with pytest.raises(InputError, match="zero total mass"):
        entrokit.sinkhorn(torch.zeros_like(a), b, C, 0.1)


def test_shape_mismatch(prob):
    a, b, C = prob
    with pytest.raises(InputError, match="expected a of length 4 and b of length 5"):
        entrokit.sinkhorn(b, a, C, 0.1)
    with pytest.raises(InputError, match="cost must have shape"):
        entrokit.sinkhorn(a, b, C[0], 0.1)
    with pytest.raises(InputError, match="batch mismatch"):
        entrokit.sinkhorn(a, b, C[None, None], 0.1)
    with pytest.raises(InputError, match="a and b must have shapes"):
        entrokit.sinkhorn(a[None], b, C, 0.1)


def test_batch_mismatch():
    a, b, C = random_problem(4, 5, batch=2)
    with pytest.raises(InputError, match="batch mismatch"):
        entrokit.sinkhorn(a, b, C[0], 0.1)


def test_dtype_and_device_mismatch(prob):
    a, b, C = prob
    with pytest.raises(InputError, match="dtype mismatch.*cast them"):
        entrokit.sinkhorn(a.float(), b, C, 0.1)
    # points on another device than the weights (meta: the one other device of a CPU machine)
    x, y = torch.empty(4, 2, device="meta", dtype=torch.float64), torch.empty(5, 2, device="meta", dtype=torch.float64)
    with pytest.raises(InputError, match="device mismatch: a is on cpu but x is on meta"):
        entrokit.sinkhorn(a, b, PointCloud(x, y), 0.1)


def test_types(prob):
    a, b, C = prob
    with pytest.raises(TypeError, match="a must be a torch.Tensor, a NumPy array or a list"):
        entrokit.sinkhorn("uniform", b, C, 0.1)
    with pytest.raises(TypeError, match="floating dtype"):
        entrokit.sinkhorn(torch.ones(4, dtype=torch.int64), b, C, 0.1)
    with pytest.raises(TypeError, match="cost must be a torch.Tensor or NumPy array"):
        entrokit.sinkhorn(a, b, {"C": C}, 0.1)
    with pytest.raises(TypeError, match="must hold numbers"):
        entrokit.sinkhorn(["x"] * 4, b, C, 0.1)
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="float32 or float64.*cast the results back"):
            entrokit.sinkhorn(a.to(half), b.to(half), C.to(half), 0.1)
    # lists and NumPy arrays are converted (to the cost's dtype and device)
    ref = entrokit.sinkhorn(a, b, C, 0.1)
    res = entrokit.sinkhorn(a.tolist(), b.numpy(), C, 0.1)
    torch.testing.assert_close(res.plan, ref.plan)


def test_empty_inputs():
    with pytest.raises(InputError, match="is empty.*expected at least one entry"):
        entrokit.sinkhorn(torch.ones(0, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                          torch.ones(0, 3, dtype=torch.float64), 0.1)


def test_bad_options(prob):
    a, b, C = prob
    with pytest.raises(InputError, match="grad must be one of"):
        entrokit.sinkhorn(a, b, C, 0.1, grad="autodiff")
    with pytest.raises(InputError, match="unknown method 'foo'"):
        entrokit.solve(a, b, C, eps=0.1, method="foo")
    with pytest.raises(InputError, match="max_iter must be an int >= 1"):
        entrokit.sinkhorn(a, b, C, 0.1, max_iter=0)
    with pytest.raises(InputError, match="tol must be a finite number > 0"):
        entrokit.sinkhorn(a, b, C, 0.1, tol=-1.0)
    with pytest.raises(InputError, match="eps_scaling must be True, False or 'auto'"):
        entrokit.sinkhorn(a, b, C, 0.1, eps_scaling="yes")
    with pytest.raises(InputError, match="scaling_decay must lie in"):
        entrokit.sinkhorn(a, b, C, 0.1, scaling_decay=1.5)
    with pytest.raises(InputError, match="init potentials must match"):
        entrokit.sinkhorn(a, b, C, 0.1, init=(torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)))
    with pytest.raises(InputError, match="grad='unroll'"):
        entrokit.sinkhorn(a, b, C, 0.1, grad="unroll", lse_mode=False)


def test_pointcloud_validation():
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="same point dimension"):
        PointCloud(x, torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="cost must be 'sqeuclidean', 'euclidean', 'pnorm' or a callable"):
        PointCloud(x, x, cost="cosine")
    with pytest.raises(InputError, match="chunk_size must be a positive int"):
        PointCloud(x, x, chunk_size=0)
    with pytest.raises(InputError, match="Add a feature axis"):
        PointCloud(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    bad = PointCloud(x, x, cost=lambda u, v: torch.zeros(2, 2, dtype=torch.float64))
    w = torch.full((4,), 0.25, dtype=torch.float64)
    with pytest.raises(InputError, match="cost callable returned shape"):
        entrokit.sinkhorn(w, w, bad, 0.1)


def test_check_inputs_false_skips_value_checks(prob):
    a, b, C = prob
    # unequal masses are not checked (the caller promised clean inputs); metadata still is
    entrokit.sinkhorn(a, b, C, 0.1, check_inputs=False)
    with pytest.raises(InputError, match="shape mismatch"):
        entrokit.sinkhorn(b, a, C, 0.1, check_inputs=False)


def test_one_validation_module_for_both_pillars():
    from entrokit import _validation

    with pytest.raises(ModuleNotFoundError):  # the former shim is gone: one module, one import path
        importlib.import_module("entrokit.regularizers._checks")
    with pytest.raises(InputError, match=r"lam must be a finite number > 0, got -1; pass a positive value such as lam=3"):
        _validation.check_positive(-1, "lam", example="lam=3")
    with pytest.raises(TypeError, match=r"lam must be a positive real number, got str '1'"):
        _validation.check_positive("1", "lam")
    assert _validation.check_positive(torch.tensor(2.0), "lam") == 2.0


def test_check_choice_compares_types_and_values():
    from entrokit._validation import check_choice

    assert check_choice("sum", "reduction", ("mean", "sum")) == "sum"
    assert check_choice(None, "cv", (None, "x")) is None
    for bad in (1, torch.tensor(1.0), "Sum", ["sum"]):
        with pytest.raises(InputError, match=r"must be one of 'mean', 'sum'; got"):
            check_choice(bad, "reduction", ("mean", "sum"))
    with pytest.raises(InputError, match="flag must be one of True, 'auto'; got 1"):
        check_choice(1, "flag", (True, "auto"))


def _np_int_entry_points():
    import numpy as np

    from entrokit.solvers.multiscale import multiscale_sinkhorn

    i = np.int64
    C = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = torch.full((5,), 0.2, dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    x, y = torch.rand(6, 2), torch.rand(5, 2)
    return {
        "sinkhorn": lambda: entrokit.sinkhorn(a, b, C, 0.1, max_iter=i(100)),
        "solve": lambda: entrokit.solve(a, b, C, eps=0.1, max_iter=i(100)),
        "sinkhorn_newton": lambda: entrokit.sinkhorn_newton(a, b, C, 0.1, max_iter=i(100)),
        "smooth_ot": lambda: entrokit.smooth_ot(a, b, C, gamma=0.5, max_iter=i(100)),
        "multiscale": lambda: multiscale_sinkhorn(torch.full((6,), 1 / 6), torch.full((5,), 0.2), x, y, 0.1,
                                                  max_iter=i(100)),
        "PointCloud": lambda: entrokit.sinkhorn(torch.full((6,), 1 / 6), torch.full((5,), 0.2),
                                                PointCloud(x, y, chunk_size=i(2)), 0.1),
    }


@pytest.mark.parametrize("name", list(_np_int_entry_points()))
def test_numpy_integers_are_accepted_for_integer_options(name):
    # max_iter=np.int64(100) was a TypeError: any integral number is an int option
    res = _np_int_entry_points()[name]()
    assert bool(torch.as_tensor(res.converged).all())


def test_check_positive_int_returns_a_python_int():
    import numpy as np

    from entrokit._validation import check_positive_int

    for v in (np.int64(7), np.int32(7), np.uint8(7), 7):
        out = check_positive_int(v, "max_iter")
        assert out == 7 and type(out) is int
    for v in (np.float64(7.0), 7.0, True, "7"):
        with pytest.raises(TypeError, match=r"max_iter must be an int >= 1, got .*; pass e.g. max_iter=1000"):
            check_positive_int(v, "max_iter")
    with pytest.raises(InputError, match=r"max_iter must be an int >= 1, got 0; pass a positive integer"):
        check_positive_int(np.int64(0), "max_iter")


@pytest.mark.parametrize("which", ["a", "b", "cost"])
def test_meta_tensors_are_an_input_error(prob, which):
    a, b, C = prob
    args = {"a": a, "b": b, "cost": C}
    args[which] = torch.empty_like(args[which], device="meta")
    for solver in (lambda: entrokit.sinkhorn(args["a"], args["b"], args["cost"], 0.1),
                   lambda: entrokit.solve(args["a"], args["b"], args["cost"], eps=0.1)):
        with pytest.raises(InputError, match=rf"{which} is a meta tensor \(shape and dtype only, no values\), "
                                             r"but (sinkhorn|solve) reads values. Pass tensors that hold data"):
            solver()
