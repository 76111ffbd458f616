"""The Newton-accelerated Sinkhorn benchmark (entrokit.bench.newton): its problems, the
L1 error it scores every library by, the solver wrappers on small problems, the
iteration-cap rule, and the tables it builds from given times and errors."""

import math
import re
import types

import numpy as np
import pytest
import torch

from entrokit.bench import newton as bn
from entrokit.bench.newton import (
    ACCEPT,
    SOLVERS,
    TOL,
    _capped,
    _l1,
    cases,
    digits_pair,
    headline_instances,
    random_assignment,
)
from ot_checks import l1_by_hand


# -- problems -------------------------------------------------------------------------
@pytest.mark.parametrize("n, seed", [(6, 0), (45, 3)])
def test_random_assignment_is_a_seeded_uniform_cost_with_uniform_weights(n, seed):
    a, b, C = random_assignment(n, seed)
    assert a.shape == b.shape == (n,) and C.shape == (n, n)
    assert a.dtype == b.dtype == C.dtype == torch.float64
    assert torch.all(a == 1.0 / n) and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert math.fsum(a.tolist()) == pytest.approx(1.0, abs=1e-15)
    assert 0.0 <= C.min() and C.max() < 1.0
    assert torch.equal(random_assignment(n, seed)[2], C)  # same seed, same instance
    assert not torch.allclose(random_assignment(n, seed + 1)[2], C)


@pytest.fixture(scope="module")
def digits():
    return {p: digits_pair(p) for p in (1, 2)}


@pytest.mark.parametrize("p, neighbour", [(2, 1 / (2 * 27**2)), (1, 1 / 54)])
def test_digits_pair_is_two_positive_images_on_the_28x28_grid(digits, p, neighbour):
    a, b, C = digits[p]
    assert a.shape == b.shape == (784,) and C.shape == (784, 784)
    assert a.dtype == b.dtype == C.dtype == torch.float64
    for w in (a, b):
        assert math.fsum(w.tolist()) == pytest.approx(1.0, abs=1e-14)
        assert w.min() >= 1e-6 / (1 + 784e-6) * (1 - 1e-12)  # the floor, after renormalising
    assert not torch.allclose(a, b)  # a "0" and a "1"
    # the pixel grid, row-major: pixel 1 is (0, 1), pixel 28 is (1, 0), pixel 783 is (27, 27)
    assert torch.equal(C, C.T) and torch.all(C.diagonal() == 0) and C.max() == 1.0
    assert C[0, 1] == pytest.approx(neighbour, rel=1e-14) and C[0, 28] == pytest.approx(neighbour, rel=1e-14)
    assert C[0, 783] == 1.0
    assert torch.equal(digits[1][0], digits[2][0])  # the weights do not depend on the cost


def test_digits_pair_floor_and_pair():
    a, b, _ = digits_pair(2)
    a0, b0, _ = digits_pair(2, floor=0.0)
    assert a0.min() == 0.0 and b0.min() == 0.0  # without the floor RegOT could not take log a
    for w, w0 in ((a, a0), (b, b0)):  # "the floor moves 7.8e-4 of mass"
        assert 0 < 0.5 * (w - w0).abs().sum() <= 784e-6
    one, two, _ = digits_pair(2, pair=(1, 2))
    assert torch.equal(one, b) and not torch.allclose(two, b)  # image 1 is the "1" of pair (0, 1)


def _recorders(monkeypatch):
    """Builders that say what they would build instead of building it."""
    monkeypatch.setattr(bn, "random_assignment", lambda n, seed=0: ("random", n, seed))
    monkeypatch.setattr(bn, "digits_pair", lambda p, floor=1e-6, pair=(0, 1): ("digits", p, pair))


