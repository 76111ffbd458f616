"""The dense Sinkhorn benchmark (entrokit.bench.sinkhorn): its problem, the L1 error it
scores every library by, the runners of entrokit and the anchors on small problems, and
the rows it builds from given times and errors."""

import math

import numpy as np
import pytest
import torch

from entrokit.bench import sinkhorn as bs
from entrokit.bench.common import write_results
from entrokit.bench.sinkhorn import (
    ACCEPT,
    FAST,
    SLOW,
    TARGET,
    _budgeted,
    _cell,
    _instance_runs,
    _median,
    _ours,
    _pot,
    _row,
    _summary,
    instance,
    l1_error,
)
from ot_checks import l1_by_hand


@pytest.mark.parametrize("n, seed", [(5, 0), (37, 2)])
def test_instance_is_a_seeded_uniform_cost_with_uniform_weights(n, seed):
    C, a = instance(n, seed)
    assert C.shape == (n, n) and C.dtype == np.float64 and a.shape == (n,) and a.dtype == np.float64
    assert np.array_equal(C, np.random.default_rng(seed).random((n, n)))
    assert 0.0 <= C.min() and C.max() < 1.0
    assert np.all(a == 1.0 / n) and math.fsum(a) == pytest.approx(1.0, abs=1e-15)
    assert np.array_equal(instance(n, seed)[0], C)  # same seed, same instance
    assert not np.allclose(instance(n, seed + 1)[0], C)


def test_l1_error_is_the_error_of_both_marginals():
    a, b = np.array([0.5, 0.3, 0.2]), np.array([0.25, 0.25, 0.5])
    P = np.outer(a, b)
    assert l1_error(P, a, b) == pytest.approx(0.0, abs=1e-16)
    P[0, 1] += 1e-3  # once in row 0, once in column 1
    P[2, 2] -= 4e-4
    assert l1_error(P, a, b) == pytest.approx(2 * 1e-3 + 2 * 4e-4, rel=1e-12)
    assert l1_error(P, a, b) == pytest.approx(l1_by_hand(P, a, b), rel=1e-12)


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_l1_error_upcasts_a_float32_plan_before_summing(as_torch):
    # a float32 plan near the target: rounding its 2500 entries moves the marginals by
    # ~1e-10, summing in float32 by ~1e-9; only float64 sums see the plan's own error
    rng = np.random.default_rng(0)
    a, b = rng.random(50) + 0.5, rng.random(50) + 0.5
    a, b = a / a.sum(), b / b.sum()
    P32 = np.outer(a, b).astype(np.float32)
    expected = l1_by_hand(P32, a, b)
    P = torch.from_numpy(P32) if as_torch else P32
    assert l1_error(P, a, b) == pytest.approx(expected, rel=1e-6)
    summed_in_float32 = float(np.abs(P32.sum(1) - a).sum() + np.abs(P32.sum(0) - b).sum())
    assert summed_in_float32 != pytest.approx(expected, rel=1e-2)  # the test tells the two apart


@pytest.fixture(scope="module")
def small():
    M, a = instance(40, 0)
    return M, a, torch.from_numpy(M), torch.from_numpy(a)


@pytest.mark.parametrize("eps", [1e-1, 1e-2])
@pytest.mark.parametrize("solver", ["entrokit", "sinkhorn", "sinkhorn_stabilized", "sinkhorn_log", "RegOT"])
def test_runners_reach_the_l1_target_recomputed_here(small, solver, eps):
    M, a, C, w = small
    if solver == "entrokit":
        res = _ours(C, w, eps)
        assert bool(res.converged) and res.plan.dtype == torch.float64
        P = res.plan.numpy()
    elif solver == "RegOT":  # as _instance_runs calls it (with a cap it does not reach here)
        import regot

        P = regot.sinkhorn_bcd(np.asfortranarray(M), a, a, eps, tol=TARGET / math.sqrt(2 * len(a)), max_iter=10**5).plan
    else:
        P = _pot(solver, M, a, eps)
    P = np.asarray(P)
    assert P.shape == (40, 40)
    err = l1_by_hand(P, a, a)
    assert l1_error(P, a, a) == pytest.approx(err, rel=1e-9, abs=1e-15)
    assert err <= TARGET * ACCEPT


