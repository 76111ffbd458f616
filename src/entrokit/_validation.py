"""Boundary checks shared by every public entry point, of both pillars (the OT solvers
and losses, and the training regularizers).

Metadata checks (types, shapes, dtypes, devices) always run. Value checks (signs,
finiteness, masses, probabilities, index ranges) read tensor values, which forces a device
sync; they run unless the caller passes ``check_inputs=False`` (for training loops). Every
message says what was expected, what came in, and how to fix it; bad values and shapes
raise :class:`~entrokit.InputError`, wrong types ``TypeError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import operator
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
    "upcast_half",
    "match_half_masses",
    "apply_reduction",
    "REDUCTIONS",
    "check_buffer_device",
    "check_count",
    "check_finite_real",
    "check_float_vector",
    "check_generator",
    "check_int_vector",
    "check_logits",
    "check_nonneg_real",
    "check_probabilities",
    "check_reduction",
    "check_same_shape",
    "check_sample_batch",
    "check_unit_interval",
    "default_atol",
    "SOLVER_OPTIONS",
    "SolverOption",
    "check_solver_options",
    "solver_options_of",
    "refused_values",
]


_HALF = (torch.float16, torch.bfloat16)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer computes in: float32 for float16/bfloat16 inputs (what autocast
    hands a layer), otherwise the input's own dtype."""
    return torch.float32 if dtype in _HALF else dtype


def upcast_half(**tensors: Any) -> tuple[dict[str, Any], torch.dtype | None]:
    """The losses' half-precision rule: float16/bfloat16 tensors are cast to float32 (a
    differentiable cast, so gradients come back in the caller's dtype) and the dtype to
    cast the result back to is returned (``None`` when no input is half). Half inputs must
    all share one dtype (a mismatch raises :class:`~entrokit.InputError` as for any dtype
    mismatch); other values pass through unchanged."""
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and t.dtype in _HALF:
            break
    else:
        return tensors, None
    half = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.dtype in _HALF}
    floating = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    check_same_dtype_device(floating)
    out = {k: (t.float() if k in half else t) for k, t in tensors.items()}
    return out, next(iter(half.values())).dtype


def match_half_masses(a: Any, b: Any, half: torch.dtype | None) -> tuple[Any, Any]:
    """Weights that came in ``half`` precision (already cast up by :func:`upcast_half`)
    carry their masses to that precision only: a relative gap up to ``2u`` (``u`` the unit
    roundoff of ``half``) is rounding, and ``b`` (or ``a`` when ``b`` is uniform) is
    rescaled by the detached ratio of the masses so that the float32 problem is balanced.
    A larger gap is left for the mass check to report. ``None`` weights are uniform of
    mass 1."""
    if half is None or (a is None and b is None):
        return a, b
    if not all(w is None or isinstance(w, torch.Tensor) for w in (a, b)):
        return a, b
    sa = a.detach().sum(-1, keepdim=True) if a is not None else 1.0
    sb = b.detach().sum(-1, keepdim=True) if b is not None else 1.0
    ratio = torch.as_tensor(sa / sb)
    if not bool(((ratio - 1).abs() <= 2 * torch.finfo(half).eps).all()):
        return a, b
    return (a, b * ratio) if b is not None else (a / ratio, b)


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


def check_positive(value: Any, name: str, *, example: str | None = None) -> float:
    """Check a finite real scalar > 0 and return it as ``float`` (``example``: the value
    the message suggests, default ``name=1e-2``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    hint = example or f"{name}=1e-2"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a positive real number, got {type(value).__name__} {value!r}; "
            f"pass a number such as {hint} (not a string)."
        )
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}; pass a positive value such as {hint}.")
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


def check_float_vector(t: Any, name: str, *, shape: str, detail: str, values: str, min_len: int = 0) -> torch.Tensor:
    """A floating 1-D tensor that holds values (not meta) with ``>= min_len`` entries.

    ``shape`` (``"[N]"``) and ``detail`` (``" (one per sample)"``) word the expected shape,
    ``values`` what to pass instead of a meta tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}; use {name}.float().")
    if t.is_meta:
        raise InputError(f"{name} is a meta tensor (shape only, no values); pass {values}.")
    if t.dim() != 1 or t.numel() < min_len:
        raise InputError(f"{name} must have shape {shape}{detail}, got {tuple(t.shape)}.")
    return t


