"""Coefficient controllers: closed loops on scalar plants against the documented settling times,
state_dict resume, non-finite measurements refused with the state unchanged, typed bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrokit import InputError
from entrokit.rl.controllers import (
    AnchoredTargetController,
    DeadbandController,
    DifficultyAwareCoef,
    FixedCoef,
    PIController,
    SignController,
    TemperatureScheduler,
)

H_FREE, GAIN = 0.2, 10.0  # static plant H_{k+1} = h + g c_k


def run_loop(ctrl, h0, steps, *, rate=1.0, h=H_FREE, g=GAIN):
    """Close the loop on H_{k+1} = H_k + a (h + g c_k - H_k); return [H_0, ..., H_steps] and [c_k]."""
    hs, cs = [h0], []
    for _ in range(steps):
        ctrl.step(hs[-1])
        c = ctrl.value
        cs.append(c)
        hs.append(hs[-1] + rate * (h + g * c - hs[-1]))
    return hs, cs


FACTORIES = {
    "fixed": lambda: FixedCoef(0.03, sync=False),
    "sign": lambda: SignController(target=0.6, delta=0.005, sync=False),
    "deadband": lambda: DeadbandController(low=0.3, high=0.5, lr=0.05, coef=0.06, coef_min=0.0, coef_max=1.0,
                                           sync=False),
    "anchored": lambda: AnchoredTargetController(ratio=0.8, lr=0.05, coef=0.05, sync=False),
    "pi": lambda: PIController.tuned(0.6, GAIN, rate=0.3, lam=0.5, sync=False),
    "difficulty": lambda: DifficultyAwareCoef(AnchoredTargetController(ratio=0.8, lr=0.05, coef=0.05, sync=False)),
    "temperature": lambda: TemperatureScheduler(target=0.5, sync=False),
}


# -- closed loops: each controller reaches and holds its target within its documented time ----


def test_fixed_coefficient_settles_at_the_level_it_sets():
    hs, cs = run_loop(FACTORIES["fixed"](), 0.9, 20)
    assert cs == [0.03] * 20
    assert all(abs(x - (H_FREE + GAIN * 0.03)) < 1e-12 for x in hs[1:])


def test_sign_step_reaches_the_band_in_the_documented_steps_and_stays():
    target, delta = 0.6, 0.005
    ctrl = SignController(target=target, delta=delta, apply_below_target=False, sync=False)
    hs, cs = run_loop(ctrl, H_FREE, 200)
    c_star = (target - H_FREE) / GAIN
    n = math.ceil(c_star / delta) + 1  # documented: |H_k - H*| <= g delta from step n on
    assert all(abs(x - target) <= GAIN * delta + 1e-9 for x in hs[n:])
    assert abs(hs[n - 3] - target) > GAIN * delta  # and not much earlier: the bound is nearly tight
    assert max(cs) <= c_star + delta + 1e-12


def test_sign_step_with_trl_gate_is_a_one_sided_limiter():
    target, delta = 0.6, 0.005
    ctrl = SignController(target=target, delta=delta, sync=False)
    assert ctrl.value == 0.0  # TRL: nothing applied before the first measurement (last = inf)
    hs, cs = run_loop(ctrl, 0.9, 200)
    n = math.ceil((target - H_FREE) / GAIN / delta) + 1
    assert all(x <= target + GAIN * delta + 1e-9 for x in hs[n:])
    # every step above the target is followed by a step with no bonus
    for k in range(1, 200):
        if hs[k] > target:
            assert cs[k] == 0.0


def test_deadband_distance_contracts_by_one_minus_g_eta():
    ctrl = FACTORIES["deadband"]()  # H_0 = h + g coef = 0.8, above the band [0.3, 0.5]
    h0 = H_FREE + GAIN * 0.06
    hs, _ = run_loop(ctrl, h0, 80)
    ge = GAIN * 0.05
    d0 = h0 - 0.5
    for k, x in enumerate(hs):
        assert x - 0.5 == pytest.approx(d0 * (1 - ge) ** k, abs=1e-12)  # from above, never enters below
    tol = 1e-3
    n = math.ceil(math.log(tol / d0) / math.log(1 - ge))
    assert all(x - 0.5 <= tol for x in hs[n:]) and hs[n - 1] - 0.5 > tol


def test_deadband_rests_inside_the_band_and_honours_warmup():
    ctrl = DeadbandController(low=0.3, high=0.5, lr=0.05, coef=0.02, coef_min=0.0, coef_max=1.0, warmup=3,
                              sync=False)
    hs, cs = run_loop(ctrl, H_FREE + GAIN * 0.02, 30)  # H = 0.4 inside the band
    assert cs == [0.02] * 30 and all(abs(x - 0.4) < 1e-12 for x in hs)
    ctrl = DeadbandController(low=0.3, high=0.5, lr=0.05, coef=0.0, coef_min=0.0, coef_max=1.0, warmup=3,
                              sync=False)
    _, cs = run_loop(ctrl, H_FREE, 10)
    assert cs[:3] == [0.0, 0.0, 0.0] and cs[3] > 0  # held during warmup, then integrates up


def test_anchored_target_from_the_first_measurement():
    ctrl = FACTORIES["anchored"]()
    h0 = H_FREE + GAIN * 0.05  # 0.7
    hs, _ = run_loop(ctrl, h0, 60)
    target = 0.8 * h0
    assert ctrl.target == pytest.approx(target)
    e0 = target - h0
    tol = 1e-3
    n = math.ceil(math.log(tol / abs(e0)) / math.log(abs(1 - GAIN * 0.05)))
    assert all(abs(x - target) <= tol for x in hs[n:]) and abs(hs[n - 1] - target) > tol
    assert float(ctrl.anchor) == pytest.approx(h0)  # the anchor does not move afterwards


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_pi_dead_beat_with_lambda_one(rate):
    # the documented time holds while the coefficient stays in its box: give it room to go negative
    ctrl = PIController.tuned(0.6, GAIN, rate=rate, lam=1.0, coef_min=-1.0, sync=False)
    hs, _ = run_loop(ctrl, 0.9, 40, rate=rate)
    assert all(abs(x - 0.6) < 1e-9 for x in hs[2:])  # documented: zero error from step 2 on


@pytest.mark.parametrize("lam", [0.5, 1.5])
def test_pi_settles_in_the_documented_time(lam):
    rate = 0.3
    ctrl = PIController.tuned(0.6, GAIN, rate=rate, lam=lam, coef_min=-1.0, sync=False)
    hs, cs = run_loop(ctrl, 0.9, 200, rate=rate)
    e = [0.6 - x for x in hs]
    for k in range(1, 199):  # e_{k+1} = (1 - lambda) e_k after the first step
        assert e[k + 1] == pytest.approx((1 - lam) * e[k], abs=1e-12)
    tol = 1e-4
    n = 1 + math.ceil(math.log(tol / abs(e[1])) / math.log(abs(1 - lam)))
    assert all(abs(x) <= tol for x in e[n:]) and abs(e[n - 1]) > tol
    assert cs[-1] == pytest.approx((0.6 - H_FREE) / GAIN)


def test_pi_anti_windup_recovers_after_saturation():
    ctrl = PIController.tuned(0.6, GAIN, lam=1.0, coef_max=0.02, sync=False)  # needs 0.04: saturated
    hs, cs = run_loop(ctrl, H_FREE, 100)
    assert max(cs) == 0.02 and float(ctrl.integral) == pytest.approx(0.02 / ctrl.ki)  # no wind-up
    ctrl.coef_max = 1.0
    hs, _ = run_loop(ctrl, hs[-1], 10)
    assert all(abs(x - 0.6) < 1e-9 for x in hs[3:])


def test_difficulty_aware_coefficients_follow_the_global_one():
    ctrl = FACTORIES["difficulty"]()
    hs, _ = run_loop(ctrl, H_FREE + GAIN * 0.05, 40)  # the global coefficient is the base's
    assert abs(hs[-1] - 0.8 * hs[0]) < 1e-3
    acc = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    c = ctrl(acc)
    torch.testing.assert_close(c, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]) * ctrl.value)


def test_temperature_scheduler_alternates_around_the_target():
    sched = TemperatureScheduler(target=0.5, t_low=0.8, t_high=1.2, num_samples=np.int64(60), sync=False)
    assert sched.temperature == 0.8 and sched.samples == 30  # no measurement yet: counts as above
    h_of_t = {0.8: 0.3, 1.2: 0.7}  # entropy monotone in the temperature
    h, sides = 0.3, []
    for _ in range(20):
        t = sched.step(h)
        h = h_of_t[t]
        sides.append(h > 0.5)
    assert all(a != b for a, b in zip(sides, sides[1:]))
    sched.step(0.4)
    assert sched.temperature == 1.2 and sched.samples == 60


# -- resume, refusal, bad inputs --------------------------------------------------------------


def _drive(ctrl, values):
    out = []
    for v in values:
        ctrl.step(v)
        out.append(ctrl.value if not isinstance(ctrl, TemperatureScheduler) else ctrl.temperature)
    return out


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_resumes_exactly(name):
    a = FACTORIES[name]()
    _drive(a, [0.9, 0.4, 0.55, 0.3])
    b = FACTORIES[name]()
    b.load_state_dict(a.state_dict())
    seq = [0.2, 0.7, 0.45, 0.61, 0.1]
    assert _drive(a, seq) == _drive(b, seq)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, torch.tensor(-math.inf), np.float64("nan")])
def test_non_finite_measurement_is_refused_and_state_unchanged(name, bad):
    ctrl = FACTORIES[name]()
    _drive(ctrl, [0.9, 0.4])
    before = {k: v.clone() for k, v in ctrl.state_dict().items()}
    with pytest.raises(InputError, match=r"contain NaN or inf.* did not update"):
        ctrl.step(bad)
    assert all(torch.equal(before[k], v) for k, v in ctrl.state_dict().items())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: SignController(target=0.5, delta=0.0), InputError, r"delta must lie in \(0, inf\)"),
        (lambda: SignController(target="high"), TypeError, "target must be a real number, got str"),
        (lambda: SignController(target=0.5, coef=2.0), InputError, r"coef=2.0 lies outside \[coef_min, coef_max\]"),
        (lambda: SignController(target=0.5, coef_min=0.5, coef_max=0.1), InputError, "coef_min=0.5 exceeds coef_max"),
        (lambda: DeadbandController(low=0.6, high=0.5), InputError, "low=0.6 exceeds high=0.5"),
        (lambda: DeadbandController(lr=-1e-3), InputError, r"lr must lie in \(0, inf\)"),
        (lambda: DeadbandController(warmup=2.5), TypeError, "warmup must be an int, got float"),
        (lambda: DeadbandController(warmup=np.float32(3)), TypeError, "warmup must be an int, got float32"),
        (lambda: DeadbandController(warmup=-1), InputError, "warmup must be an int >= 0"),
        (lambda: AnchoredTargetController(ratio=0.0), InputError, r"ratio must lie in \(0, inf\)"),
        (lambda: PIController(0.6, kp=-1.0, ki=0.1), InputError, r"kp must lie in \[0, inf\)"),
        (lambda: PIController.tuned(0.6, 5.0, lam=2.0), InputError, r"lam must lie in \(0, 2\)"),
        (lambda: PIController.tuned(0.6, 0.0), InputError, r"gain must lie in \(0, inf\)"),
        (lambda: PIController.tuned(0.6, 5.0, rate=1.5), InputError, r"rate must lie in \(0, 1\]"),
        (lambda: TemperatureScheduler(t_low=0.0), InputError, r"t_low must lie in \(0, inf\)"),
        (lambda: TemperatureScheduler(t_low=1.5, t_high=1.2), InputError, "t_low=1.5 exceeds t_high=1.2"),
        (lambda: DifficultyAwareCoef(FixedCoef(0.1), tau=0.0), InputError, r"tau must lie in \(0, 1\]"),
        (lambda: DifficultyAwareCoef(torch.nn.Linear(1, 1)), TypeError, "base must be an entrokit.rl controller"),
    ],
)
def test_bad_options_raise_typed_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_options_checked_on_assignment_and_numpy_scalars_accepted():
    ctrl = DeadbandController(warmup=np.int64(2), low=np.float32(0.25))
    assert ctrl.warmup == 2 and type(ctrl.warmup) is int and ctrl.low == 0.25
    with pytest.raises(InputError, match="low=0.9 exceeds high=0.5"):
        ctrl.low = 0.9
    with pytest.raises(InputError, match=r"delta must lie in \(0, inf\)"):
        SignController(target=0.5).delta = -1


@pytest.mark.parametrize(
    ("measured", "error", "match"),
    [
        (torch.tensor([0.1, 0.2]), InputError, r"must be one number .* got a tensor of shape \(2,\)"),
        ("0.5", TypeError, "must be a real number or a 1-element tensor, got str"),
        (True, TypeError, "got bool"),
        (torch.tensor(True), TypeError, "must be a real number, got a torch.bool tensor"),
    ],
)
def test_bad_measurements(measured, error, match):
    with pytest.raises(error, match=match):
        PIController(0.6, 0.0, 0.1, sync=False).step(measured)


def test_measurement_types_accepted():
    ctrl = FixedCoef(0.1, sync=False)
    for v in (0.5, 1, np.float32(0.5), np.int64(1), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.bfloat16)):
        assert ctrl.step(v) == pytest.approx(0.1)
    assert int(ctrl.num_steps) == 6


@pytest.mark.parametrize(
    ("acc", "error", "match"),
    [
        (torch.tensor([0.5, 1.5]), InputError, r"finite fractions in \[0, 1\]"),
        (torch.tensor([0.5, math.nan]), InputError, r"finite fractions in \[0, 1\]"),
        (torch.tensor([1, 0]), TypeError, "accuracy must have a floating dtype"),
        (torch.zeros(0), InputError, "num_prompts >= 1"),
        ([0.5], TypeError, "accuracy must be a torch.Tensor"),
    ],
)
def test_difficulty_aware_bad_accuracy(acc, error, match):
    with pytest.raises(error, match=match):
        DifficultyAwareCoef(FixedCoef(0.1, sync=False))(acc)


def test_sync_true_without_process_group():
    with pytest.raises(InputError, match="sync=True needs an initialised torch.distributed process group"):
        SignController(target=0.5, sync=True).step(0.3)


def _two_rank_controller(rank: int):
    ctrl = PIController(0.6, kp=0.5, ki=0.2)  # sync=None: averages the measurement over the ranks
    ctrl.step([0.4, 0.6][rank])
    out = {"coef": ctrl.value, "last": float(ctrl.last)}
    try:
        ctrl.step([0.5, math.nan][rank])
        out["raised"] = False
    except InputError:
        out["raised"] = True
    out["after"] = ctrl.value
    return out


def test_two_ranks_share_one_coefficient(tmp_path):
    from gloo_ranks import run_on_ranks

    single = PIController(0.6, kp=0.5, ki=0.2, sync=False)
    single.step(0.5)
    for r in run_on_ranks(_two_rank_controller, 2, tmp_path):
        assert r["last"] == pytest.approx(0.5) and r["coef"] == pytest.approx(single.value)
        assert r["raised"] and r["after"] == pytest.approx(single.value)  # NaN on rank 1: both refuse


def test_sign_controller_matches_trl_update_rule():
    """TRL grpo_trainer.py (use_adaptive_entropy), transcribed: the applied coefficient of each step."""
    target, delta, lo, hi = 0.5, 0.1, 0.0, 0.3
    coef, last = 0.0, float("inf")
    ctrl = SignController(target=target, delta=delta, coef=0.0, coef_min=lo, coef_max=hi, sync=False)
    measurements = [0.7, 0.45, 0.3, 0.2, 0.5, 0.6, 0.4, 0.1, 0.1, 0.1, 0.9]
    for h in measurements:
        apply_coef = coef if last <= target else 0.0  # TRL: applied during this window
        assert ctrl.value == pytest.approx(apply_coef)
        coef = min(coef + delta, hi) if h <= target else max(coef - delta, lo)  # at the step boundary
        last = h
        ctrl.step(h)
    assert float(ctrl.coef) == pytest.approx(coef)