def test_instance_runs_record_every_solver_with_the_error_of_its_plan():
    out = _instance_runs(30, 1, 0.1, repeats=2, budget=2.0, slow=True)
    assert set(out) == {*FAST, *SLOW}
    for name in FAST:
        assert len(out[name]["cpu"]) == len(out[name]["wall"]) == 2, name
    for name in SLOW:  # one budgeted run
        assert len(out[name]["cpu"]) == len(out[name]["wall"]) == 1, name
    for name, r in out.items():
        assert 0.0 <= r["err"] <= TARGET * ACCEPT, name
    assert out["entrokit"]["ok"] is True and out["entrokit"]["iters"] > 0
    # the recorded error is the plan's (entrokit is deterministic: solve again)
    M, a = instance(30, 1)
    plan = _ours(torch.from_numpy(M), torch.from_numpy(a), 0.1).plan
    assert out["entrokit"]["err"] == pytest.approx(l1_by_hand(plan, a, a), rel=1e-9)
    assert set(_instance_runs(30, 1, 0.1, repeats=1, budget=2.0, slow=False)) == set(FAST)


def test_budgeted_caps_the_iterations_from_the_probe(monkeypatch):
    # 2^-10 s per iteration: a 0.5 s budget allows 512 iterations; the probe is not returned
    calls = []

    def run(k):
        calls.append(k)
        return k

    monkeypatch.setattr(bs, "_clock", lambda fn: (lambda k: (k, k / 1024, k / 1024))(fn()))
    assert _budgeted(run, 20, 0.5, lambda k: False) == (512, 0.5, 0.5)
    assert calls == [20, 512]
    calls.clear()
    assert _budgeted(run, 20, 1e-3, lambda k: False)[0] == 20 and calls == [20, 20]  # never below the probe


def test_budgeted_raises_a_cap_that_a_slow_probe_set_too_low(monkeypatch):
    # 1 ms per iteration, plus 0.1 s of fixed cost in the 20-iteration probe: it reads 6 ms per
    # iteration, so the first cap (166) ends in a sixth of the budget short of the target
    # (300 iterations); the cap is raised to fill 90% of the budget (x 5.4)
    calls = []

    def run(k):
        calls.append(k)
        return k

    def clock(fn):
        k = fn()
        wall = k / 1000 + (0.1 if k == 20 else 0.0)
        return k, wall, wall

    monkeypatch.setattr(bs, "_clock", clock)
    out, wall, _ = _budgeted(run, 20, 1.0, lambda k: k >= 300)
    assert calls == [20, 166, 900] and out == 900 and wall == pytest.approx(0.9)
    calls.clear()  # a solver that stops by its own rule short of the target: caps grow to 1e8, each run short
    monkeypatch.setattr(bs, "_clock", lambda fn: (min(fn(), 50), 0.05, 0.05))
    assert _budgeted(run, 20, 1.0, lambda k: False) == (50, 0.05, 0.05) and calls[-1] == 10**8


def _r(cpu, err, **kw):
    return {"cpu": list(cpu), "wall": [1.5 * c for c in cpu], "err": err, **kw}


