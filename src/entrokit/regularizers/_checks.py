"""Boundary checks shared by the training regularizers.

The regularizers keep their own checks (instead of borrowing the solvers' private
``entrokit._validation``) so the two pillars can change independently. The rules are the
library's: metadata checks (types, shapes, dtypes, devices) always run; value checks read
tensor values, which forces a device sync, and can be switched off with
``check_inputs=False``. Every message says what was expected, what came in, and how to
fix it; bad values and shapes raise :class:`~entrokit.InputError`, wrong types
``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._validation import REDUCTIONS

__all__ = [
    "check_buffer_device",
    "check_choice",
    "check_count",
    "check_finite_real",
    "check_int_vector",
    "check_logits",
    "check_nonneg_real",
    "check_positive",
    "check_probabilities",
    "check_reduction",
    "check_same_shape",
    "check_unit_interval",
    "default_atol",
]



def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _real(value: Any, name: str, what: str = "a real number") -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}.")
    return float(value)


def check_unit_interval(value: Any, name: str, *, closed_right: bool, example: str) -> float:
    """Check a real number in [0, 1) (or [0, 1] when ``closed_right``)."""
    v = _real(value, name)
    ok = math.isfinite(v) and v >= 0 and (v <= 1 if closed_right else v < 1)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise InputError(f"{name} must lie in {interval}, got {value!r}; use e.g. {example}.")
    return v


def check_nonneg_real(value: Any, name: str, *, example: str) -> float:
    """Check a finite real number >= 0."""
    v = _real(value, name)
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}; use e.g. {example}.")
    return v


def check_positive(value: Any, name: str, *, example: str | None = None) -> float:
    """Check a finite real number > 0."""
    v = _real(value, name, "a positive real number")
    if not math.isfinite(v) or v <= 0:
        hint = example or f"{name}=1e-2"
        raise InputError(f"{name} must be a finite number > 0, got {value!r}; use e.g. {hint}.")
    return v


def check_finite_real(value: Any, name: str, *, example: str) -> float:
    """Check a finite real number (any sign)."""
    v = _real(value, name)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {value!r}; use e.g. {example}.")
    return v


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """Check an int >= ``minimum`` (used for buffer sizes)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value}.")
    return int(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        if len(choices) == 2:
            raise InputError(f"{name} must be {choices[0]!r} or {choices[1]!r}; got {value!r}.")
        opts = ", ".join(repr(c) for c in choices)
        raise InputError(f"{name} must be one of {opts}; got {value!r}.")
    return value


def check_reduction(value: Any) -> str:
    """``reduction`` is one of ``"mean"``, ``"sum"``, ``"none"``."""
    return check_choice(value, "reduction", REDUCTIONS)


def default_atol(dtype: torch.dtype) -> float:
    """Tolerance on row sums of probabilities: 1e-2 half, 1e-4 float32, 1e-6 float64."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    if dtype == torch.float32:
        return 1e-4
    return 1e-6


def check_logits(logits: Any, num_classes: int | None, name: str = "logits") -> torch.Tensor:
    """Check a floating ``[B, C]`` tensor with ``B >= 1`` (and ``C == num_classes`` if given)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [batch, num_classes], got "
            f"{type(logits).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype, got {logits.dtype}; pass the raw network "
            f"output (e.g. {name}.float())."
        )
    if num_classes is None:
        num_classes = logits.shape[-1] if logits.dim() == 2 else "num_classes"
    if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] == 0:
        raise InputError(
            f"{name} must have shape [batch, {num_classes}] (batch >= 1), got "
            f"{tuple(logits.shape)}; flatten extra axes or check num_classes."
        )
    return logits