def test_cases_in_their_report_order(monkeypatch):
    _recorders(monkeypatch)
    quick = [(name, eps, build()) for name, eps, build in cases(True)]
    assert quick == [
        ("random n=500", 1 / 1200, ("random", 500, 0)),
        ("digits W2", 1 / 1200, ("digits", 2, (0, 1))),
        ("digits W1", 1 / 1200, ("digits", 1, (0, 1))),
        ("random n=2000", 1e-3, ("random", 2000, 0)),
    ]
    full = [(name, eps, build()) for name, eps, build in cases(False)]
    assert full[:4] == quick and len(full) == 18
    assert len({(name, eps) for name, eps, _ in full}) == 18  # no case run twice
    sweep = {1e-1, 1e-2, 1e-3, 1 / 1200, 1e-4}
    for name in ("random n=500", "digits W2", "digits W1"):
        assert {eps for nm, eps, _ in full if nm == name} == sweep, name
    assert {eps for nm, eps, _ in full if nm in ("random n=1000", "random n=2000")} == {1 / 1200, 1e-3}
    for name, _, built in full:  # every builder builds the problem its name says
        if name.startswith("random"):
            assert built == ("random", int(name.split("=")[1]), 0)
        else:
            assert built == ("digits", 2 if name.endswith("W2") else 1, (0, 1))


def test_headline_instances(monkeypatch):
    _recorders(monkeypatch)
    got = [(case, inst, eps, build()) for case, inst, eps, build in headline_instances()]
    assert got == [("random n=500", f"seed {s}", 1 / 1200, ("random", 500, s)) for s in range(3)] + [
        ("digits W2", f"images {i},{i + 1}", 1 / 1200, ("digits", 2, (i, i + 1))) for i in (0, 2, 4)
    ]


# -- the error measure -------------------------------------------------------------------
def test_l1_is_the_error_of_both_marginals():
    a, b = np.array([0.5, 0.3, 0.2]), np.array([0.25, 0.25, 0.5])
    P = np.outer(a, b)
    assert _l1(P, a, b) == pytest.approx(0.0, abs=1e-16)
    P[0, 1] += 1e-3  # once in row 0, once in column 1
    P[2, 2] -= 4e-4
    assert _l1(P, a, b) == pytest.approx(2 * 1e-3 + 2 * 4e-4, rel=1e-12)
    assert _l1(P, a, b) == pytest.approx(l1_by_hand(P, a, b), rel=1e-12)


def test_l1_upcasts_a_float32_plan_before_summing():
    # a float32 plan near the target: rounding its entries moves the marginals by ~1e-10,
    # summing them in float32 by ~1e-9, so only float64 sums see the plan's own error
    rng = np.random.default_rng(0)
    a, b = rng.random(50) + 0.5, rng.random(50) + 0.5
    a, b = a / a.sum(), b / b.sum()
    P32 = np.outer(a, b).astype(np.float32)
    assert _l1(P32, a, b) == pytest.approx(l1_by_hand(P32, a, b), rel=1e-6)


# -- the solvers -------------------------------------------------------------------------
def _check_solver(name, eps, n=40):
    a, b, C = random_assignment(n, 1)
    P, it, t, hist, extra = SOLVERS[name](a, b, C, eps, 5.0)  # as run() calls them
    assert isinstance(P, np.ndarray) and P.dtype == np.float64 and P.shape == (n, n)
    assert isinstance(it, int) and it >= 1 and t >= 0 and isinstance(extra, str)
    its, errs, times = hist
    assert len(its) == len(errs) == len(times) >= 1
    if name.startswith("entrokit") and name != "entrokit sinkhorn":
        ns, nn = map(int, re.fullmatch(r"(\d+)\+(\d+)( \(\d+ eps stages\))?", extra).groups()[:2])
        assert ns + nn == it
    err = l1_by_hand(P, a.numpy(), b.numpy())
    assert _l1(P, a.numpy(), b.numpy()) == pytest.approx(err, rel=1e-6, abs=1e-15)
    assert err <= TOL * ACCEPT, (name, err)


@pytest.mark.parametrize("name", ["entrokit sinkhorn", "entrokit SNS", "entrokit SSNS", "RegOT sinkhorn_ssns",
                                  "RegOT sinkhorn_bcd", "POT sinkhorn_log"])
def test_solvers_reach_the_l1_target_recomputed_here(name):
    _check_solver(name, 0.1)


