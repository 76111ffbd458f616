"""Time entrokit's own solvers on the benchmark problems, for comparing two source trees
on the same machine state (the anchors' code is unchanged between them, so a change of
entrokit's time is the change of every ratio against an anchor).

Usage (interleaved rounds; each round runs both trees in fresh processes):
    python benchmarks/compare_revisions.py --tree OLD_SRC --tree NEW_SRC --rounds 3
One tree alone: ``python benchmarks/compare_revisions.py --run`` prints JSON times;
``--only ssns,smooth_l2`` restricts the cases to those solvers.
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
    + [("ssns", n, eps) for n in (300, 1000) for eps in (1e-2, 1e-3)]
    + [("smooth_l2", n, gamma) for n in (300, 1000) for gamma in (1e-1, 1e-2)]
    # the Newton benchmark's own problems (entrokit.bench.newton), SSNS to 1e-8
    + [("ssns_bench", name, eps) for name in ("random n=500", "digits W2", "digits W1")
       for eps in (1e-1, 1e-2, 1e-3, 1 / 1200, 1e-4)]
)


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
        if kind == "ssns_bench":
            fn = lambda: entrokit.sinkhorn_newton(a, b, C, eps, tol=1e-8)  # noqa: E731, B023
        elif kind == "sinkhorn":
            fn = lambda: entrokit.sinkhorn(a, a, C, eps, tol=1e-6)  # noqa: E731, B023
        elif kind == "ssns":
            fn = lambda: entrokit.sinkhorn_newton(a, a, C, eps, tol=1e-8)  # noqa: E731, B023
        else:
            fn = lambda: entrokit.smooth_ot(a, a, C, reg="l2", gamma=eps, tol=1e-6)  # noqa: E731, B023
        best, spent = float("inf"), 0.0
        while spent < 1.5 or best == float("inf"):
            t = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
        out[f"{kind} {n if isinstance(n, str) else f'n={n}'} eps={eps:g}"] = (best, float(res.marginal_error))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="store_true")
    p.add_argument("--tree", action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated kinds: sinkhorn,ssns,smooth_l2,ssns_bench")
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
            for k, (t, e) in res.items():
                times[tree].setdefault(k, []).append((t, e))
    base, *others = args.tree
    print("| case | " + " | ".join(f"{os.path.basename(os.path.dirname(t.rstrip('/'))) or t}" for t in args.tree) + " | ratio new/old |")
    print("|---" * (len(args.tree) + 2) + "|")
    for k in times[base]:
        row = [min(x[0] for x in times[t][k]) for t in args.tree]
        errs = [times[t][k][-1][1] for t in args.tree]
        cells = " | ".join(f"{r * 1e3:.1f} ms (err {e:.1e})" for r, e in zip(row, errs))
        print(f"| {k} | {cells} | {row[-1] / row[0]:.2f} |")


if __name__ == "__main__":
    main()
