"""Embedded data: scikit-learn's digits as densities on a grid, and the grid's costs."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from entrokit import InputError
from entrokit.data import digit_density, digit_image, grid_cost, grid_points


def test_digit_image_is_scikit_learns_image():
    img = digit_image(7)
    assert img.shape == (8, 8) and img.dtype == torch.float64
    np.testing.assert_array_equal(img.numpy(), load_digits().images[7])


@pytest.mark.parametrize("size,dtype", [(28, torch.float64), (8, torch.float32), (11, torch.float64)])
def test_digit_density_is_a_unit_mass_upsampling_with_exact_zero_background(size, dtype):
    w = digit_density(3, size, dtype=dtype)
    assert w.shape == (size * size,) and w.dtype == dtype
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    img = digit_image(3)
    if size == 8:  # align_corners: at the original resolution the upsampling is the identity
        torch.testing.assert_close(w, (img / img.sum()).flatten().to(dtype))
    assert int((w == 0).sum()) > 0  # background pixels weigh exactly 0


def test_grid_points_are_row_major_pixel_centres_in_the_unit_square():
    X = grid_points(3)
    expected = torch.tensor([[i / 2, j / 2] for i in range(3) for j in range(3)], dtype=torch.float64)
    assert torch.equal(X, expected)


@pytest.mark.parametrize("p", [1, 2])
def test_grid_cost_is_the_normalised_lp_cost_on_the_grid(p):
    size = 5
    C = grid_cost(size, p)
    X = grid_points(size)
    diff = (X[:, None] - X[None]).abs()
    ref = diff.sum(-1) if p == 1 else diff.pow(2).sum(-1)
    torch.testing.assert_close(C, ref / ref.max(), rtol=0, atol=1e-14)
    assert float(C[0, -1]) == 1.0 and float(C.diagonal().abs().max()) == 0.0  # opposite corners, self


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(InputError, match=r"p must be 1 \(L1, W1 on the grid\) or 2"):
        grid_cost(4, 3)
    with pytest.raises(IndexError, match=r"digit index must be in \[0, 1797\), got 5000"):
        digit_image(5000)
    with pytest.raises(TypeError, match="index must be an int"):
        digit_image(1.0)
    with pytest.raises(InputError, match="index must be an int >= 0"):
        digit_image(-1)
