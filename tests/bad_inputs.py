"""Table-driven bad-input tests: one entry point, one argument, one way of being wrong.

Each case names what it expects: an error class and a fragment of its message, or one of
the outcomes below for inputs that are accepted (the PyTorch convention for that input).
A module's test file builds ``ENTRIES`` (see :func:`cases`) and ends with
``test_bad_inputs = table_test(ENTRIES)``.
"""

import numpy as np
import pytest
import torch

from entrokit import InputError

PROPAGATES = "propagates"  # accepted, not read for checks: the non-finite value reaches the output
SAME = "same"  # accepted and equal to the base call (non-contiguous tensors, NumPy integers)
CALLER_DTYPE = "caller dtype"  # accepted, output in the inputs' dtype (computed in float32)
FLOAT32 = "float32"  # accepted half inputs, computed and returned in float32 (documented)
NOT_CHECKED = "not checked"  # accepted: a NaN/inf is skipped by the operation itself

META = (InputError, r"is a meta tensor \(shape and dtype only, no values\)")  # reject_meta's message
INT = (TypeError, "must have a floating dtype")
KINDS = ("nan", "inf", "neginf", "empty", "int", "meta", "noncontig", "shape", "scalar")  # what tensor_rows varies


def randn_with(g: torch.Generator):
    """``r(*shape)``: standard normal tensors drawn from ``g`` (one seeded stream per table)."""
    return lambda *shape: torch.randn(*shape, generator=g)


def half_rows(expect) -> dict:
    """Rows passing every floating tensor as float16, then as bfloat16."""
    return {f"all:{d}": ({"*": d}, expect) for d in ("float16", "bfloat16")}


def _put(t, v):
    t = t.clone()
    t.view(-1)[0] = v
    return t


def variant(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nan":
        return _put(t, float("nan"))
    if kind == "inf":
        return _put(t, float("inf"))
    if kind == "neginf":
        return _put(t, float("-inf"))
    if kind == "scalar":  # a 0-dim tensor
        return t.reshape(-1)[0].clone()
    if kind == "empty":
        return t[:0] if t.dim() else t.reshape(1)[:0]
    if kind == "int":
        return t.round().long()
    if kind in ("float16", "bfloat16"):
        return t.to(getattr(torch, kind))
    if kind == "meta":
        return torch.empty_like(t, device="meta")
    if kind == "noncontig":
        if t.dim() < 2:  # every other entry of a tensor twice as long
            out = torch.stack([t, t], -1).reshape(-1)[::2]
        else:
            out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not out.is_contiguous()
        return out
    if kind == "shape":
        return t.unsqueeze(0)
    raise AssertionError(kind)


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if isinstance(out, (int, float)):
        return torch.tensor(float(out))
    return out.combine  # RouterOutput


def check_case(fn, base: dict, change: dict, expect) -> None:
    """Call ``fn(**{**base, **change})`` and check ``expect`` (module docstring)."""
    kwargs = {**base, **change}
    if isinstance(expect, tuple):
        exc, fragment = expect
        with pytest.raises(exc, match=fragment):
            fn(**kwargs)
        return
    out = _first(fn(**kwargs))
    if expect == PROPAGATES:
        assert not torch.isfinite(out.float()).all()
    elif expect == NOT_CHECKED:
        assert out is not None
    elif expect == FLOAT32:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    elif expect == CALLER_DTYPE:
        dtype = next(v.dtype for v in change.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
    elif expect == SAME:
        torch.testing.assert_close(out, _first(fn(**base)))
    else:
        raise AssertionError(expect)


def cases(entries: dict) -> list:
    """Flatten ``{name: (fn, base_kwargs, {case_id: (change, expect)})}`` into pytest params.

    ``change`` maps argument names to a variant kind (applied to that tensor of
    ``base_kwargs``), ``"*"`` to a kind applied to every floating tensor, or to a value."""
    out = []
    for name, (fn, base, table) in entries.items():
        for case_id, (change, expect) in table.items():
            # a variant of an argument the base call lacks would test nothing
            lacking = [k for k, v in change.items() if k != "*" and k not in base and isinstance(v, str) and v in KINDS]
            if lacking:
                raise AssertionError(f"{name}-{case_id}: varies {lacking}, which the base call does not pass")
            out.append(pytest.param(fn, base, change, expect, id=f"{name}-{case_id}"))
    return out


def table_test(entries: dict):
    """The test of a module's table: one parametrized case per row of ``entries``."""

    @pytest.mark.parametrize("fn, base, change, expect", cases(entries))
    def test_bad_inputs(fn, base, change, expect):
        check_case(fn, base, resolve(base, change), expect)

    return test_bad_inputs


def resolve(base: dict, change: dict) -> dict:
    """``change`` with variant kinds replaced by the varied tensors of ``base``."""
    resolved = {}
    for k, v in change.items():
        if k == "*":
            for name, t in base.items():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    resolved[name] = variant(t, v)
        elif isinstance(v, str) and isinstance(base.get(k), torch.Tensor):
            resolved[k] = variant(base[k], v)
        else:
            resolved[k] = v
    return resolved


def tensor_rows(args, **expect) -> dict:
    """Rows ``{f"{arg}:{kind}": ({arg: kind}, expect[kind])}`` for every tensor argument;
    ``expect[kind]`` may be a dict per argument. Kinds: nan, inf, neginf, empty, int, meta,
    noncontig, shape, scalar (dtypes float16/bfloat16 go through ``"*"``)."""
    rows = {}
    for arg in args:
        for kind, e in expect.items():
            e = e.get(arg) if isinstance(e, dict) else e
            if e is not None:
                rows[f"{arg}:{kind}"] = ({arg: kind}, e)
    return rows


def numpy_int(**options) -> dict:
    """Rows passing each integer option as a NumPy integer: the same result."""
    return {f"{k}:np.int64": ({k: np.int64(v)}, SAME) for k, v in options.items()}
