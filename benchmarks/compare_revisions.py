"""Time entrokit's own solvers on the benchmark problems, for comparing two source trees
on the same machine state (the anchors' code is unchanged between them, so a change of
entrokit's time is the change of every ratio against an anchor).

Usage (interleaved rounds; each round runs both trees in fresh processes):
    python benchmarks/compare_revisions.py --tree OLD_SRC --tree NEW_SRC --rounds 3
One tree alone: ``python benchmarks/compare_revisions.py --run`` prints JSON times;
``--only ssns,smooth_l2`` restricts the cases to those solvers. ``--only sinkhorn_fixed``
runs the dense solves of 4-6 iterations at n = 1000-4000, where the fixed per-call work
(start, kernel formation, certification) is most of the time:
    python benchmarks/compare_revisions.py --tree /path/to/main/src --tree src --only sinkhorn_fixed
``--only divergence_float32,divergence_float64`` times the dense point-cloud divergence,
value and gradient (``divergence_float32:1000``: one size).
Each cell is the median process CPU time of the calls (wall time, best call, beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

CASES = (
    [("sinkhorn", n, eps) for n in (500, 1000, 2000) for eps in (1e-1, 1e-2, 1e-3)]
    + [("sinkhorn_fixed", n, eps) for n in (1000, 2000, 4000) for eps in (1e-1, 1e-2)]
    + [("ssns", n, eps) for n in (300, 1000) for eps in (1e-2, 1e-3)]
    + [("smooth_l2", n, gamma) for n in (300, 1000) for gamma in (1e-1, 1e-2)]
    # the Newton benchmark's own problems (entrokit.bench.newton), SSNS to 1e-8
    + [("ssns_bench", name, eps) for name in ("random n=500", "digits W2", "digits W1")
       for eps in (1e-1, 1e-2, 1e-3, 1 / 1200, 1e-4)]
    # the dense point-cloud divergence, value + gradient (d = 2, m = n - n/6), as in
    # compare_divergence_trees.py
    + [(f"divergence_{dt}", n, eps) for dt in ("float32", "float64") for n in (300, 1000) for eps in (1e-1, 1e-2)]
)


def _divergence_call(n: int, eps: float, dtype: str):
    """``sinkhorn_divergence(x, y, eps)`` and its backward to ``x``, returning the value."""
    import torch

    import entrokit

    g = torch.Generator().manual_seed(n)
    dt = getattr(torch, dtype)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64).to(dt).requires_grad_()
    y = torch.rand(n - n // 6, 2, generator=g, dtype=torch.float64).to(dt)

    def call():
        x.grad = None
        s = entrokit.sinkhorn_divergence(x, y, eps=eps)
        s.backward()
        return s

    return call


def _run_one(only: str | None = None) -> dict:
    import torch

    import entrokit

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = {}
    for kind, n, eps in CASES:
        if only and kind not in only.split(",") and f"{kind}:{n}" not in only.split(","):
            continue
        if kind == "ssns_bench":
            from entrokit.bench.newton import digits_pair, random_assignment

            a, b, C = random_assignment(500) if n == "random n=500" else digits_pair(2 if n == "digits W2" else 1)
        else:
            gen = torch.Generator().manual_seed(n)
            C = torch.rand(n, n, generator=gen, dtype=torch.float64)
            a = b = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if kind.startswith("divergence_"):
            fn = _divergence_call(n, eps, kind.split("_")[1])
        elif kind == "ssns_bench":
            fn = lambda: entrokit.sinkhorn_newton(a, b, C, eps, tol=1e-8)  # noqa: E731, B023
        elif kind in ("sinkhorn", "sinkhorn_fixed"):
            fn = lambda: entrokit.sinkhorn(a, a, C, eps, tol=1e-6)  # noqa: E731, B023
        elif kind == "ssns":
            fn = lambda: entrokit.sinkhorn_newton(a, a, C, eps, tol=1e-8)  # noqa: E731, B023
        else:
            fn = lambda: entrokit.smooth_ot(a, a, C, reg="l2", gamma=eps, tol=1e-6)  # noqa: E731, B023
        best, spent, cpus = float("inf"), 0.0, []
        while spent < 1.5 or len(cpus) < 3:
            t, c = time.perf_counter(), time.process_time()
            res = fn()
            dt = time.perf_counter() - t
            cpus.append(time.process_time() - c)
            best, spent = min(best, dt), spent + dt
        cpus.sort()
        # the divergence returns a value: its marginal error and iterations are not reported
        err, iters = (float(res.marginal_error), int(res.n_iter)) if hasattr(res, "n_iter") else (float("nan"), 0)
        out[f"{kind} {n if isinstance(n, str) else f'n={n}'} eps={eps:g}"] = (cpus[len(cpus) // 2], best, err, iters)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="store_true")
    p.add_argument("--tree", action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated kinds: sinkhorn,sinkhorn_fixed,ssns,smooth_l2,"
                   "ssns_bench,divergence_float32,divergence_float64 (kind:n for one size)")
    args = p.parse_args()
    if args.run:
        print(json.dumps(_run_one(args.only)))
        return
    times: dict[str, dict[str, list]] = {t: {} for t in args.tree}
    for _ in range(args.rounds):
        for tree in args.tree:
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            res = json.loads(subprocess.run([sys.executable, __file__, "--run", *(["--only", args.only] if args.only else [])], env=env, check=True,
                                            capture_output=True, text=True).stdout)
            for k, rec in res.items():
                times[tree].setdefault(k, []).append(rec)
    base, *others = args.tree
    print(f"load average: {os.getloadavg()}")
    print("| case | " + " | ".join(f"{t} CPU (wall)" for t in args.tree) + " | CPU ratio new/old |")
    print("|---" * (len(args.tree) + 2) + "|")
    for k in times[base]:
        cpu = [sorted(x[0] for x in times[t][k])[len(times[t][k]) // 2] for t in args.tree]
        wall = [min(x[1] for x in times[t][k]) for t in args.tree]
        last = [times[t][k][-1] for t in args.tree]
        cells = " | ".join(f"{c * 1e3:.1f} ms ({w * 1e3:.1f} ms; {r[3]} it, err {r[2]:.1e})" for c, w, r in zip(cpu, wall, last))
        print(f"| {k} | {cells} | {cpu[-1] / cpu[0]:.2f} |")


if __name__ == "__main__":
    main()