def _check_float_ndim(t: torch.Tensor, name: str, ndim: int, *, layout: str, hint: str) -> None:
    """``t`` is floating with ``ndim`` axes (``layout`` words them after "must", ``hint``
    says how to get there)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}; use {name}.float().")
    if t.ndim != ndim:
        raise InputError(f"{name} must {layout}, got shape {tuple(t.shape)}; {hint}")


def check_generator(generator: Any) -> None:
    """``generator`` is ``None`` or a :class:`torch.Generator` (explicit randomness)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "pass e.g. generator=torch.Generator().manual_seed(0) for reproducible draws."
        )


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """Check that ``value`` is one of ``choices`` and return it (strings compare by value,
    anything else by type and value: ``1`` is not ``True``, a tensor is none of them)."""
    if isinstance(value, str):
        ok = value in choices
    else:
        ok = any(value is c or (type(value) is type(c) and value == c) for c in choices)
    if not ok:
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


# -- the training regularizers' checks (entrokit.regularizers) -----------------------------
# Per-sample state, logits and probabilities; the same rules and message style as above.

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


def check_finite_real(value: Any, name: str, *, example: str) -> float:
    """Check a finite real number (any sign)."""
    v = _real(value, name)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {value!r}; use e.g. {example}.")
    return v


def check_count(value: Any, name: str, *, minimum: int = 1, example: str | None = None) -> int:
    """Check an int >= ``minimum`` (Python, NumPy or 0-dim integer tensors; not bools, not
    floats) and return it as ``int``; ``example`` (``"warmup=0"``) ends the messages."""
    tail = f"; use e.g. {example}." if example else "."
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool{tail}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}{tail}") from None
    if v < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {v}{tail}")
    return v


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


def _check_row_vector(t: torch.Tensor, name: str, batch: int, device: torch.device, *, entry: str = "entry",
                      hint: str = ".") -> None:
    """``t`` has shape ``[batch]`` (one ``entry`` per row of logits) and the logits' ``device``."""
    if t.dim() != 1 or t.shape[0] != batch:
        raise InputError(f"{name} must have shape [{batch}] (one {entry} per row of logits), got {tuple(t.shape)}{hint}")
    if t.device != device:
        raise InputError(
            f"device mismatch: logits are on {device} but {name} is on {t.device}; move it "
            f"with {name}.to(logits.device)."
        )


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
    _check_row_vector(t, name, batch, device)
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
    _check_unit_rows(p.sum(-1), tol, name, over="the last axis",
                     fix=f"Pass probabilities (softmax over the last axis) or normalise with {name} / "
                         f"{name}.sum(-1, keepdim=True).")


