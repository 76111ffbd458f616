"""Solver times with 1 and 2 torch threads on a loaded machine, for one or two source trees.

The problems a newcomer runs first (``make demo``: digits 0 and 1 on the 28 x 28 grid, W2
cost, eps 1e-1, 1e-2, 1e-3; the README's point-cloud lines; the CLI's forced-online
cloud), the issue's 256 x 256 U[0,1] cost at eps = 1e-3, and a size sweep of Sinkhorn
iterations for the single-thread threshold (``entrokit._threads.SERIAL_MAX_ENTRIES``).
All float64, tol 1e-6 (Newton 1e-8 as in the demo's defaults is not used: the solve
defaults are). Sinkhorn rows whose full run would take minutes at load run a fixed number
of iterations (``max_iter``, with ``tol`` below reach) and say so.

Load: ``--load`` starts a busy-loop process pinned to CPU 0 for the whole measurement
(killed at the end, and bounded by ``--load-seconds`` in any case). Every case runs with
1 and 2 threads interleaved in one process; each round runs every tree in a fresh
process, trees interleaved. The table gives medians over the rounds of wall time and of
the process CPU time.

Usage:
    python benchmarks/bench_threads.py --tree OLD_SRC --tree NEW_SRC --rounds 3 --load [--save runs.json]
    python benchmarks/bench_threads.py --report runs.json   # the table of the saved runs
    python benchmarks/bench_threads.py --run          # one tree (PYTHONPATH), JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

FIXED = 300  # iterations of the capped Sinkhorn rows (a tenth from 2048 x 2048 on)

CASES = (
    [("demo", "sinkhorn", eps) for eps in (1e-1, 1e-2, 1e-3)]
    + [("demo", m, eps) for m in ("sns", "ssns", "auto") for eps in (1e-1, 1e-2, 1e-3)]
    + [("readme dense 500x400", "auto", 1e-2), ("readme online 500x400", "auto", 1e-2),
       ("cli online 60x50", "auto", 1e-2),
       ("U[0,1] 256x256", "sinkhorn", 1e-3), ("U[0,1] 256x256", "ssns", 1e-3)]
    + [(f"U[0,1] {n}x{n}", "sinkhorn", 1e-2) for n in (512, 1024, 2048, 2896, 4096)]
)


def _problem(name: str):
    import numpy as np
    import torch

    import entrokit

    D = torch.float64
    if name == "demo":
        from entrokit.data import digit_density, grid_cost

        return digit_density(0, 28), digit_density(1, 28), grid_cost(28, 2)
    if name.startswith("readme"):
        x, y = torch.randn(500, 2, dtype=D), torch.randn(400, 2, dtype=D) + 1
        a, b = torch.full((500,), 1 / 500, dtype=D), torch.full((400,), 1 / 400, dtype=D)
        return a, b, entrokit.PointCloud(x, y, online="online" in name)
    if name.startswith("cli"):
        rng = np.random.default_rng(0)
        x, y = torch.as_tensor(rng.standard_normal((60, 2))), torch.as_tensor(rng.standard_normal((50, 2)) + 1)
        return None, None, entrokit.PointCloud(x, y, memory_budget=1000)
    n = int(name.split()[-1].split("x")[0])
    return None, None, torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=D)


def _run_one(threads: list[int]) -> dict:
    import torch

    import entrokit

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    out = {}
    for name, method, eps in CASES:
        a, b, cost = _problem(name)
        kw = {}
        # Sinkhorn runs of minutes at load: a fixed number of iterations (tol out of reach)
        capped = method == "sinkhorn" and (name != "demo" or eps < 1e-1)
        if name.startswith(("readme online", "cli")):
            kw = {"max_iter": FIXED}  # Sinkhorn, where "auto" picks it, stops there (2,043 / 10,000 needed)
        if capped:
            big = name.startswith("U[0,1]") and int(name.split()[-1].split("x")[0]) >= 2048
            kw = {"max_iter": FIXED // 10 if big else FIXED, "tol": 1e-300}
        for t in threads:
            torch.set_num_threads(t)
            w, c = time.perf_counter(), time.process_time()
            res = entrokit.solve(a, b, cost, eps=eps, method=method, **kw)
            w, c = time.perf_counter() - w, time.process_time() - c
            out[f"{name} | {method} | {eps:g} | {t}"] = dict(
                wall=w, cpu=c, picked=res.method, n_iter=int(res.n_iter), converged=bool(res.converged),
                capped=capped,
            )
    return out


def _busy_loop(seconds: float):
    code = (
        "import os, time\n"
        "os.sched_setaffinity(0, {0})\n"
        f"end = time.time() + {seconds}\n"
        "while time.time() < end:\n    pass\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def _report(state: dict, threads: list[int], command: str) -> None:
    runs, loads = state["runs"], state["loads"]
    trees = [t for t in state["trees"] if runs[t]]  # a partial --save file: the trees run so far
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rounds = min(len(next(iter(runs[t].values()), [])) for t in trees)
    print(f"`{command}`")
    print(f"\n{cpu}, {os.cpu_count()} cores; busy loop on CPU 0: {'yes' if state['load'] else 'no'}; "
          f"1-min load average at the start of each run: {', '.join(f'{x:.1f}' for x in loads)}; "
          f"{rounds} round(s), medians.\n")
    label = [os.path.basename(os.path.normpath(os.path.join(t, ".."))) or t for t in trees]
    head = ["problem", "method", "eps"]
    for lab in label:
        head += [f"{lab}: picked (iters)"] + [f"{lab}: {t} thr wall / cpu s" for t in threads] + [f"{lab}: {threads[-1]}/{threads[0]}"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    order = [f"{c[0]} | {c[1]} | {c[2]:g}" for c in CASES]
    keys = sorted({k.rsplit(" | ", 1)[0] for k in runs[trees[0]]}, key=order.index)
    for k in keys:
        row = k.split(" | ")
        for tree in trees:
            first = runs[tree][f"{k} | {threads[0]}"][0]
            it = f"{first['n_iter']}{' fixed' if first['capped'] else ''}{'' if first['converged'] or first['capped'] else ' not conv.'}"
            row.append(f"{first['picked']} ({it})")
            walls = []
            for t in threads:
                rs = runs[tree][f"{k} | {t}"]
                wall, cpu_t = statistics.median(r["wall"] for r in rs), statistics.median(r["cpu"] for r in rs)
                walls.append(wall)
                row.append(f"{wall:.3g} / {cpu_t:.3g}")
            row.append(f"{walls[-1] / walls[0]:.2f}x")
        print("| " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="store_true")
    p.add_argument("--tree", action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--load", action="store_true", help="busy-loop process pinned to CPU 0 while measuring")
    p.add_argument("--load-seconds", type=float, default=1800.0)
    p.add_argument("--save", default=None, help="JSON file the runs are added to after each one (resumable)")
    p.add_argument("--report", default=None, help="print the table of a --save file and exit")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.run:
        print(json.dumps(_run_one(threads)))
        return
    if args.report:
        with open(args.report) as fh:
            state = json.load(fh)
        _report(state, threads, state["command"])
        return
    trees = args.tree or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")]
    state = {"trees": trees, "runs": {t: {} for t in trees}, "loads": [], "load": args.load,
             "command": " ".join(["python"] + sys.argv)}
    if args.save and os.path.exists(args.save):
        with open(args.save) as fh:
            state = json.load(fh)
    busy = _busy_loop(args.load_seconds) if args.load else None
    try:
        for _ in range(args.rounds):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=tree)
                env.pop("OMP_NUM_THREADS", None)  # torch's default threading, set per case
                state["loads"].append(os.getloadavg()[0])
                out = subprocess.run([sys.executable, __file__, "--run", "--threads", args.threads], env=env,
                                     check=True, capture_output=True, text=True).stdout
                for k, v in json.loads(out).items():
                    state["runs"][tree].setdefault(k, []).append(v)
                if args.save:
                    with open(args.save, "w") as fh:
                        json.dump(state, fh)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    _report(state, threads, state["command"])


if __name__ == "__main__":
    main()