@pytest.mark.parametrize("name", ["entrokit SNS", "entrokit SSNS", "RegOT sinkhorn_ssns"])
def test_newton_solvers_reach_the_l1_target_at_the_papers_eps(name):
    _check_solver(name, 1 / 1200)


@pytest.mark.parametrize("name", ["RegOT sinkhorn_sparse_newton", "RegOT sinkhorn_splr"])
def test_regot_newton_solvers_with_the_harness_tolerance(name):
    # RegOT's gradient leaves out the last column's residual: tol = 1e-8/sqrt(n+m) ended at
    # 1.7e-8 and 1.2e-8 here; 1e-8/(2 sqrt(n+m-1)) implies the target
    _check_solver(name, 0.1)


def test_regot_tol_bounds_the_l1_error_through_its_gradient():
    """The bound behind :func:`regot_tol`: with equal masses, the last column's residual is
    minus the sum of the n+m-1 others, so L1 <= 2 |g|_1 <= 2 sqrt(n+m-1) |g|_2."""
    rng = np.random.default_rng(3)
    n, m = 7, 5
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    for _ in range(20):
        P = np.outer(a, b) * (1 + 1e-3 * rng.standard_normal((n, m)))
        P *= 1 / P.sum()  # equal masses: the residuals of each marginal sum to zero
        g = np.concatenate([P.sum(1) - a, (P.sum(0) - b)[:-1]])
        assert _l1(P, a, b) <= 2 * math.sqrt(n + m - 1) * np.linalg.norm(g) * (1 + 1e-12)
    assert bn.regot_tol(n, m) == TOL / (2 * math.sqrt(n + m - 1))


def test_capped_reruns_with_a_growing_cap(monkeypatch):
    calls = []

    def run(cap):
        calls.append(cap)
        return cap

    seconds = {"per_iter": 1 / 1024}
    monkeypatch.setattr(bn, "_timed", lambda fn: (lambda k: (k, k * seconds["per_iter"]))(fn()))
    # 10x per round while far from the budget, then scaled to fill 90% of it (11 s)
    assert _capped(run, 20, 11.0, lambda k: False) == (10137, 10137 / 1024)
    assert calls == [20, 200, 2000, 10137]
    calls.clear()  # done: no rerun
    assert _capped(run, 20, 11.0, lambda k: k >= 200)[0] == 200 and calls == [20, 200]
    calls.clear()
    assert _capped(run, 20, 11.0, lambda k: True)[0] == 20 and calls == [20]
    calls.clear()  # a loop that takes no time stops at 10^8 iterations
    seconds["per_iter"] = 0.0
    assert _capped(run, 20, 11.0, lambda k: False)[0] == 10**8
    assert calls == [20, 200, 2000, 20000, 200000, 2 * 10**6, 2 * 10**7, 10**8]


# -- the tables --------------------------------------------------------------------------
def _fake(seconds, err, it=7, extra="", calls=None, raises=None):
    """A solver that returns a plan with L1 error ``err`` (moved off the optimum) in ``seconds``."""

    def go(a, b, C, eps, budget):
        if calls is not None:
            calls.append((len(a), eps, budget))
        if raises is not None:
            raise raises
        P = np.diag(a.numpy())
        P[0, 0] += err / 2  # once in the row, once in the column
        hist = (np.arange(1, 4), np.array([1e-2, 1e-5, err]), np.array([0.1, 0.2, 0.3]))
        return P, it, seconds, hist, extra

    return go


def _fake_solvers(ssns_err, calls=None):
    return {
        "entrokit SSNS": _fake(0.5, ssns_err, it=5, extra="1+4", calls=calls),
        "slower": _fake(1.0, 5e-9),
        "at the slack": _fake(0.25, TOL * ACCEPT * 0.999),
        "stopped": _fake(0.2, 3e-8),  # above the target, well within the budget
        "over budget": _fake(9.0, 3e-8),  # above the target at the budget
        "too slow": _fake(12.5, 1e-9),  # reached the target, after 1.25 x the budget
        "broken": _fake(0.1, 0.0, raises=ValueError("no plan")),
    }


