"""Boundary checks shared by every public entry point.

Metadata checks (types, shapes, dtypes, devices) always run. Value checks (signs,
finiteness, masses) read tensor values, which forces a device sync; they run unless the
caller passes ``check_inputs=False`` (for training loops).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch

from entrokit._errors import InputError

__all__ = [
    "as_float_tensor",
    "is_array_like",
    "check_choice",
    "check_positive",
    "check_positive_int",
    "check_nonneg_finite",
    "check_same_dtype_device",
    "check_layer_input",
    "check_masses",
    "no_autocast",
    "reject_meta",
    "working_dtype",
]


_HALF = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer computes in: float32 for float16/bfloat16 inputs (what autocast
    hands a layer), otherwise the input's own dtype."""
    return torch.float32 if dtype in _HALF else dtype


class no_autocast(contextlib.ContextDecorator):
    """Context (or decorator): autocast off on every device where it is on, so that the
    solvers' matmuls and reductions run in the dtype of their inputs (under
    ``torch.autocast`` a float32 ``baddbmm`` would otherwise run in bfloat16 and the
    potentials lose their digits). Layers cast half-precision inputs to float32 first
    (:func:`working_dtype`) and cast their outputs back."""

    def __init__(self):
        self._stack = []

    def __enter__(self):
        entered = []
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                ctx = torch.autocast(device, enabled=False)
                ctx.__enter__()
                entered.append(ctx)
        self._stack.append(entered)
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._stack.pop()):
            ctx.__exit__(*exc)
        return False


def _is_meta(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_is_meta(t) for t in v)
    return isinstance(v, torch.Tensor) and v.device.type == "meta"


def reject_meta(fn):
    """Decorate a public entry point that reads tensor values (checks, solves): a meta
    tensor (shape and dtype only, no values) in any argument raises :class:`InputError`
    naming the argument, instead of an untyped ``RuntimeError`` from ``.item()`` deep inside."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        meta = False
        for v in (*args, *kwargs.values()):  # inline: no Python call per tensor on the fast path
            if isinstance(v, torch.Tensor):
                meta = v.device.type == "meta"
            elif isinstance(v, (list, tuple)):
                meta = _is_meta(v)
            if meta:
                break
        if meta:
            sig = inspect.signature(fn)
            name = "an argument"
            for k, v in sig.bind_partial(*args, **kwargs).arguments.items():
                if sig.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL:
                    hit = [i for i, t in enumerate(v) if _is_meta(t)]
                    if hit:
                        name = f"positional argument {hit[0] + 1}"
                        break
                elif _is_meta(v):
                    name = k
                    break
            who = fn.__qualname__.replace(".forward", "")
            raise InputError(
                f"{name} is a meta tensor (shape and dtype only, no values), but {who} reads values. "
                "Pass tensors that hold data (device='cpu' or 'cuda'); a module built on the meta "
                "device needs module.to_empty(device=...) and its weights loaded first."
            )
        return fn(*args, **kwargs)

    return wrapper


def check_layer_input(x: Any, weight: torch.Tensor, who: str, *, features: int | None = None,
                      ranks: tuple[int, ...] | None = None) -> None:
    """The input of a drop-in ``nn.Linear``/``nn.Conv2d`` replacement: a floating tensor in the
    weight's dtype (any floating dtype under ``torch.autocast``, which casts it), with
    ``features`` entries on its feature axis (``-1``; axis ``-3`` for ``ranks=(3, 4)``) and
    one of ``ranks`` dimensions. The typed errors ``nn.Linear`` itself does not give."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} takes a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{who} needs a floating input, got {x.dtype}; convert it with input.to({weight.dtype}).")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{who} has {weight.dtype} weights but the input is {x.dtype}; cast the input "
            f"(input.to({weight.dtype})), convert the layer (layer.to({x.dtype})) or run it under torch.autocast."
        )
    if ranks is not None and x.dim() not in ranks:
        raise InputError(f"{who} takes inputs with {' or '.join(map(str, ranks))} dimensions, got shape {tuple(x.shape)}.")
    axis = -3 if ranks == (3, 4) else -1
    if features is not None and (x.dim() == 0 or x.shape[axis] != features):
        raise InputError(
            f"{who} expects {features} features on axis {axis} of its input, got shape {tuple(x.shape)}."
        )


def is_array_like(x: Any) -> bool:
    """NumPy arrays and (nested) lists/tuples of numbers: converted at the boundary."""
    if isinstance(x, (list, tuple)):
        return True
    return type(x).__module__ == "numpy" and hasattr(x, "__array__")


