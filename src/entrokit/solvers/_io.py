"""NumPy in, NumPy out: the boundary convention POT users expect; and no autocast inside a
solver (its matmuls would run in half precision)."""

from __future__ import annotations

import functools

import torch

from entrokit._validation import is_array_like, no_autocast, reject_meta

__all__ = ["numpy_in_out"]


def _is_numpy(x) -> bool:
    return type(x).__module__ == "numpy"


def numpy_in_out(fn):
    """Wrap a solver ``fn(a, b, cost, ...)``: when no input is a torch tensor (or a
    geometry) and at least one is a NumPy array, the :class:`~entrokit.OTResult` comes
    back with NumPy fields (:meth:`OTResult.numpy`). The solver runs with autocast off
    (:class:`~entrokit._validation.no_autocast`): under ``torch.autocast`` its float32
    inputs stay float32."""

    checked = reject_meta(fn)  # a meta tensor: a typed error naming the argument

    @functools.wraps(fn)
    def wrapper(a, b, cost, *args, **kwargs):
        with no_autocast():
            res = checked(a, b, cost, *args, **kwargs)
        ins = (a, b, cost)
        if any(_is_numpy(x) for x in ins) and not any(isinstance(x, torch.Tensor) for x in ins) and all(
            x is None or is_array_like(x) for x in ins
        ):
            return res.numpy()
        return res

    return wrapper
