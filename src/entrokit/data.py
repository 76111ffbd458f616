"""Embedded default data: digit densities on a pixel grid and grid costs.

Everything comes from scikit-learn's bundled ``load_digits`` (8x8 images shipped inside
the package), so nothing is downloaded. The digit functions need the ``cli`` extra
(``pip install 'entrokit[cli]'``); the grid functions need only torch.
"""

from __future__ import annotations

import torch

from entrokit._errors import InputError
from entrokit._optional import require
from entrokit._validation import check_count

__all__ = ["digit_image", "digit_density", "grid_points", "grid_cost"]


def digit_image(index: int) -> torch.Tensor:
    """The ``index``-th 8x8 image of scikit-learn's digits (values 0..16), float64."""
    index = check_count(index, "index", minimum=0, example="index=0")
    load_digits = require("sklearn.datasets", "entrokit.data.digit_image").load_digits
    images = load_digits().images
    if index >= len(images):
        raise IndexError(f"digit index must be in [0, {len(images)}), got {index}; scikit-learn ships {len(images)} digits.")
    return torch.as_tensor(images[index], dtype=torch.float64)


def digit_density(index: int, size: int = 28, *, dtype=torch.float64) -> torch.Tensor:
    """Digit ``index`` upsampled bilinearly to ``size x size`` and normalised to unit mass.

    Returns a flat ``[size*size]`` weight vector (row-major pixels). Background pixels keep
    weight exactly 0; solvers handle zero weights exactly.
    """
    img = digit_image(index)[None, None]
    up = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=True)
    w = up.flatten().clamp_min(0.0)
    return (w / w.sum()).to(dtype)


def grid_points(size: int = 28, *, dtype=torch.float64) -> torch.Tensor:
    """Pixel centres of a ``size x size`` grid in [0, 1]^2, row-major, shape ``[size^2, 2]``."""
    t = torch.linspace(0.0, 1.0, size, dtype=dtype)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], -1)


def grid_cost(size: int = 28, p: int = 2, *, dtype=torch.float64) -> torch.Tensor:
    """Ground cost on the pixel grid normalised to [0, 1].

    ``p=2``: squared Euclidean (W2); ``p=1``: L1 / Manhattan (W1 on the grid).
    """
    X = grid_points(size, dtype=dtype)
    if p == 2:
        C = torch.cdist(X, X) ** 2
    elif p == 1:
        C = torch.cdist(X, X, p=1)
    else:
        raise InputError(f"p must be 1 (L1, W1 on the grid) or 2 (squared Euclidean, W2), got {p!r}.")
    return C / C.max()