def as_float_tensor(x: Any, name: str, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x`` as a floating tensor.

    Accepts torch tensors of dtype float32/float64, NumPy arrays and lists (converted to
    float64, or to ``like``'s dtype and device when given). float16/bfloat16 raise: the
    potentials of entropic OT span ``C/eps``, far beyond half precision's 3 significant
    digits, so the solvers need float32 at least (cast with ``.float()`` and cast the
    results back). Integer and boolean tensors raise ``TypeError``.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif is_array_like(x):
        import numpy as np

        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as err:
            raise TypeError(f"{name} could not be read as an array: {err}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}.")
        if np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}.")
        if arr.dtype in (np.float32, np.float64) and like is None:
            t = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            dt = like.dtype if like is not None else torch.float64
            t = torch.as_tensor(arr.astype(np.float64), dtype=dt)
        if like is not None:
            t = t.to(dtype=like.dtype, device=like.device)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor, a NumPy array or a list of numbers, got "
            f"{type(x).__name__}; convert it with torch.as_tensor({name}, dtype=torch.float64)."
        )
    if t.dtype in _HALF:
        raise TypeError(
            f"{name} has dtype {t.dtype}, which entrokit's OT solvers do not accept: the dual "
            "potentials span cost/eps, far beyond half precision. Pass float32 or float64 "
            f"({name}.float()) and cast the results back, e.g. res.plan.to({t.dtype})."
        )
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float32 or float64), got {t.dtype}; "
            f"convert it with {name}.double() or {name}.float()."
        )
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}.")
    if t.numel() == 0:
        raise InputError(
            f"{name} is empty (shape {tuple(t.shape)}); expected at least one entry on every axis."
        )
    return t


def check_positive(value: Any, name: str) -> float:
    """Check a finite real scalar > 0 and return it as ``float``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a positive real number, got {type(value).__name__} {value!r}; "
            f"pass a number such as {name}=1e-2 (not a string)."
        )
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError(
            f"{name} must be a finite number > 0, got {value!r}; pass a positive value "
            f"such as {name}=1e-2."
        )
    return v


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Check an integral number >= 1 (Python or NumPy integers) and return it as ``int``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(
            f"{name} must be an int >= 1, got {type(value).__name__} {value!r}; pass e.g. {name}=1000."
        )
    if value < 1:
        raise InputError(f"{name} must be an int >= 1, got {value}; pass a positive integer.")
    return int(value)  # NumPy and other integral numbers as a Python int


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise InputError(f"{name} must be one of {opts}; got {value!r}.")
    return value


def check_nonneg_finite(t: torch.Tensor, name: str, *, allow_negative: bool = False) -> None:
    """Value check: no NaN, no infinity and (unless allowed) no negative entry."""
    if bool(torch.isfinite(t).all()):
        if not allow_negative and (t < 0).any():
            raise InputError(
                f"{name} has negative entries (min {t.min().item():.3g}); expected nonnegative "
                "values. Weights are masses: clip them with .clamp_min(0) or fix how they are computed."
            )
        return
    if torch.isnan(t).any():
        raise InputError(
            f"{name} contains NaN (first at flat index {int(torch.isnan(t).flatten().nonzero()[0])}); "
            f"expected finite values. Clean the input, e.g. torch.nan_to_num({name})."
        )
    if torch.isinf(t).any():
        raise InputError(
            f"{name} contains an infinite value; expected finite values. Replace infinite costs "
            "by a large finite number, or drop the corresponding points."
        )
    if not allow_negative and (t < 0).any():
        raise InputError(
            f"{name} has negative entries (min {t.min().item():.3g}); expected nonnegative values. "
            "Weights are masses: clip them with .clamp_min(0) or fix how they are computed."
        )


def check_same_dtype_device(tensors: dict[str, torch.Tensor]) -> None:
    """All tensors must share one dtype and one device."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise InputError(
                f"dtype mismatch: {name0} is {t0.dtype} but {name} is {t.dtype}; "
                f"cast them to one dtype, e.g. {name}.to({name0}.dtype)."
            )
        if t.device != t0.device:
            raise InputError(
                f"device mismatch: {name0} is on {t0.device} but {name} is on {t.device}; "
                f"move them to one device, e.g. {name}.to({name0}.device)."
            )


def check_masses(
    a: torch.Tensor, b: torch.Tensor, *, normalize: bool, geometry=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check positive total masses and (unless ``normalize``) that they agree.

    With ``normalize=True`` both weight vectors are divided by their sums (differentiably).
    With ``geometry``, the total masses are its ``row_sum(a)`` and ``col_sum(b)`` (a
    geometry sharded over processes sums over every rank).
    """
    if geometry is None:
        sa, sb = a.sum(-1), b.sum(-1)
    else:
        sa, sb = geometry.row_sum(a), geometry.col_sum(b)
    if (sa <= 0).any() or (sb <= 0).any():
        which = "a" if (sa <= 0).any() else "b"
        raise InputError(
            f"weights {which} have zero total mass; expected a positive sum. At least one weight "
            "must be > 0."
        )
    if normalize:
        return a / sa.unsqueeze(-1), b / sb.unsqueeze(-1)
    rtol = 1e-5 if a.dtype == torch.float32 else 1e-8
    gap = (sa - sb).abs() / torch.maximum(sa, sb)
    if (gap > rtol).any():
        i = int(gap.flatten().argmax())
        raise InputError(
            f"total masses differ: sum(a)={sa.flatten()[i].item():.10g} vs sum(b)={sb.flatten()[i].item():.10g} "
            f"(relative gap {gap.flatten()[i].item():.2e} > {rtol:g}); balanced OT needs equal masses. "
            "Pass normalize=True to rescale both to 1, or fix the weights."
        )
    return a, b


REDUCTIONS = ("mean", "sum", "none")


def apply_reduction(per: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-sample losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per

