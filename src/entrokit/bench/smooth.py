"""Benchmark: quadratic and sparsity-constrained OT vs POT (``ot.smooth``) and RegOT.

Problem: ``n`` source points uniform in [0, 1]^2, ``n`` target points uniform in
[0.5, 1.5]^2, squared Euclidean cost divided by its maximum, uniform weights; objective
:math:`\\langle C,T\\rangle + \\frac\\gamma2\\|T\\|^2` (the convention of all three
libraries: POT ``reg=gamma``, RegOT ``reg=gamma``; sums, not means). entrokit and the
anchors run on the same problem in one process. An anchor runs with an iteration cap
that grows per attempt (4x, or to what fits the time budget at the measured rate) until
it reaches the target error, stops on its own criteria (the plan no longer changes when
the cap grows) or an attempt takes 2/3 of the budget; the last cap is then run again
until ``repeats`` runs are timed, except when the budget stopped the search (its time is
then a lower bound on the anchor's time to the target, and repeating it measures
nothing the comparison uses). Every attempt runs in a child process killed at the
budget of CPU time (an anchor's compiled solver cannot be interrupted otherwise), so the
suite ends in bounded time and what is killed does not depend on the machine's load; a
killed attempt is reported as "> budget (killed)", without an error, and not repeated.
Each row is a median over several instances (seeds) of the median over the repeats,
process CPU time beside wall time. The marginal error
:math:`\\|T1-a\\|_1 + \\|T^\\top 1-b\\|_1`, the objective and the largest column
cardinality are recomputed here from each returned plan.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from entrokit.bench.common import (
    Table,
    TimeLimitExceeded,
    call_with_time_limit,
    fmt_time,
    write_results,
)

__all__ = ["run", "make_problem_np"]

TARGET = 1e-6


def make_problem_np(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2))
    y = rng.random((n, 2)) + 0.5
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    C /= C.max()
    a = np.full(n, 1.0 / n)
    return a, a.copy(), C


def _timed(fn):
    """``(fn(), wall seconds, process CPU seconds)``, the anchors' prints and warnings muted."""
    t, c = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's sparse projection prints shapes; L-BFGS-B warns
        out = fn()
    # a sub-millisecond run in a fresh child may read 0 s of CPU: floor it at 1 us (ratios)
    return out, time.perf_counter() - t, max(time.process_time() - c, 1e-6)


def _attempt(run, cap: int, budget: float):
    """One run at ``cap`` in a child killed at ``budget`` s of CPU time: ``(plan, wall, cpu)``,
    or ``None`` when killed."""
    try:
        return call_with_time_limit(lambda: _timed(lambda: np.asarray(run(cap))), budget, cpu=True)
    except TimeLimitExceeded:
        return None


def _to_target(run, start: int, budget: float, cap_max: int, stats):
    """Run with caps start, 4*start, ... (see the module docstring), each attempt in a
    child process killed at ``budget`` seconds of CPU time; returns the last attempt's
    ``(plan, wall, cpu)`` (``None`` when it was killed), the caps tried, and whether the
    budget stopped the search (neither the target nor the anchor's own criteria did)."""
    cap, prev, caps = start, None, []
    while True:
        caps.append(cap)
        out = _attempt(run, cap, budget)
        if out is None:
            return None, caps, True
        T, _, t = out
        done_own = prev is not None and prev.shape == T.shape and np.array_equal(prev, T)
        if stats(T) <= TARGET or done_own or cap >= cap_max:
            return out, caps, False
        if 1.5 * t > budget:
            return out, caps, True
        # next attempt: 4x the cap, or what fits the budget at the measured rate
        prev, cap = T, int(min(cap_max, cap * min(4.0, 0.9 * budget / max(t, 1e-6))))


def _stats(T, a, b, C, gamma):
    T = np.asarray(T)
    merr = float(np.abs(T.sum(1) - a).sum() + np.abs(T.sum(0) - b).sum())
    obj = float((T * C).sum() + 0.5 * gamma * (T * T).sum())
    return merr, obj, int((T > 0).sum(0).max())