def check_same_shape(t: Any, ref: torch.Tensor, name: str, ref_name: str, hint: str) -> torch.Tensor:
    """``t`` is a floating tensor with the shape and device of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with the shape of {ref_name} {tuple(ref.shape)}, got "
            f"{type(t).__name__}."
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}; use {name}.float().")
    if t.shape != ref.shape:
        raise InputError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}; {hint}"
        )
    if t.device != ref.device:
        raise InputError(
            f"device mismatch: {ref_name} is on {ref.device} but {name} is on {t.device}; move it "
            f"with {name}.to({ref_name}.device)."
        )
    return t


def check_int_vector(
    t: Any, name: str, batch: int, upper: int, upper_name: str, device: torch.device, check_values: bool
) -> torch.Tensor:
    """Check an integer ``[batch]`` tensor with entries in ``[0, upper)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integers with shape [{batch}], got "
            f"{type(t).__name__}; convert it with torch.as_tensor({name})."
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {t.dtype}.")
    if t.dim() != 1 or t.shape[0] != batch:
        raise InputError(
            f"{name} must have shape [{batch}] (one entry per row of logits), got "
            f"{tuple(t.shape)}."
        )
    if t.device != device:
        raise InputError(
            f"device mismatch: logits are on {device} but {name} is on {t.device}; move it "
            f"with {name}.to(logits.device)."
        )
    if check_values:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"{name} out of range: got {bad}, expected 0 <= {name} < {upper_name}={upper}. "
                + (
                    "Return dataset indices with IndexedDataset(ds) and build the loss with "
                    "num_samples=len(ds)."
                    if name == "index"
                    else "Labels must be class ids 0..num_classes-1."
                )
            )
    return t.long()


def check_probabilities(
    p: torch.Tensor, name: str, *, atol: float | None = None, hint: str = ""
) -> None:
    """Value check: finite, nonnegative, and rows (last axis) summing to 1 within ``atol``.

    ``atol`` defaults to :func:`default_atol` of ``p.dtype``. Forces a device sync.
    """
    if not bool(torch.isfinite(p).all()):
        raise InputError(f"{name} contains NaN or inf; expected finite probabilities. {hint}".rstrip())
    if (p < 0).any():
        raise InputError(
            f"{name} has negative entries (min {p.min().item():.3g}); expected probabilities. "
            "Pass softmax outputs, not logits (apply .softmax(-1) first)."
        )
    tol = default_atol(p.dtype) if atol is None else float(atol)
    err = (p.sum(-1) - 1).abs()
    if (err > tol).any():
        idx = tuple(int(i) for i in torch.nonzero(err > tol)[0])
        raise InputError(
            f"{name} rows must sum to 1 over the last axis (atol={tol:g}); row {idx} sums to "
            f"{p.sum(-1)[idx].item():.6g}. Pass probabilities (softmax over the last axis) or "
            f"normalise with {name} / {name}.sum(-1, keepdim=True)."
        )


def check_buffer_device(buf: torch.Tensor, logits: torch.Tensor, owner: str) -> None:
    """The per-sample buffer must live on the device of the logits."""
    if buf.device != logits.device:
        raise InputError(
            f"{owner} keeps its buffers on {buf.device} but logits are on {logits.device}; "
            f"move the loss with loss.to(logits.device)."
        )


def check_sample_batch(module, rows: Any, index: Any, buffer: torch.Tensor, owner: str, *,
                       labels: Any = None, name: str = "logits"):
    """Validate one batch of a module with per-sample state (``num_classes``,
    ``num_samples``, ``check_inputs``): ``rows`` ``[B, C]`` (logits or probabilities),
    optional ``labels`` ``[B]`` in ``[0, C)``, ``index`` ``[B]`` in ``[0, num_samples)``, and
    the state ``buffer`` on the rows' device. Returns ``(rows, labels, index)``."""
    rows = check_logits(rows, module.num_classes, name=name)
    b = rows.shape[0]
    if labels is not None:
        labels = check_int_vector(labels, "labels", b, module.num_classes, "num_classes", rows.device,
                                  module.check_inputs)
    index = check_int_vector(index, "index", b, module.num_samples, "num_samples", rows.device,
                             module.check_inputs)
    check_buffer_device(buffer, rows, owner)
    return rows, labels, index