def _check_unit_rows(sums: torch.Tensor, tol: float, name: str, *, over: str, fix: str,
                     valid: torch.Tensor | None = None) -> None:
    """Every row sum (where ``valid``) is 1 within ``tol``; else the first bad row is named."""
    err = (sums - 1).abs()
    if valid is not None:
        err = torch.where(valid, err, torch.zeros_like(err))
    if (err > tol).any():
        idx = tuple(int(i) for i in torch.nonzero(err > tol)[0])
        raise InputError(
            f"{name} rows must sum to 1 over {over} (atol={tol:g}); row {idx} sums to {sums[idx].item():.6g}. {fix}"
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
    the state ``buffer`` on the rows' device. Returns ``(rows, labels, index)`` with ``rows``
    in the :func:`working_dtype` (float32 for float16/bfloat16; a differentiable cast)."""
    rows = check_logits(rows, module.num_classes, name=name)
    b = rows.shape[0]
    if labels is not None:
        labels = check_int_vector(labels, "labels", b, module.num_classes, "num_classes", rows.device,
                                  module.check_inputs)
    index = check_int_vector(index, "index", b, module.num_samples, "num_samples", rows.device,
                             module.check_inputs)
    check_buffer_device(buffer, rows, owner)
    return (rows.float() if rows.dtype in _HALF else rows), labels, index


# -- the solvers' option spec ---------------------------------------------------------------
# One table of the entropic solvers' options: how each is checked, its default and the
# methods that take it. The public solvers check their options through it, and
# ``entrokit.solve`` reads it to tell which method takes the options a caller gave.

def optional(check):
    """``None`` or whatever ``check`` accepts."""
    def _check(value, name):
        return None if value is None else check(value, name)
    return _check


def _choice(*choices):
    return functools.partial(check_choice, choices=choices)


def _any(value: Any, name: str) -> Any:
    return value


def _eps_scaling(value: Any, name: str) -> bool | str:
    if value is None or (isinstance(value, str) and value == "auto"):
        return "auto"
    if value is True or value is False:
        return value
    raise InputError(f"{name} must be True, False or 'auto' (None is 'auto'); got {value!r}.")


def _open_unit(value: Any, name: str) -> float:
    v = _real(value, name)
    if not 0.0 < v < 1.0:
        raise InputError(f"{name} must lie in (0, 1), got {value!r}; try 0.5.")
    return v


def _density(value: Any, name: str) -> float:
    v = check_positive(value, name)
    if v > 1:
        raise InputError(f"{name} must lie in (0, 1], got {value!r}; the paper uses 2/n.")
    return v


def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise InputError(f"{name} must be an int >= 0, got {value!r}.")
    return int(value)


def _callable(value: Any, name: str):
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable(iteration, error), got {type(value).__name__}.")
    return value


@dataclasses.dataclass(frozen=True)
class SolverOption:
    """One row of :data:`SOLVER_OPTIONS`: ``check(value, name)`` returns the normalised
    value or raises; ``methods`` take the option; ``refused`` maps a method to values its
    signature takes only to refuse them with a pointer (``grad="unroll"`` for Newton)."""

    check: Any
    default: Any
    methods: tuple[str, ...]
    refused: dict = dataclasses.field(default_factory=dict)


_NEWTON = ("sns", "ssns")
_ENTROPIC = ("sinkhorn", *_NEWTON)
_DIVERGENCE = "sinkhorn_divergence"
_MULTISCALE = "multiscale_sinkhorn"
_SMOOTH = "smooth"  # its shared options only: it checks its own (reg, gamma, k, ...) itself
#: the methods whose every option is a row of the table
_DESCRIBED = (*_ENTROPIC, _DIVERGENCE)

#: option name -> :class:`SolverOption`: every option of the entropic solvers (``"sinkhorn"``,
#: ``"sns"``, ``"ssns"``) and of the divergence, and the shared ones of ``"multiscale_sinkhorn"``
#: and ``"smooth"`` (which check their own options too).
SOLVER_OPTIONS: dict[str, SolverOption] = {
    "tol": SolverOption(check_positive, 1e-6, (*_ENTROPIC, _DIVERGENCE, _MULTISCALE, _SMOOTH)),
    "max_iter": SolverOption(optional(check_positive_int), None, (*_ENTROPIC, _DIVERGENCE, _MULTISCALE, _SMOOTH)),
    "eps_scaling": SolverOption(_eps_scaling, "auto", (*_ENTROPIC, _DIVERGENCE, _SMOOTH)),
    "scaling_decay": SolverOption(_open_unit, 0.5, ("sinkhorn", _DIVERGENCE, _MULTISCALE)),
    "grad": SolverOption(_choice("implicit", "envelope", "unroll"), "implicit", (*_ENTROPIC, _MULTISCALE),
                         refused={m: ("unroll",) for m in (*_NEWTON, _MULTISCALE)}),
    "init": SolverOption(_any, None, _ENTROPIC),
    "callback": SolverOption(_callable, None, (*_ENTROPIC, _SMOOTH)),
    "check_every": SolverOption(optional(check_positive_int), None, ("sinkhorn",)),
    "lse_mode": SolverOption(_choice(None, True, False), None, ("sinkhorn",)),
    "variant": SolverOption(_choice(*_NEWTON), "ssns", _NEWTON),
    "warmup_max_iter": SolverOption(optional(_nonneg_int), None, _NEWTON),
    "switch_tol": SolverOption(optional(check_positive), None, _NEWTON),
    "density": SolverOption(optional(_density), None, _NEWTON),
    "linear_solver": SolverOption(_choice("auto", "cg", "direct"), "auto", _NEWTON),
    "cg_rtol": SolverOption(check_positive, 1e-10, _NEWTON),
    "cg_max_iter": SolverOption(optional(check_positive_int), None, _NEWTON),
    "fallback_steps": SolverOption(check_positive_int, 10, _NEWTON),
    "time_limit": SolverOption(optional(check_positive), None, _NEWTON),
}


def check_solver_options(method: str, **values: Any) -> dict[str, Any]:
    """Check the options ``values`` of ``method`` against :data:`SOLVER_OPTIONS`; returns
    them normalised (``None`` for ``eps_scaling`` is ``"auto"``, numbers as ``float``/
    ``int``). Options the method does not take raise :class:`~entrokit.InputError`."""
    out = {}
    for name, value in values.items():
        spec = SOLVER_OPTIONS.get(name)
        if spec is None or method not in spec.methods:
            raise InputError(f"{method} does not take the option {name!r}.")
        out[name] = spec.check(value, name)
    return out


def solver_options_of(method: str) -> set[str] | None:
    """The options ``method`` takes according to :data:`SOLVER_OPTIONS` (``None`` for a
    method the table does not describe fully)."""
    if method not in _DESCRIBED:
        return None
    return {name for name, spec in SOLVER_OPTIONS.items() if method in spec.methods}


def refused_values(method: str) -> dict[str, tuple]:
    """Option values ``method`` takes in its signature only to refuse them."""
    return {name: spec.refused[method] for name, spec in SOLVER_OPTIONS.items() if method in spec.refused}
