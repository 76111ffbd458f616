"""The bookkeeping of the smooth-OT benchmark (entrokit.bench.smooth): the summary and
top-k rows from given times and errors, and the growing-cap rule of the anchors."""

import math
import time

import numpy as np
import pytest

from entrokit.bench.smooth import (
    TARGET,
    Run,
    _full_rows,
    _instances_in_processes,
    _load,
    _measure,
    _quadratic_row,
    _save,
    _stats,
    _to_target,
    _topk_row,
    make_problem_np,
)


def _run(cpu, err, killed=False):
    return Run(wall=cpu * 1.1, cpu=cpu, err=math.nan if killed else err, obj=0.1, nnz=5, killed=killed,
               runs=0 if killed else 3)


def _l2(pot_semi_err):
    return {
        "POT dual": _run(2.0, 5e-6),
        "POT semi_dual": _run(4.0, pot_semi_err),
        "RegOT qrot_grssn": _run(0.5, 1e-7),
        "RegOT qrot_lbfgs_dual": _run(0.3, 1e-3),
        "entrokit dual/newton": _run(0.2, 9e-7),
    }


def test_quadratic_row_against_the_fastest_anchor_runs():
    # RegOT: its fastest run whatever its error (0.2 / 0.3); POT: the fastest run as run
    # (0.2 / 2.0) and the fastest run that reached the target (0.2 / 4.0)
    assert _quadratic_row([_l2(1e-7)]) == ["200.0 ms", "9.0e-07", "300.0 ms (1.0e-03)", "0.667",
                                           "2.00 s (5.0e-06)", "0.100", "0.050", "yes"]


def test_quadratic_row_bounds_pot_by_its_longest_run_when_none_reached_the_target():
    row = _quadratic_row([_l2(2e-6)])
    assert row[6] == "< 0.050" and row[7] == "yes"
    res = _l2(1e-7)
    res["entrokit dual/newton"] = _run(0.2, 2e-6)  # entrokit missed the target
    assert _quadratic_row([res])[7] == "no"
    res["entrokit dual/newton"] = _run(0.4, 9e-7)  # slower than RegOT's fastest run
    assert _quadratic_row([res])[3] == "1.333" and _quadratic_row([res])[7] == "no"


def test_quadratic_row_takes_per_instance_ratios_then_their_median():
    slow = _l2(1e-7)
    slow["entrokit dual/newton"] = _run(0.45, 9e-7)  # 1.5x RegOT on this instance only
    fast = _l2(1e-7)
    fast["entrokit dual/newton"] = _run(0.03, 9e-7)
    row = _quadratic_row([_l2(1e-7), slow, fast])
    # ratios vs RegOT 0.667, 1.5, 0.1: median 0.667; errors: the largest; not met on every instance
    assert row[0] == "200.0 ms" and row[3] == "0.667" and row[7] == "no"
    worst = _l2(1e-7)
    worst["RegOT qrot_lbfgs_dual"] = _run(0.3, 5e-3)
    assert _quadratic_row([_l2(1e-7), worst, _l2(1e-7)])[2] == "300.0 ms (5.0e-03)"
    # one instance where no POT run reached the target: the median is an upper bound
    assert _quadratic_row([_l2(1e-7), _l2(2e-6), _l2(1e-7)])[6] == "< 0.050"


def test_topk_row_takes_entrokits_smaller_error_and_the_pot_runs_that_reach_it():
    res = {
        "entrokit semi_dual/lbfgs": _run(0.5, 3e-4),
        "entrokit dual/lbfgs": _run(0.2, 1e-3),
        "POT dual": _run(2.0, 2e-4),
        "POT semi_dual": _run(1.0, 5e-4),
    }
    assert _topk_row([res]) == ["500.0 ms (semi_dual)", "3.00e-04", "1.00 s", "2.00e-04", "0.500", "0.250"]
    res["POT dual"] = _run(2.0, 4e-4)  # no POT run at entrokit's error: bound by the longest
    assert _topk_row([res])[-1] == "< 0.250"


def test_full_rows_report_medians_the_largest_error_and_killed_counts():
    per_seed = [_l2(1e-7), _l2(1e-7), _l2(1e-7)]
    per_seed[1]["POT semi_dual"] = _run(8.0, 3e-7)
    per_seed[2]["POT semi_dual"] = _run(60.0, 0.0, killed=True)
    table = _full_rows(300, 0.1, None, per_seed)
    assert [r[3] for r in table] == ["entrokit dual/newton", "POT dual", "POT semi_dual", "RegOT qrot_grssn",
                                     "RegOT qrot_lbfgs_dual"]
    rows = {r[3]: r for r in table}
    assert rows["POT semi_dual"][4:] == ["8.00 s", "8.80 s", "2.00e-07 [3.00e-07]", "0.0e+00", 5, "1/3", 6]
    assert rows["entrokit dual/newton"][4:] == ["200.0 ms", "220.0 ms", "9.00e-07 [9.00e-07]", "0.0e+00", 5, "0/3", 9]


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
    (T, wall, cpu), tried, limited = _to_target(run, 1, 1e4, cap_max, err)
    cap = tried[-1]
    assert wall >= 0 and cpu >= 0 and not limited
    assert tried == caps
    assert err(T) == pytest.approx(error_of_cap(cap), rel=1e-9, abs=1e-18)
    assert (err(T) <= TARGET) == (error_of_cap(cap) <= TARGET)


