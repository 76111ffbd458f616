"""Interleaved timing of ``sinkhorn_divergence`` (forward + backward) between source trees.

Usage (from the repository root)::

    python benchmarks/compare_divergence_trees.py --tree OLD/src --tree src --rounds 5

Each round runs every tree in a fresh process (one thread), one after the other; a process
times every case (median over 3 instances of the case, each repeated until 1 s has run),
wall and process CPU time. The value's error against a float64 reference recomputed in the
same process (tol=1e-9) is printed beside it, so a faster tree is not a less accurate one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

CASES = [(n, eps, dtype) for n in (300, 1000) for eps in (1e-1, 1e-2) for dtype in ("float32", "float64")]


def _run_one() -> dict:
    import torch

    import entrokit

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = {}
    for n, eps, dtype in CASES:
        walls, cpus, errs = [], [], []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x0 = torch.rand(n, 2, generator=g, dtype=torch.float64)
            y0 = torch.rand(n - n // 6, 2, generator=g, dtype=torch.float64)
            ref = float(entrokit.sinkhorn_divergence(x0, y0, eps=eps, tol=1e-9))
            dt = getattr(torch, dtype)
            x, y = x0.to(dt).requires_grad_(), y0.to(dt)

            def call(x=x, y=y, eps=eps):
                x.grad = None
                s = entrokit.sinkhorn_divergence(x, y, eps=eps)
                s.backward()
                return s

            call()  # warm-up
            k, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < 1.0 or k == 0:
                s = call()
                k += 1
            walls.append((time.perf_counter() - t0) / k)
            cpus.append((time.process_time() - c0) / k)
            errs.append(abs(float(s.detach().double()) - ref))
        out[f"n={n} eps={eps:g} {dtype}"] = (statistics.median(walls), statistics.median(cpus), max(errs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run", action="store_true")
    args = ap.parse_args()
    if args.run:
        print(json.dumps(_run_one()))
        return
    results = {t: [] for t in args.tree}
    for _ in range(args.rounds):
        for t in args.tree:
            env = dict(os.environ, PYTHONPATH=t, OMP_NUM_THREADS="1")
            p = subprocess.run([sys.executable, __file__, "--run"], env=env, capture_output=True, text=True, check=True)
            results[t].append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = args.tree[0]
    print("| case | " + " | ".join(f"{t}: wall ms / cpu ms / err" for t in args.tree) + " | wall ratio (last / first) |")
    print("|---|" + "---|" * (len(args.tree) + 1))
    for case in results[base][0]:
        cells, walls = [], []
        for t in args.tree:
            w = statistics.median(r[case][0] for r in results[t]) * 1e3
            c = statistics.median(r[case][1] for r in results[t]) * 1e3
            e = max(r[case][2] for r in results[t])
            cells.append(f"{w:.1f} / {c:.1f} / {e:.1e}")
            walls.append(w)
        print(f"| {case} | " + " | ".join(cells) + f" | {walls[-1] / walls[0]:.2f} |")


if __name__ == "__main__":
    main()
