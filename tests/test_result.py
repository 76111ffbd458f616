"""OTResult: the per-problem fields are declared once; NumPy copies and batch results
derive from that declaration."""

import dataclasses

import numpy as np
import torch

import entrokit
from entrokit._result import PER_PROBLEM_FIELDS
from entrokit.distributed import BatchResults
from generators import random_problem


def test_per_problem_fields_are_the_tensors_with_the_batch_axes_leading():
    a, b, C = random_problem(5, 4, seed=0, batch=3)
    res = entrokit.sinkhorn(a, b, C, 0.1)
    tensors = {f.name for f in dataclasses.fields(res) if isinstance(getattr(res, f.name), torch.Tensor)}
    assert set(PER_PROBLEM_FIELDS) == tensors - {"errors"}  # errors: [n_checks, ...]
    for name in PER_PROBLEM_FIELDS:
        assert getattr(res, name).shape[0] == 3, name
    assert res.errors.shape[1:] == (3,)


def test_numpy_copy_converts_every_tensor_field():
    a, b, C = random_problem(5, 4, seed=1)
    res = entrokit.sinkhorn(a, b, C, 0.1).numpy()
    for name in (*PER_PROBLEM_FIELDS, "errors"):
        assert isinstance(getattr(res, name), np.ndarray), name
    assert isinstance(res.plan, np.ndarray) and res.plan.shape == (5, 4)


def test_batch_results_carry_the_per_problem_fields_and_the_local_result():
    assert tuple(f.name for f in dataclasses.fields(BatchResults)) == (*PER_PROBLEM_FIELDS, "local")
    assert BatchResults.__module__ == "entrokit.distributed"
    assert all(name in BatchResults.__doc__ for name in PER_PROBLEM_FIELDS)