def _per_seed():
    """Three instances; RegOT and POT sinkhorn_log only on the first (as in ``_instance_runs``)."""
    return [
        {
            "entrokit": _r([0.1, 0.3, 0.2], 4e-7, iters=10, ok=True),
            "POT sinkhorn (default)": _r([0.5, 0.4, 0.6], 9e-7),
            "POT sinkhorn_stabilized": _r([0.3], 2e-6),  # missed the target: not repeated
            "POT sinkhorn_log": _r([2.0], 5e-7),
            "RegOT sinkhorn_bcd": _r([0.25], 1e-7),
        },
        {
            "entrokit": _r([0.3, 0.3, 0.3], 1e-7, iters=14, ok=True),
            "POT sinkhorn (default)": _r([0.3, 0.3, 0.3], 2e-7),
            "POT sinkhorn_stabilized": _r([0.35, 0.35, 0.35], 5e-7),
        },
        {
            "entrokit": _r([0.1, 0.1, 0.1], 2e-7, iters=11, ok=True),
            "POT sinkhorn (default)": _r([0.2, 0.2, 0.2], 3e-7),
            "POT sinkhorn_stabilized": _r([0.15, 0.15, 0.15], 5e-7),
        },
    ]


def test_median_and_summary_over_instances():
    assert _median([]) is None and _median([3.0, 1.0, 2.0, 10.0]) == 2.5
    per_seed = _per_seed()
    # cpu: median over instances (0.2, 0.3, 0.1) of the medians over repeats; wall likewise
    cpu, wall, err, ok = _summary(per_seed, "entrokit")
    assert (cpu, err, ok) == (pytest.approx(0.2), 4e-7, True) and wall == pytest.approx(0.3)
    assert _summary(per_seed, "POT sinkhorn_stabilized")[2:] == (2e-6, False)  # one instance missed
    assert _summary(per_seed, "RegOT sinkhorn_bcd") == (0.25, 0.375, 1e-7, True)  # the one instance
    assert _summary(per_seed, "OTT inner=1") is None
    slack = _per_seed()
    slack[1]["entrokit"]["err"] = TARGET * ACCEPT  # within each library's rounding slack
    assert _summary(slack, "entrokit")[3] is True
    slack[1]["entrokit"]["err"] = TARGET * ACCEPT * 1.001
    assert _summary(slack, "entrokit")[3] is False


@pytest.mark.parametrize("summary, cell", [
    (None, "n/a"),
    ((0.0123, 0.02, 1e-7, True), "12.3 ms (20.0 ms)"),
    ((1.5, 2.25, 1e-7, True), "1.50 s (2.25 s)"),
    ((4.0, 4.6, 3e-6, False), "> 4.00 s (err 3e-06)"),  # missed at its cap (wall >= budget / 2)
    ((2.0, 2.4, 3e-6, False), "err 3e-06 > target"),  # stopped by its own rule above the target
])
def test_cell_formats_a_summary(summary, cell):
    assert _cell(summary, 5.0) == cell


def test_row_takes_per_instance_ratios_and_the_fastest_anchor_that_reached_the_target():
    row, r_default, ours = _row(30, 0.01, _per_seed(), {}, 5.0)
    # ratios vs POT default per instance 0.2/0.5, 0.3/0.3, 0.1/0.2: median 0.5 (not 0.2/0.3);
    # stabilized missed the target, so the fastest anchor is RegOT (0.25): 0.2/0.25
    assert row == [30, "0.01", "200.0 ms (300.0 ms)", 11, "300.0 ms (450.0 ms)", "err 2e-06 > target",
                   "2.00 s (3.00 s)", "250.0 ms (375.0 ms)", "0.50", "0.80 (RegOT sinkhorn_bcd)", "yes",
                   "4.0e-07 / 9.0e-07"]
    assert r_default == pytest.approx(0.5) and ours[0] == pytest.approx(0.2)
    # an OTT configuration (one more cell) that is faster still
    row, _, _ = _row(30, 0.01, _per_seed(), {"OTT inner=1": (0.1, 0.12, 5e-7, True)}, 5.0)
    assert len(row) == 13 and row[8] == "100.0 ms (120.0 ms)" and row[10] == "2.00 (OTT inner=1)"
    # an OTT configuration that missed the target is not the fastest anchor
    row, _, _ = _row(30, 0.01, _per_seed(), {"OTT inner=1": (0.1, 0.12, 5e-6, False)}, 5.0)
    assert row[8] == "err 5e-06 > target" and row[10] == "0.80 (RegOT sinkhorn_bcd)"


