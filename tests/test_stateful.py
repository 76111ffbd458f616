"""The base of stateful training components: declared options, declared state, one step template."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrokit import InputError
from entrokit._stateful import Option, StatefulModule, boolean, choice, integer, optional, real
from gloo_ranks import run_on_ranks

CALLS = {"momentum": 0}


def _counted_unit(value, name):
    CALLS["momentum"] += 1
    return real(lo=0.0, hi=1.0, hi_open=True, example="momentum=0.9")(value, name)


class Toy(StatefulModule):
    """EMA of a batch mean (all-reduced mean), a seen-count (summed), per-sample rows (gathered)."""

    state_name = "toy state"
    momentum = Option(_counted_unit)
    size = Option(integer(minimum=1, example="size=4"))
    low = Option(real(example="low=0.0"))
    high = Option(real(example="high=1.0"))
    kind = Option(choice(("ema", "last")))
    scale = Option(optional(real(lo=0.0, lo_open=True, example="scale=2.0")))
    flag = Option(boolean)

    def __init__(self, momentum=0.9, size=4, low=0.0, high=1.0, *, sync=None, check_inputs=True):
        super().__init__(sync=sync, check_inputs=check_inputs)
        self.momentum = momentum
        self.size = size
        self.low = low
        self.high = high
        self.kind = "ema"
        self.scale = None
        self.flag = False
        self.add_state("ema", torch.zeros(3, dtype=torch.float64), sync="mean")
        self.add_state("seen", torch.zeros((), dtype=torch.float64), sync="sum")
        self.add_state("rows", torch.zeros(size, 2, dtype=torch.float64), sync="gather")
        self._ready()

    def _check_relations(self):
        if self.low > self.high:
            raise InputError(f"low={self.low} exceeds high={self.high}")

    def _measure(self, x, index=None):
        stats = {"ema": x.mean(0), "seen": torch.tensor(float(x.shape[0]), dtype=torch.float64)}
        if index is not None:
            stats["rows"] = (index, x[:, :2])
        return stats

    def _write(self, stats):
        self.ema.mul_(self.momentum).add_((1 - self.momentum) * stats["ema"])
        self.seen += stats["seen"]
        if "rows" in stats:
            idx, rows = stats["rows"]
            self.rows[idx] = rows


class WeightedMean(StatefulModule):
    """An exact global mean over ranks with unequal batches: numerator and count are both summed."""

    def __init__(self):
        super().__init__()
        self.add_state("mean", torch.zeros(3, dtype=torch.float64))
        self.add_statistic("total", sync="sum")
        self.add_statistic("count", sync="sum")
        self._ready()

    def _measure(self, x):
        return {"total": x.sum(0), "count": torch.tensor(float(x.shape[0]), dtype=torch.float64)}

    def _write(self, stats):
        self.mean.copy_(stats["total"] / stats["count"])


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# -- options ---------------------------------------------------------------------------


def test_options_are_converted_and_checked_at_construction():
    m = Toy(momentum=np.float32(0.5), size=np.int64(3))
    assert m.momentum == 0.5 and isinstance(m.momentum, float)
    assert m.size == 3 and type(m.size) is int
    assert m.options()["size"] == 3
    assert "momentum=0.5" in repr(m)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.0}, InputError, r"momentum must lie in \[0, 1\), got 1.0; use e.g. momentum=0.9"),
        ({"momentum": float("nan")}, InputError, "momentum must lie in"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a real number, got str"),
        ({"momentum": True}, TypeError, "momentum must be a real number, got bool"),
        ({"size": 2.0}, TypeError, "size must be an int, got float"),
        ({"size": np.float64(2.0)}, TypeError, "size must be an int, got float64"),
        ({"size": 0}, InputError, "size must be an int >= 1, got 0"),
        ({"size": True}, TypeError, "size must be an int, got bool"),
        ({"low": 2.0, "high": 1.0}, InputError, "low=2.0 exceeds high=1.0"),
        ({"sync": "yes"}, TypeError, "sync must be None, True or False"),
        ({"check_inputs": 1}, TypeError, "check_inputs must be True or False"),
    ],
)
def test_bad_options_raise_typed_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Toy(**kwargs)


def test_assignment_is_checked_and_relations_too():
    m = Toy()
    with pytest.raises(InputError, match="momentum must lie in"):
        m.momentum = -0.1
    assert m.momentum == 0.9
    with pytest.raises(InputError, match="kind must be one of 'ema', 'last'; got 'mean'"):
        m.kind = "mean"
    m.scale = 2
    assert m.scale == 2.0
    m.scale = None
    with pytest.raises(InputError, match="low=5.0 exceeds high=1.0"):
        m.low = 5.0
    assert m.low == 0.0  # a refused assignment leaves the option as it was
    m.set_options(low=3.0, high=4.0)  # atomically: no transient violation
    assert (m.low, m.high) == (3.0, 4.0)
    with pytest.raises(InputError, match="exceeds"):
        m.set_options(low=9.0, high=8.0)
    assert (m.low, m.high) == (3.0, 4.0)  # rolled back
    with pytest.raises(InputError, match="has no option 'nope'"):
        m.set_options(nope=1)


def test_options_are_not_checked_on_every_step():
    m = Toy()
    before = CALLS["momentum"]
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(10):
        m.update_state(x)
    assert CALLS["momentum"] == before


# -- the step template -----------------------------------------------------------------


def test_update_applies_statistics():
    m = Toy(momentum=0.5, sync=False)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], dtype=torch.float64)
    m.update_state(x, torch.tensor([1, 3]))
    torch.testing.assert_close(m.ema, torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64))
    assert float(m.seen) == 2.0
    torch.testing.assert_close(m.rows[3], torch.tensor([3.0, 4.0], dtype=torch.float64))
    m.reset_state()
    assert float(m.ema.abs().sum()) == 0 and float(m.seen) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_batch_is_refused_and_state_unchanged(bad):
    m = Toy(sync=False)
    m.update_state(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    before = _snapshot(m)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = bad
    with pytest.raises(InputError, match=r"Toy did not update its toy state .* state is as before"):
        m.update_state(x, torch.tensor([0, 1, 2, 3]))
    assert _same(before, _snapshot(m))
    m.check_inputs = False  # skipped silently, still unchanged
    assert m.update_state(x, torch.tensor([0, 1, 2, 3])) is None
    assert _same(before, _snapshot(m))


def test_state_dict_round_trip_and_device_moves():
    m = Toy(sync=False)
    m.update_state(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    m2 = Toy(sync=False)
    m2.load_state_dict(m.state_dict())
    assert _same(_snapshot(m), _snapshot(m2))
    assert set(m.state_dict()) == {"ema", "seen", "rows"}


def test_sync_true_needs_a_process_group():
    m = Toy(sync=True)
    with pytest.raises(InputError, match="sync=True needs an initialised torch.distributed process group"):
        m.update_state(torch.randn(2, 3, dtype=torch.float64))


def test_undeclared_state_and_policy_are_refused():
    class Bad(Toy):
        def _measure(self, x, index=None):
            return {"nope": x.sum()}

    with pytest.raises(KeyError, match="not a declared state or statistic"):
        Bad(sync=False).update_state(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="sync policy of statistic 'x' must be one of"):
        Toy().add_state("x", torch.zeros(1), sync="max")


# -- two gloo ranks ----------------------------------------------------------------------

X0 = torch.arange(12, dtype=torch.float64).reshape(4, 3) / 10
X1 = -torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7


def _ddp_scenarios(rank: int):
    out = {}
    m = Toy(momentum=0.5, size=6)  # sync=None: all-reduces with 2 ranks
    x, idx = (X0, torch.tensor([0, 1, 2, 3])) if rank == 0 else (X1, torch.tensor([4, 5]))
    m.update_state(x, idx)
    out["ema"], out["seen"], out["rows"] = m.ema.clone(), m.seen.clone(), m.rows.clone()
    before = _snapshot(m)
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = math.nan
    try:
        m.update_state(bad, idx)
        out["raised"] = None
    except InputError as err:
        out["raised"] = str(err)
    out["unchanged"] = _same(before, _snapshot(m))
    w = WeightedMean()
    w.update_state(x)
    out["weighted"] = w.mean.clone()
    m.check_inputs = False
    out["skipped"] = m.update_state(bad, idx) is None and _same(before, _snapshot(m))
    return out


def test_two_ranks_reduce_and_refuse_together(tmp_path):
    r0, r1 = run_on_ranks(_ddp_scenarios, 2, tmp_path)
    mean = (X0.mean(0) + X1.mean(0)) / 2  # "mean" policy: average of the ranks' statistics
    for r in (r0, r1):
        torch.testing.assert_close(r["ema"], 0.5 * mean)
        assert float(r["seen"]) == 6.0  # "sum" policy
        torch.testing.assert_close(r["rows"][:4], X0[:, :2])  # "gather": every rank writes all rows
        torch.testing.assert_close(r["rows"][4:6], X1[:, :2])
        assert r["raised"] is not None and "rank(s) [1]" in r["raised"]
        assert r["unchanged"] and r["skipped"]
        torch.testing.assert_close(r["weighted"], torch.cat([X0, X1]).mean(0))  # 4 rows and 2 rows


# -- hooks that must not collide with nn.Module, compact defaults, the inputs' verdict ----


def test_dtype_and_device_moves_keep_working():
    # the write hook is not nn.Module._apply: .double()/.to() move the declared state
    m = Toy(sync=False).float()
    assert m.ema.dtype == torch.float32 and m.rows.dtype == torch.float32
    m = m.to(torch.float64)
    m.update_state(torch.ones(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
    torch.testing.assert_close(m.ema, torch.full((3,), 0.1, dtype=torch.float64))
    w = WeightedMean().to("cpu")
    w.update_state(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(w.mean, torch.full((3,), 2.0, dtype=torch.float64))


def test_constant_defaults_are_kept_as_one_element_and_reset():
    m = Toy(size=1000, sync=False)
    assert m._state_default["rows"].numel() == 1  # not a second [1000, 2] buffer
    m.update_state(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 5, 999]))
    assert m.rows.abs().sum() > 0
    m.reset_state()
    assert torch.equal(m.rows, torch.zeros(1000, 2, dtype=torch.float64))


class Softmaxed(StatefulModule):
    """A statistic that stays finite for a non-finite input (softmax of a -inf logit)."""

    state_name = "prior"

    def __init__(self, *, skip_without_sync=False, **kw):
        super().__init__(**kw)
        self.skip_without_sync = skip_without_sync
        self.add_state("prior", torch.full((3,), 1 / 3, dtype=torch.float64), sync="mean")
        self.add_state("rows", torch.zeros(4, 3, dtype=torch.float64), sync="gather")
        self._ready()

    def _measure(self, z, index):
        p = torch.softmax(z, 1)
        return {"prior": p.mean(0), "rows": (index, p), self.INPUTS_FINITE: torch.isfinite(z).all()}

    def _write(self, stats):
        self.prior.mul_(0.5).add_(0.5 * stats["prior"])
        idx, p = stats["rows"]
        self.rows[idx] = p


def _minus_inf_batch():
    z = torch.tensor([[0.0, -math.inf, 1.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    assert torch.isfinite(torch.softmax(z, 1)).all()
    return z, torch.tensor([1, 2])


def test_the_inputs_verdict_refuses_a_batch_with_finite_statistics():
    m = Softmaxed(sync=False)
    before = _snapshot(m)
    z, idx = _minus_inf_batch()
    with pytest.raises(InputError, match=r"^logits of this batch contain NaN or inf.*Softmaxed did not update its prior"):
        m.update_state(z, idx, what="logits of this batch")
    assert _same(before, _snapshot(m))
    m.check_inputs = False
    assert m.update_state(z, idx) is None
    assert _same(before, _snapshot(m))


def test_skip_without_sync_puts_the_state_back_without_a_host_sync(monkeypatch):
    m = Softmaxed(sync=False, check_inputs=False, skip_without_sync=True)
    m.update_state(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 3]))
    before = _snapshot(m)
    z, idx = _minus_inf_batch()

    def no_sync(*_):
        raise AssertionError("host sync")

    with monkeypatch.context() as mp:  # reading a tensor's value on the host is refused
        mp.setattr(torch.Tensor, "__bool__", no_sync)
        mp.setattr(torch.Tensor, "item", no_sync)
        m.update_state(z, idx)
        bad = torch.tensor([[1.0, math.nan, 0.0]], dtype=torch.float64)
        m.update_state(bad, torch.tensor([3]))
    assert _same(before, _snapshot(m))  # both batches skipped: prior and rows as before
    good = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    m.update_state(good, torch.tensor([1]))
    torch.testing.assert_close(m.rows[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(m.prior, 0.5 * before["prior"] + 0.5 / 3)
    assert torch.equal(m.rows[3], before["rows"][3])


# -- the constructor generated from the declared options ----------------------------------


class Band(StatefulModule):
    """Declared options only: the constructor is generated (positional, keyword-only, alias, fixed)."""

    state_name = "band state"
    low: float = Option(real(example="low=0.0"))
    high: float = Option(real(example="high=1.0"), default=1.0)
    start: float = Option(real(example="value=0.5"), default=0.5, kw_only=True, alias="value", fixed=True)
    size: int = Option(integer(minimum=1, example="size=4"), default=4, fixed=True)

    def _setup(self):
        self.add_state("value", torch.full((self.size,), self.start, dtype=torch.float64), sync="mean")

    def _check_relations(self):
        if self.low > self.high:
            raise InputError(f"low={self.low} exceeds high={self.high}")

    def _measure(self, x):
        return {"value": x}

    def _write(self, stats):
        self.value.copy_(stats["value"])


class NarrowBand(Band):
    """A redeclared option keeps its place and takes the new default; a new keyword-only one comes first."""

    high: float = Option(real(example="high=0.2"), default=0.2)
    gain: float = Option(real(example="gain=2.0"), default=2.0, kw_only=True)


def test_the_generated_constructor_has_the_declared_signature():
    import inspect

    params = inspect.signature(Band).parameters
    assert list(params) == ["low", "high", "size", "value", "sync", "check_inputs"]
    assert params["low"].default is inspect.Parameter.empty
    assert [params[n].kind.name for n in ("high", "value", "sync")] == [
        "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY", "KEYWORD_ONLY"]
    assert params["high"].annotation == "float" and params["sync"].default is None
    narrow = inspect.signature(NarrowBand).parameters
    assert list(narrow) == ["low", "high", "size", "gain", "value", "sync", "check_inputs"]
    assert narrow["high"].default == 0.2
    m = NarrowBand(np.float32(0.1), value=0.25, sync=False)
    assert (m.low, m.high, m.gain, m.start, m.size) == (pytest.approx(0.1), 0.2, 2.0, 0.25, 4)
    assert torch.equal(m.value, torch.full((4,), 0.25, dtype=torch.float64))
    assert m.options() == {"high": 0.2, "gain": 2.0, "low": m.low, "start": 0.25, "size": 4, "sync": False,
                           "check_inputs": True}


def test_the_generated_constructor_checks_arguments_and_relations():
    with pytest.raises(TypeError, match=r"Band\(\): missing a required argument: 'low'"):
        Band()
    with pytest.raises(TypeError, match=r"Band\(\): too many positional arguments"):
        Band(0.0, 1.0, 4, 0.5)  # value is keyword-only
    with pytest.raises(TypeError, match=r"Band\(\): got an unexpected keyword argument 'start'"):
        Band(0.0, start=0.5)  # the attribute's name is not the parameter's
    with pytest.raises(InputError, match="low=2.0 exceeds high=1.0"):
        Band(2.0)
    with pytest.raises(InputError, match=r"size must be an int >= 1, got 0"):
        Band(0.0, size=0)


def test_a_fixed_option_is_read_only_after_construction_and_the_state_is_kept():
    m = Band(0.0, size=3, sync=False)
    before = _snapshot(m)
    with pytest.raises(InputError, match="size of a Band is fixed when it is built .* build a new Band"):
        m.size = 5
    with pytest.raises(InputError, match="start of a Band is fixed"):
        m.set_options(start=0.1, high=2.0)
    assert (m.size, m.start, m.high) == (3, 0.5, 1.0)  # set_options rolled back
    assert _same(before, _snapshot(m))
    m.high = 3.0  # an option that is not fixed stays assignable
    assert m.high == 3.0


def test_declarations_that_cannot_make_a_constructor_fail_when_the_class_is_made():
    with pytest.raises(TypeError, match="option 'gain' has no type annotation; declare it as `gain: <type> = Option"):
        class Unannotated(StatefulModule):
            gain = Option(real(example="gain=1.0"), default=1.0)
    with pytest.raises(TypeError, match="the required option 'gain' follows 'size', which has a default; give 'gain' a default or make it keyword-only"):
        class RequiredAfterDefault(Band):
            gain: float = Option(real(example="gain=1.0"))


def test_a_hand_written_constructor_is_kept_by_its_subclasses():
    class Counted(Toy):  # Toy's __init__ is hand-written; a subclass without one inherits it
        pass

    m = Counted(momentum=0.5, size=2)
    assert type(m).__init__ is Toy.__init__
    assert (m.momentum, m.size, m.kind) == (0.5, 2, "ema")
    with pytest.raises(InputError, match="low=5.0 exceeds high=1.0"):  # relations are checked from _ready on
        m.low = 5.0


TYPED_CALLS = '''
from entrokit.nn import SparseOTRouter
from entrokit.regularizers import ELRLoss, LocalEntropyRegularizer, PSKDLoss
from entrokit.rl.controllers import AnchoredTargetController, DeadbandController, FixedCoef, PIController, SignController

SignController(target=0.5, coef=0.1, coef_max=0.2, apply_below_target=False, sync=False)
PIController(0.6, 0.1, 0.2, coef=0.3, check_inputs=False)
DeadbandController(0.1, 0.5, 1e-3, warmup=3, coef=2e-4)
AnchoredTargetController(ratio=0.5)
FixedCoef(1e-3)
ELRLoss(100, 10, 3.0, 0.7, reduction="sum")
PSKDLoss(10, 3, 4, alpha_T=0.5)
LocalEntropyRegularizer(10, 5, 0.7, sync=False)
SparseOTRouter(4, 2, 0.5, 10)
reveal_type(SignController(target=0.5).target)
SignController(taget=0.5)  # line 16
ELRLoss(100, 10, 3.0, 0.7, "mean")  # line 17: reduction is keyword-only
PIController(0.6, 0.1, 0.2, 0.3)  # line 18: coef is keyword-only
FixedCoef()  # line 19: coef is required
'''


def test_a_type_checker_sees_the_generated_constructors(tmp_path):
    """mypy reads the constructors through ``typing.dataclass_transform``: the calls the
    runtime accepts pass, the ones it refuses are errors on the same lines."""
    import os
    import subprocess
    import sys

    import entrokit

    (tmp_path / "calls.py").write_text(TYPED_CALLS)
    env = {**os.environ, "MYPYPATH": os.path.dirname(os.path.dirname(entrokit.__file__))}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
         "--hide-error-context", "--no-error-summary", "calls.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("calls.py:")]
    assert 'calls.py:15: note: Revealed type is "float"' in lines, out
    errors = sorted({int(line.split(":")[1]) for line in lines if ": error:" in line})
    assert errors == [16, 17, 18, 19], out
    assert any('Unexpected keyword argument "taget" for "SignController"' in line for line in lines), out