def _entrokit(a, b, C, gamma, k, formulation=None):
    import entrokit

    kw = dict(reg="topk", k=k) if k else dict(reg="l2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top-k: ConvergenceWarning (marginals unattainable)
        r = entrokit.smooth_ot(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(C), gamma=gamma,
                               tol=TARGET, formulation=formulation, **kw)
    return r.plan.to_dense().numpy()


def _tables(budget: float, seeds: int, repeats: int) -> tuple[Table, Table, Table]:
    """The three tables, empty, with their notes: every run, the quadratic targets, the top-k comparison."""
    over = (f"median over {seeds} instances (seeds) of the median of {repeats} repeats; process CPU time, "
            "one thread per library")
    full = Table(
        "Quadratic (l2) and top-k (k=2) OT: time and final L1 marginal error",
        ["n", "gamma", "reg", "library / method", "CPU time", "wall", "marginal err (L1), median [max]",
         "objective - entrokit's, max |.|", "max nnz/col", "killed", "timed runs"],
        notes=[f"{over}. Anchor budget per attempt: RegOT {budget:g} s, POT max({budget:g} s, 12x entrokit's "
               f"time on the same problem), of CPU time (caps grown up to 4x per attempt until the target; the "
               f"last cap is repeated, unless the budget ended the search: an attempt over 2/3 of the budget "
               f"short of the target is timed once, and one still running at the budget is killed and not "
               f"repeated: its time is a lower bound, '>'); torch threads: {torch.get_num_threads()}",
               "POT runs with stopThr=0 (its tightest setting: the default 1e-9 stops at ~5e-3) until L-BFGS-B stops "
               "itself or the cap; RegOT tol = 1e-6/sqrt(2n) on its L2 gradient norm; errors and objectives "
               "are recomputed from each plan (the objective against entrokit's dual/newton plan for l2 and its "
               "semi_dual plan for top-k). entrokit top-k includes its quadratic warm start.",
               "top-k: the SCOT dual is the dual of the convexified problem; a k-sparse plan recovered from the "
               "(nonsmooth) dual optimum need not meet the row marginals (see entrokit.smooth_ot docs)."],
    )
    summary = Table(
        "Quadratic OT targets: entrokit (error <= 1e-6 required) vs the fastest RegOT and POT runs",
        ["n", "gamma", "entrokit", "err (max)", "fastest RegOT run (err)", "ratio vs RegOT (<= 1)",
         "fastest POT run (err)", "ratio as run", "ratio vs POT to 1e-6 (<= 0.1)", "met"],
        notes=[f"CPU times and ratios: {over}; a ratio is taken per instance, then the median; errors: "
               "the largest over the instances. '< x' = upper bound: on some instance no POT run reached 1e-6 "
               "(POT's L-BFGS-B stops on its own criteria first, or the budget ran out) and entrokit's time is "
               "divided by POT's longest run (or its budget, when killed). 'met' = on every instance."],
    )
    topk = Table(
        "Top-k (k=2) OT: entrokit vs POT sparsity_constrained (1e-6 is unattainable, see notes)",
        ["n", "gamma", "entrokit (best form.)", "err (max)", "POT fastest", "POT err (max)", "ratio as run",
         "ratio vs POT to entrokit's err (<= 0.1)"],
        notes=[f"CPU times and ratios: {over}; entrokit: the formulation with the smaller error; POT: fastest "
               "of dual/semi-dual and the smaller of their errors. '< x' = upper bound (entrokit time / POT's "
               "longest run): on some instance no POT run reached entrokit's error."],
    )
    return full, summary, topk


def _anchors(a, b, C, Cf, gamma: float, k: int | None) -> tuple[dict, dict]:
    """The anchors of one problem as functions of their iteration cap, and their first caps:
    POT's dual and semi-dual (``sparsity_constrained`` for top-k), and for the quadratic
    regularizer RegOT's three methods (``Cf``: the Fortran-ordered cost RegOT takes)."""
    import ot
    import regot

    runs, start = {}, {}
    rt = "sparsity_constrained" if k else "l2"
    for form, fn in (("dual", ot.smooth.smooth_ot_dual), ("semi_dual", ot.smooth.smooth_ot_semi_dual)):
        runs[f"POT {form}"] = lambda m, fn=fn: fn(a, b, C, gamma, reg_type=rt, max_nz=k, numItermax=m, stopThr=0.0)
        start[f"POT {form}"] = 100
    if not k:
        tol = TARGET / math.sqrt(2 * C.shape[0])  # RegOT stops on an L2 gradient norm
        for meth in ("qrot_grssn", "qrot_lbfgs_dual", "qrot_lbfgs_semi_dual"):
            runs[f"RegOT {meth}"] = lambda m, meth=meth: getattr(regot, meth)(Cf, a, b, gamma, tol=tol, max_iter=m).plan
            start[f"RegOT {meth}"] = 20 if meth == "qrot_grssn" else 100
    return runs, start


@dataclass(frozen=True)
class Run:
    """One library on one instance: median wall and CPU seconds over the repeats, the plan's
    marginal error, objective and largest column cardinality; ``killed``: stopped at the
    budget (``cpu`` is then the budget, a lower bound, and the rest NaN)."""

    wall: float
    cpu: float
    err: float
    obj: float
    nnz: int
    killed: bool = False
    runs: int = 1


def _measure(a, b, C, gamma: float, k: int | None, budget: float, repeats: int) -> dict[str, Run]:
    """entrokit's formulations (each to its own stopping rule, ``repeats`` times), then the
    anchors (to the target, :func:`_to_target`, the final cap repeated) on one problem."""
    ours = {"entrokit semi_dual/lbfgs": "semi_dual", "entrokit dual/lbfgs": "dual"} if k else {
        "entrokit dual/newton": "dual"}
    outs: dict[str, list] = {
        name: [_timed(lambda form=form: _entrokit(a, b, C, gamma, k, form)) for _ in range(repeats)]
        for name, form in ours.items()}
    anchors, start = _anchors(a, b, C, np.asfortranarray(C), gamma, k)
    # POT gets at least 12x entrokit's time, so that a POT run missing the target
    # certifies a ratio below 0.1 (RegOT: the plain budget)
    pot_budget = max(budget, 12.0 * max(_median(o[2] for o in v) for v in outs.values()))
    res: dict[str, Run] = {}
    for name, run in anchors.items():
        bud = pot_budget if name.startswith("POT") else budget
        first, caps, limited = _to_target(run, start[name], bud, 10**6, lambda T: _stats(T, a, b, C, gamma)[0])
        if first is None:  # killed at the budget: a lower bound on its time, no plan
            res[name] = Run(bud, bud, math.nan, math.nan, -1, killed=True, runs=0)
            continue
        again = [] if limited else [_attempt(run, caps[-1], bud) for _ in range(repeats - 1)]
        outs[name] = [first, *(o for o in again if o is not None)]
    for name, runs in outs.items():
        merr, obj, mx = _stats(runs[0][0], a, b, C, gamma)
        res[name] = Run(float(np.median([o[1] for o in runs])), float(np.median([o[2] for o in runs])),
                        merr, obj, mx, runs=len(runs))
    return res


def _median(xs) -> float:
    return float(np.median(list(xs)))


def _bounded(values: list[tuple[float, bool]]) -> str:
    """The median of per-instance ratios, ``< x`` when any of them is only an upper bound
    (the median of the bounds bounds the median)."""
    m = _median(v for v, _ in values)
    return f"< {m:.3f}" if any(b for _, b in values) else f"{m:.3f}"


def _fmt_median_time(t: float, killed: bool) -> str:
    """A median time; where a run was killed on some instance, the budget as a lower bound."""
    return f"> {t:.0f} s (killed)" if killed else fmt_time(t)


def _fmt_run(t: float, err: float, killed: bool) -> str:
    """A median time and the largest error (a killed run has no error)."""
    return _fmt_median_time(t, killed) + ("" if killed else f" ({err:.1e})")


def _ratio_to_reach(cpu: float, pot: list[Run], err: float) -> tuple[float, bool]:
    """``cpu`` over the fastest POT run that reached ``err``, or (an upper bound, ``True``)
    over POT's longest run when none did."""
    reach = [r.cpu for r in pot if not r.killed and r.err <= err]
    return (cpu / min(reach), False) if reach else (cpu / max(r.cpu for r in pot), True)


def _quadratic_row(per_seed: list[dict[str, Run]]) -> list:
    """The summary row of one quadratic problem (after ``n, gamma``): entrokit against the
    fastest RegOT run (whatever error it stopped at) and against POT, whose time to the
    target is bounded below by its longest run when no run reached it (``< x``); per
    instance, then the median over the instances."""
    ek, rg, rp, rpot = [], [], [], []
    for res in per_seed:
        mine = res["entrokit dual/newton"]
        fastest_rg = min((r for nm, r in res.items() if nm.startswith("RegOT")), key=lambda r: r.cpu)
        pot = [r for nm, r in res.items() if nm.startswith("POT")]
        fastest_p = min(pot, key=lambda r: r.cpu)
        ek.append(mine)
        rg.append((fastest_rg, (mine.cpu / fastest_rg.cpu, fastest_rg.killed)))
        rp.append((fastest_p, (mine.cpu / fastest_p.cpu, fastest_p.killed)))
        rpot.append(_ratio_to_reach(mine.cpu, pot, TARGET * 1.01))
    met = all(m.err <= TARGET for m in ek) and all(r <= 1 for _, (r, _) in rg) and all(
        r <= 0.1 for r, _ in rpot)

    def run_of(pairs):
        return _fmt_run(_median(r.cpu for r, _ in pairs), max(r.err for r, _ in pairs),
                        any(r.killed for r, _ in pairs))

    return [fmt_time(_median(m.cpu for m in ek)), f"{max(m.err for m in ek):.1e}", run_of(rg),
            _bounded([x for _, x in rg]), run_of(rp), _bounded([x for _, x in rp]), _bounded(rpot),
            "yes" if met else "no"]


def _topk_row(per_seed: list[dict[str, Run]]) -> list:
    """The top-k row of one problem (after ``n, gamma``): per instance, entrokit's
    formulation with the smaller error against POT's fastest run, and against the POT runs
    that reached entrokit's error (``< x``: none did; bounded by POT's longest run); then
    the median over the instances."""
    ek, forms, fastest, errs, as_run, to_err = [], [], [], [], [], []
    for res in per_seed:
        name, mine = min(((nm, r) for nm, r in res.items() if nm.startswith("entrokit")), key=lambda z: z[1].err)
        pot = [r for nm, r in res.items() if nm.startswith("POT")]
        tp = min(pot, key=lambda r: r.cpu)
        ek.append(mine)
        forms.append(name.split()[1].split("/")[0])
        fastest.append(tp)
        errs += [min(r.err for r in pot if not r.killed)] if any(not r.killed for r in pot) else []
        as_run.append((mine.cpu / tp.cpu, tp.killed))
        to_err.append(_ratio_to_reach(mine.cpu, pot, mine.err))
    form = max(set(forms), key=forms.count)
    t_p = _median(r.cpu for r in fastest)
    return [f"{fmt_time(_median(m.cpu for m in ek))} ({form})", f"{max(m.err for m in ek):.2e}",
            _fmt_median_time(t_p, any(r.killed for r in fastest)),
            f"{max(errs):.2e}" if errs else "n/a", _bounded(as_run), _bounded(to_err)]


def _full_rows(n: int, gamma: float, k: int | None, per_seed: list[dict[str, Run]]) -> list[list]:
    """A row of the full table per library: medians over the instances, the objective's
    largest distance to entrokit's (dual/newton for l2, semi_dual for top-k)."""
    reg = f"topk k={k}" if k else "l2"
    ref = "entrokit semi_dual/lbfgs" if k else "entrokit dual/newton"
    rows = []
    for name in sorted(per_seed[0], key=lambda nm: (not nm.startswith("entrokit"), nm)):  # entrokit first
        runs = [res[name] for res in per_seed]
        live = [r for r in runs if not r.killed]
        killed = len(runs) - len(live)
        cpu = _median(r.cpu for r in runs)
        gap = max((abs(r.obj - res[ref].obj) for r, res in zip(runs, per_seed) if not r.killed), default=math.nan)
        # killed runs sit at the budget, above every finished run: with fewer than half of
        # them killed the median is exact, else only a lower bound
        bound = 2 * killed >= len(runs)
        wall = _median(r.wall for r in runs)  # a killed run's wall time is at least its CPU budget
        rows.append([n, f"{gamma:g}", reg, name, f"> {cpu:.0f} s" if bound else fmt_time(cpu),
                     f"> {wall:.0f} s" if bound else fmt_time(wall),
                     f"{_median(r.err for r in live):.2e} [{max(r.err for r in live):.2e}]" if live else "n/a",
                     f"{gap:.1e}" if live else "n/a", max(r.nnz for r in live) if live else "n/a",
                     f"{killed}/{len(runs)}", sum(r.runs for r in runs)])
    return rows


def _save(path: str, results: dict) -> None:
    rows = [{"n": n, "gamma": g, "k": k, "seed": seed, "name": name, **asdict(r)}
            for (n, g, k, seed), res in results.items() for name, r in res.items()]
    Path(path).write_text(json.dumps(rows, indent=0))


def _load(paths: Sequence[str]) -> dict:
    results: dict = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            key = (row.pop("n"), row.pop("gamma"), row.pop("k"), row.pop("seed"))
            name = row.pop("name")
            results.setdefault(key, {})[name] = Run(**row)
    return results


def _measure_instances(seed_list: Sequence[int], sizes: Sequence[int], budget: float, repeats: int,
                       save: str | None) -> dict:
    """Every (size, gamma, k, seed) of the suite, measured in this process."""
    import ot  # noqa: F401  (the anchors: a missing one fails here, before any run)
    import regot  # noqa: F401

    results: dict = {}
    # warm-up (imports, first-call allocations) on a small problem, untimed
    a0, b0, C0 = make_problem_np(50)
    _timed(lambda: (_entrokit(a0, b0, C0, 0.1, None), _entrokit(a0, b0, C0, 0.1, 2)))
    for n in sizes:
        for gamma in (1e-1, 1e-2):
            for seed in seed_list:
                a, b, C = make_problem_np(n, seed)
                for k in (None, 2):
                    res = results[(n, gamma, k, seed)] = _measure(a, b, C, gamma, k, budget, repeats)
                    print(f"n={n} gamma={gamma:g} k={k} seed={seed}:",
                          {nm: (round(r.cpu, 4), f"{r.err:.1e}") for nm, r in res.items()}, flush=True)
                    if save:
                        _save(save, results)
    return results


def _instances_in_processes(seed_list: Sequence[int], sizes: Sequence[int], budget: float, repeats: int,
                            workers: int) -> dict:
    """One process per instance (``python -m entrokit.bench.smooth --seeds s --save ...``),
    ``workers`` at a time, each with this process's thread count; their saved runs merged."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as tmp:
        pending, running, paths = list(seed_list), [], []
        while pending or running:
            while pending and len(running) < workers:
                seed = pending.pop(0)
                paths.append(os.path.join(tmp, f"seed{seed}.json"))
                cmd = [sys.executable, "-m", "entrokit.bench.smooth", "--seeds", str(seed), "--save", paths[-1],
                       "--no-table", "--budget", f"{budget:g}", "--repeats", str(repeats),
                       "--sizes", *map(str, sizes)]
                running.append((seed, subprocess.Popen(cmd, env=env)))
            time.sleep(0.2)
            for seed, proc in list(running):
                if proc.poll() is not None:
                    running.remove((seed, proc))
                    if proc.returncode != 0:
                        for _, other in running:
                            other.kill()
                        raise RuntimeError(f"the smooth benchmark of instance {seed} failed "
                                           f"(exit code {proc.returncode})")
        return _load(paths)


def run(quick: bool = False, budget: float | None = None, out: str | None = None,
        seeds: int | Sequence[int] | None = None, repeats: int = 3, sizes: Sequence[int] | None = None,
        save: str | None = None, load: Sequence[str] = (), workers: int | None = None) -> list[Table]:
    """Run the suite; returns the tables (and writes ``<out>/smooth.md`` when ``out`` is given).

    ``seeds``: the instances per size, a count (default 3, 1 with ``quick``) or the seeds
    themselves; each library runs ``repeats`` times per instance. ``workers``: instances
    measured at once, each in its own process (default: as many as the cores hold at this
    process's thread count; 1 runs them here, in turn). ``save`` writes every instance's
    runs to a JSON file (with ``workers=1``); ``load`` takes such files instead of running,
    so instances run as separate processes are tabulated together."""
    budget = budget or (10.0 if quick else 60.0)
    sizes = list(sizes or ([300] if quick else [300, 1000, 3000]))
    if load:
        results = _load(load)
        seed_list = sorted({key[3] for key in results})
    else:
        seeds = seeds or (1 if quick else 3)
        seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if workers is None:
            workers = max(1, (os.cpu_count() or 1) // torch.get_num_threads())
        workers = min(workers, len(seed_list))
        if workers > 1 and save is None:
            results = _instances_in_processes(seed_list, sizes, budget, repeats, workers)
        else:
            results = _measure_instances(seed_list, sizes, budget, repeats, save)
    full, summary, topk = _tables(budget, len(seed_list), repeats)
    for n, gamma in sorted({key[:2] for key in results}, key=lambda ng: (ng[0], -ng[1])):
        per_k = {k: [results[(n, gamma, k, s)] for s in seed_list if (n, gamma, k, s) in results] for k in (None, 2)}
        for k, per_seed in per_k.items():
            for row in _full_rows(n, gamma, k, per_seed) if per_seed else ():  # (loaded runs may be partial)
                full.add(*row)
        if per_k[None]:
            summary.add(n, f"{gamma:g}", *_quadratic_row(per_k[None]))
        if per_k[2]:
            topk.add(n, f"{gamma:g}", *_topk_row(per_k[2]))
    tables = [full, summary, topk]
    for t in tables:
        print(t.render(), flush=True)
    write_results("smooth", tables, out)
    return tables


def main(argv: Sequence[str] | None = None, results_dir: str | None = None) -> None:
    """The command line of ``benchmarks/bench_smooth.py`` and ``python -m entrokit.bench.smooth``."""
    import argparse

    p = argparse.ArgumentParser(description="Quadratic / sparsity-constrained OT vs POT and RegOT.")
    p.add_argument("--quick", action="store_true", help="n = 300, one instance, 10 s budgets")
    p.add_argument("--seeds", type=int, nargs="+", help="the instances (default 0 1 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--budget", type=float, help="the anchors' budget in CPU seconds (default 60, 10 with --quick)")
    p.add_argument("--workers", type=int, help="instances measured at once, one process each")
    p.add_argument("--save", help="write every instance's runs to this JSON file (measured in this process)")
    p.add_argument("--load", nargs="+", default=(), help="tabulate these JSON files instead of running")
    p.add_argument("--no-table", action="store_true", help="do not write results/smooth.md")
    args = p.parse_args(argv)
    out = None if args.quick or args.no_table else results_dir
    run(quick=args.quick, budget=args.budget, out=out, seeds=args.seeds, repeats=args.repeats, sizes=args.sizes,
        save=args.save, load=args.load, workers=args.workers)


if __name__ == "__main__":
    main()