def test_run_reports_times_errors_and_ratios_to_ssns(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bn, "cases", lambda quick: [("tiny", 0.1, lambda: random_assignment(4))])
    monkeypatch.setattr(bn, "CURVE_CASES", (("tiny", 0.1),))
    monkeypatch.setattr(bn, "SOLVERS", _fake_solvers(1e-9, calls))
    fig = tmp_path / "fig" / "curves.png"
    (table,) = bn.run(budget=10.0, figure=str(fig), results=str(tmp_path), notes=["a note"])
    assert list(table.columns) == ["case", "eps", "solver", "iterations", "Sinkhorn+Newton", "time",
                                   "final L1 error", "time / SSNS"]
    assert "budget 10 s per run" in table.title
    assert [list(r) for r in table.rows] == [
        ["tiny", "0.1", "entrokit SSNS", "5", "1+4", "500.0 ms", "1.0e-09", "1.00"],
        ["tiny", "0.1", "slower", "7", "", "1.00 s", "5.0e-09", "2.00"],
        ["tiny", "0.1", "at the slack", "7", "", "250.0 ms", "1.0e-08", "0.50"],
        ["tiny", "0.1", "stopped", "7", "", "200.0 ms (stopped above target)", "3.0e-08", "-"],
        ["tiny", "0.1", "over budget", "7", "", "> 9.00 s", "3.0e-08", "> 18"],  # short of it after 9 s
        ["tiny", "0.1", "too slow", "7", "", "12.50 s", "1.0e-09", "25.00"],  # reached it, after the budget
        ["tiny", "0.1", "broken", "error", "", "-", "ValueError('no plan')", "-"],
    ]
    assert len(table.notes) == 3 and table.notes[-1] == "a note"
    assert calls == [(50, 0.1, 1.0), (4, 0.1, 10.0)]  # a warm-up call, then the timed one
    assert fig.read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "newton.md").read_text()
    assert text.splitlines()[2].startswith("Machine: ") and f"### {table.title}" in text
    # SSNS missed the target: no ratios
    monkeypatch.setattr(bn, "SOLVERS", _fake_solvers(2e-8))
    (table,) = bn.run(budget=10.0)
    assert table.rows[0][5] == "500.0 ms (stopped above target)"
    assert [r[7] for r in table.rows] == ["-"] * 7


def _tiny_headline(monkeypatch):
    monkeypatch.setattr(bn, "headline_instances", lambda: [
        ("random", "seed 0", 0.1, lambda: random_assignment(30, 0)),
        ("random", "seed 1", 0.1, lambda: random_assignment(30, 1)),
        ("random", "seed 2", 0.2, lambda: random_assignment(30, 2)),
        ("small", "seed 3", 0.1, lambda: random_assignment(20, 3)),
    ])


