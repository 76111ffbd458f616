"""The bookkeeping of the smooth-OT benchmark (entrokit.bench.smooth): the summary and
top-k rows from given times and errors, and the growing-cap rule of the anchors."""

import math
import os
import time

import numpy as np
import pytest

from entrokit.bench.common import TimeLimitExceeded, call_with_time_limit
from entrokit.bench.smooth import (
    TARGET,
    _quadratic_row,
    _stats,
    _to_target,
    _topk_row,
    make_problem_np,
)


def _l2(pot_semi_err):
    return {
        ("l2", "POT dual"): (2.0, 5e-6),
        ("l2", "POT semi_dual"): (4.0, pot_semi_err),
        ("l2", "RegOT qrot_grssn"): (0.5, 1e-7),
        ("l2", "RegOT qrot_lbfgs_dual"): (0.3, 1e-3),
        ("l2", "entrokit dual/newton"): (0.2, 9e-7),
        ("topk k=2", "POT dual"): (9.0, 1e-2),  # another regularizer: not part of the row
    }


def test_quadratic_row_against_the_fastest_anchor_runs():
    # RegOT: its fastest run whatever its error (0.2 / 0.3); POT: the fastest run as run
    # (0.2 / 2.0) and the fastest run that reached the target (0.2 / 4.0)
    assert _quadratic_row(_l2(1e-7)) == ["200.0 ms", "9.0e-07", "300.0 ms (1.0e-03)", "0.667",
                                         "2.00 s (5.0e-06)", "0.100", "0.050", "yes"]


def test_quadratic_row_bounds_pot_by_its_longest_run_when_none_reached_the_target():
    row = _quadratic_row(_l2(2e-6))
    assert row[6] == "< 0.050" and row[7] == "yes"
    res = _l2(1e-7)
    res[("l2", "entrokit dual/newton")] = (0.2, 2e-6)  # entrokit missed the target
    assert _quadratic_row(res)[7] == "no"
    res[("l2", "entrokit dual/newton")] = (0.4, 9e-7)  # slower than RegOT's fastest run
    assert _quadratic_row(res)[3] == "1.333" and _quadratic_row(res)[7] == "no"


def test_topk_row_takes_entrokits_smaller_error_and_the_pot_runs_that_reach_it():
    res = {
        ("l2", "entrokit dual/newton"): (0.01, 1e-9),  # the quadratic problem: not part of the row
        ("topk k=2", "entrokit semi_dual/lbfgs"): (0.5, 3e-4),
        ("topk k=2", "entrokit dual/lbfgs"): (0.2, 1e-3),
        ("topk k=2", "POT dual"): (2.0, 2e-4),
        ("topk k=2", "POT semi_dual"): (1.0, 5e-4),
    }
    assert _topk_row(res) == ["500.0 ms (semi_dual)", "3.00e-04", "1.00 s", "2.00e-04", "0.500", "0.250"]
    res[("topk k=2", "POT dual")] = (2.0, 4e-4)  # no POT run at entrokit's error: bound by the longest
    assert _topk_row(res)[-1] == "< 0.250"


def _cap_solver(error_of_cap):
    """A plan whose marginal error is ``error_of_cap(cap)`` (one entry moved off the optimum)."""
    a, b, C = make_problem_np(4)
    opt = np.diag(a)

    def run(cap):
        T = opt.copy()
        T[0, 0] += error_of_cap(cap) / 2  # L1 marginal error: once in the row, once in the column
        return T

    return run, lambda T: _stats(T, a, b, C, 0.1)[0]


@pytest.mark.parametrize("error_of_cap, cap_max, caps", [
    (lambda c: 2.0 ** -c, 10**6, [1, 4, 16, 64]),  # grows 4x until the target (2^-64 <= 1e-6)
    (lambda c: 2.0 ** -min(c, 4), 10**6, [1, 4, 16]),  # stops itself: the plan no longer changes
    (lambda c: 2.0 ** -c, 10, [1, 4, 10]),  # the cap limit
])
def test_to_target_grows_the_cap_until_a_stopping_rule(error_of_cap, cap_max, caps):
    run, err = _cap_solver(error_of_cap)
    T, _, tried = _to_target(run, 1, 1e6, cap_max, err)
    cap = tried[-1]
    assert tried == caps
    assert err(T) == pytest.approx(error_of_cap(cap), rel=1e-9, abs=1e-18)
    assert (err(T) <= TARGET) == (error_of_cap(cap) <= TARGET)


def test_to_target_kills_an_attempt_at_the_budget():
    # the second attempt sleeps past the budget: it is killed, no plan comes back, and the
    # call returns long before the sleep would have ended
    slow_from = 4

    def run(cap):
        if cap >= slow_from:
            time.sleep(30)
        T = np.diag(np.full(4, 0.25))
        T[0, 0] += 0.5  # error 1: far from the target, so the cap grows
        return T

    a, b, C = make_problem_np(4)
    t0 = time.perf_counter()
    T, t, tried = _to_target(run, 1, 2.0, 10**6, lambda T: _stats(T, a, b, C, 0.1)[0])
    assert T is None and t is None and tried == [1, 4]
    assert time.perf_counter() - t0 < 15


def test_call_with_time_limit_returns_the_childs_value_and_raises_its_errors():
    pid = os.getpid()
    assert call_with_time_limit(lambda: (os.getpid() != pid, np.arange(3)), 30)[0] is True
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        call_with_time_limit(lambda: 1 / 0, 30)
    with pytest.raises(TimeLimitExceeded, match="killed after 0.2 s"):
        call_with_time_limit(lambda: time.sleep(30), 0.2)
    with pytest.raises(RuntimeError, match="child process died"):
        call_with_time_limit(lambda: os._exit(3), 30)


def test_rows_with_killed_runs_report_bounds():
    res = _l2(1e-7)
    res[("l2", "RegOT qrot_grssn")] = (60.0, math.inf)
    res[("l2", "RegOT qrot_lbfgs_dual")] = (60.0, math.inf)  # every RegOT run killed at 60 s
    row = _quadratic_row(res)
    assert row[2] == "> 60 s (killed)" and row[3] == "< 0.003" and row[7] == "yes"
    res = {
        ("topk k=2", "entrokit dual/lbfgs"): (0.2, 1e-3),
        ("topk k=2", "POT dual"): (60.0, math.inf),
        ("topk k=2", "POT semi_dual"): (60.0, math.inf),
    }
    assert _topk_row(res) == ["200.0 ms (dual)", "1.00e-03", "> 60 s (killed)", "n/a", "< 0.003", "< 0.003"]