def test_row_marks_a_missed_target():
    per_seed = _per_seed()
    per_seed[1]["POT sinkhorn (default)"]["err"] = 2e-6  # POT's default missed on one instance
    row, r_default, _ = _row(30, 0.01, per_seed, {}, 5.0)
    assert row[4] == "err 2e-06 > target" and row[8] == "0.50 (POT missed target)"
    assert row[9] == "0.80 (RegOT sinkhorn_bcd)" and row[11] == "4.0e-07 / 2.0e-06"
    per_seed = _per_seed()
    per_seed[2]["entrokit"]["ok"] = False  # entrokit did not converge on one instance
    row, _, _ = _row(30, 0.01, per_seed, {}, 5.0)
    assert row[2] == "failed" and row[10] == "no"
    per_seed = _per_seed()
    per_seed[0]["entrokit"]["err"] = 3e-6  # entrokit's plan above the target
    row, _, _ = _row(30, 0.01, per_seed, {}, 5.0)
    assert row[2] == "failed" and row[10] == "no" and row[11] == "3.0e-06 / 9.0e-07"
    per_seed = _per_seed()
    for r in per_seed:  # slower than 0.8 x POT's default
        r["entrokit"]["cpu"] = [0.9 * c for c in r["POT sinkhorn (default)"]["cpu"]]
    row, r_default, _ = _row(30, 0.01, per_seed, {}, 5.0)
    assert r_default == pytest.approx(0.9) and row[8] == "0.90" and row[10] == "no"
    for r in per_seed:  # no anchor reached the target
        for k in r:
            if k != "entrokit":
                r[k]["err"] = 1e-3
    assert _row(30, 0.01, per_seed, {}, 5.0)[0][9] == "n/a"


def test_run_quick_gives_one_row_per_size_and_eps(monkeypatch, tmp_path):
    monkeypatch.delenv("ENTROKIT_OTT_PYTHON", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tables = bs.run(quick=True, sizes=[20, 30], seeds=(0, 1), repeats=1, budget=0.2)
        assert torch.get_num_threads() == 2  # one thread inside run(), the caller's count back after it
    finally:
        torch.set_num_threads(threads)
    assert len(tables) == 1  # the per-iteration table only in the full run
    (table,) = tables
    assert list(table.columns) == [
        "n", "eps", "entrokit", "iters", "POT sinkhorn (default)", "POT stabilized", "POT log", "RegOT bcd",
        "ratio vs POT default", "ratio vs fastest anchor", "target <= 0.8 x POT default",
        "worst L1 error (ek / POT default)",
    ]
    assert "2 instances x 1 repeats" in table.title
    assert [tuple(r[:2]) for r in table.rows] == [(n, e) for n in ("20", "30") for e in ("0.1", "0.01", "0.001")]
    for r in table.rows:
        assert len(r) == len(table.columns) and int(r[3]) > 0 and r[10] in ("yes", "no")
        float(r[8].split()[0])  # the ratio vs POT's default is always a number
    for r in table.rows[::3]:  # eps = 0.1: entrokit reaches the target
        assert r[2] != "failed" and float(r[11].split(" / ")[0]) <= TARGET * ACCEPT
    import ot

    assert f"versions: POT {ot.__version__}" in table.notes[-2] and table.notes[-1].startswith("OTT-JAX: not run")
    text = write_results("sinkhorn_quick", tables, tmp_path).read_text()
    assert text.splitlines()[2].startswith("Machine: ") and f"### {table.title}" in text
    assert text.count("\n| 20 |") == 3 and text.count("\n| 30 |") == 3