def test_run_headline_takes_medians_and_leaves_missed_runs_out_of_the_ratios(monkeypatch):
    import regot

    _tiny_headline(monkeypatch)
    ssns = regot.sinkhorn_ssns

    def regot_ssns(M, a, b, reg, **kw):  # RegOT's plan moved off the target on the eps = 0.2 instance
        q = ssns(M, a, b, reg, **kw)
        if reg != 0.2:
            return q
        P = np.array(q.plan)
        P[0, 0] += 1e-6
        return types.SimpleNamespace(plan=P, niter=q.niter)

    monkeypatch.setattr(regot, "sinkhorn_ssns", regot_ssns)
    # process CPU times (entrokit, RegOT) per repeat, wall = 2 x CPU
    cpu = [(0.1, 0.6), (0.5, 0.6), (0.2, 0.6)] + [(0.2, 0.2)] * 3 + [(0.1, 0.05)] * 3 + [(0.1, 0.15)] * 3
    times = iter(c for pair in cpu for c in pair)

    def clock(fn):
        c = next(times)
        return fn(), 2 * c, c

    monkeypatch.setattr(bn, "_clock", clock)
    table = bn.run_headline(repeats=3, notes=["a note"])
    assert next(times, None) is None  # every repeat of both libraries was timed
    assert len(table.columns) == 9 and "median of 3 interleaved repeats" in table.title
    rows = [list(r) for r in table.rows]
    assert [r[:3] for r in rows] == [["random", "seed 0", "0.1"], ["random", "seed 1", "0.1"],
                                     ["random", "seed 2", "0.2"], ["small", "seed 3", "0.1"],
                                     ["random", "median of 2", ""], ["small", "median of 1", ""]]
    assert [r[3] for r in rows[:4]] == ["200.0 ms (400.0 ms)", "200.0 ms (400.0 ms)", "100.0 ms (200.0 ms)",
                                        "100.0 ms (200.0 ms)"]
    assert [r[5] for r in rows[:4]] == ["600.0 ms (1.20 s)", "200.0 ms (400.0 ms)", "50.0 ms (100.0 ms) missed",
                                        "150.0 ms (300.0 ms)"]
    assert [r[7] for r in rows] == ["3.00", "1.00", "0.50", "1.50", "2.00", "1.50"]
    assert rows[4][8] == "range 1.00-3.00" and rows[5][8] == "range 1.50-1.50"
    for r in rows[:4]:
        its, ns, nn = map(int, re.fullmatch(r"(\d+) \((\d+)\+(\d+)\)", r[4]).groups())
        assert ns + nn == its and int(r[6].split()[0]) >= 1
        assert r[6].endswith("(tol bound)") == (r[2] == "0.2")  # the looser tol missed only there
        e_ek, e_rg = map(float, r[8].split(" / "))
        assert e_ek <= TOL * ACCEPT and (e_rg > TOL * ACCEPT) == (r[2] == "0.2")
    assert table.notes[-2].startswith("versions: RegOT ") and table.notes[-1] == "a note"


def test_main_writes_the_headline_table_and_with_sweep_the_sweep(monkeypatch, tmp_path, capsys):
    _tiny_headline(monkeypatch)
    assert bn.main(["--repeats", "1", "--results", str(tmp_path)]) == 0
    text = (tmp_path / "newton.md").read_text()
    assert text.splitlines()[2].startswith("Machine: ") and text.count("\n### ") == 1
    assert "### SSNS vs RegOT sinkhorn_ssns" in text and "added by --sweep" in text
    assert "- run: OMP_NUM_THREADS=1 python benchmarks/bench_newton.py --repeats 1 --results" in text
    assert "SSNS vs RegOT sinkhorn_ssns" in capsys.readouterr().out
    monkeypatch.setattr(bn, "cases", lambda quick: [("tiny", 0.1, lambda: random_assignment(20))])
    monkeypatch.setattr(bn, "SOLVERS", {k: SOLVERS[k] for k in ("entrokit SSNS", "RegOT sinkhorn_ssns")})
    argv = ["--repeats", "1", "--results", str(tmp_path), "--sweep", "--figure", str(tmp_path / "f.png"),
            "--budget", "5"]
    assert bn.main(argv) == 0
    text = (tmp_path / "newton.md").read_text()
    assert text.count("\n### ") == 2 and "### Newton-accelerated Sinkhorn to L1 marginal error 1e-08" in text
    assert "| tiny | 0.1 | entrokit SSNS |" in text and "| tiny | 0.1 | RegOT sinkhorn_ssns |" in text
    assert "added by --sweep" not in text


def test_regot_gets_the_loosest_tol_that_meets_the_target_on_the_instance():
    a, b, _ = random_assignment(6, 0)
    wa, wb = a.numpy(), b.numpy()
    exact = np.outer(wa, wb)
    off = exact.copy()
    off[0, 0] += 2 * TOL  # a plan 4e-8 off in L1
    tried = []

    def solve(plans):
        def go(tol):
            tried.append(tol)
            return types.SimpleNamespace(plan=plans(tol))
        return go

    loose = TOL / math.sqrt(12)
    assert bn.regot_loosest_tol(solve(lambda t: exact), wa, wb) == loose and tried == [loose]
    tried.clear()  # the loose tol misses: the provable bound, without another run
    assert bn.regot_loosest_tol(solve(lambda t: off), wa, wb) == bn.regot_tol(6, 6) and tried == [loose]