def test_to_target_kills_an_attempt_at_its_cpu_budget():
    # the second attempt computes past the budget of CPU time: it is killed, no plan comes
    # back, and the call returns long before the loop would have ended
    slow_from = 4

    def run(cap):
        if cap >= slow_from:
            t = time.process_time()
            while time.process_time() - t < 30:
                pass
        T = np.diag(np.full(4, 0.25))
        T[0, 0] += 0.5  # error 1: far from the target, so the cap grows
        return T

    a, b, C = make_problem_np(4)
    t0 = time.perf_counter()
    out, tried, limited = _to_target(run, 1, 1.0, 10**6, lambda T: _stats(T, a, b, C, 0.1)[0])
    assert out is None and tried == [1, 4] and limited
    assert time.perf_counter() - t0 < 15


def test_to_target_stops_when_an_attempt_takes_two_thirds_of_the_budget():
    # an attempt of ~0.8 s CPU against a 1.1 s budget: the search stops there, budget-limited
    def run(cap):
        t = time.process_time()
        while time.process_time() - t < 0.8:
            pass
        return np.diag(np.full(4, 0.25)) + 0.01  # far from the target

    a, b, C = make_problem_np(4)
    (T, _, cpu), tried, limited = _to_target(run, 1, 1.1, 10**6, lambda T: _stats(T, a, b, C, 0.1)[0])
    assert tried == [1] and limited and cpu >= 0.8


def test_saved_instances_load_back_into_the_same_runs(tmp_path):
    results = {(300, 0.1, None, 0): _l2(1e-7), (300, 0.1, 2, 1): {"POT dual": _run(60.0, 0.0, killed=True)}}
    _save(str(tmp_path / "s.json"), results)
    back = _load([str(tmp_path / "s.json")])
    assert back.keys() == results.keys()
    assert back[(300, 0.1, None, 0)] == results[(300, 0.1, None, 0)]
    assert back[(300, 0.1, 2, 1)]["POT dual"].killed and math.isnan(back[(300, 0.1, 2, 1)]["POT dual"].err)


def test_rows_with_killed_runs_report_bounds():
    res = _l2(1e-7)
    res["RegOT qrot_grssn"] = _run(60.0, 0.0, killed=True)
    res["RegOT qrot_lbfgs_dual"] = _run(60.0, 0.0, killed=True)  # every RegOT run killed at 60 s
    row = _quadratic_row([res])
    assert row[2] == "> 60 s (killed)" and row[3] == "< 0.003" and row[7] == "yes"
    res = {
        "entrokit dual/lbfgs": _run(0.2, 1e-3),
        "POT dual": _run(60.0, 0.0, killed=True),
        "POT semi_dual": _run(60.0, 0.0, killed=True),
    }
    assert _topk_row([res]) == ["200.0 ms (dual)", "1.00e-03", "> 60 s (killed)", "n/a", "< 0.003", "< 0.003"]
    per_seed = [_l2(1e-7) for _ in range(3)]
    for res in per_seed[:2]:
        res["POT dual"] = _run(60.0, 0.0, killed=True)  # killed on two instances of three
    row = {r[3]: r for r in _full_rows(300, 0.01, None, per_seed)}["POT dual"]
    assert (row[4], row[5]) == ("> 60 s", "> 66 s") and row[6] == "5.00e-06 [5.00e-06]" and row[9] == "2/3"


def test_instances_in_processes_give_the_runs_of_this_process():
    # one process per instance, two at a time: every (size, gamma, k, seed) comes back, and
    # a run's error, objective and cardinality (deterministic) equal those measured here
    results = _instances_in_processes([0, 1], [12], budget=5.0, repeats=1, workers=2)
    assert set(results) == {(12, g, k, s) for g in (0.1, 0.01) for k in (None, 2) for s in (0, 1)}
    a, b, C = make_problem_np(12, 1)
    here = _measure(a, b, C, 0.01, 2, 5.0, 1)
    apart = results[(12, 0.01, 2, 1)]
    assert apart.keys() == here.keys()
    for name, r in here.items():
        assert (apart[name].err, apart[name].obj, apart[name].nnz) == (r.err, r.obj, r.nnz), name
