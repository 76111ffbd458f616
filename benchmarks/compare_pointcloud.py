"""Time the point-cloud paths of two source trees on the same machine state: the dense
point-cloud divergence (with its gradient), Sinkhorn on a dense and on an online
(tiled) point cloud, the online value gradient and the online plan sums.

Usage (interleaved rounds; each round runs every tree in a fresh process, one thread)::

    python benchmarks/compare_pointcloud.py --tree OLD_SRC --tree NEW_SRC --rounds 3

Per case and tree it prints the median over the rounds of the best wall time of a round
(and the process CPU time of that call) and the float64 check of the result (the same
quantity recomputed in float64 on the dense path: the relative error of the returned
value), so that a speed-up cannot hide a change of the answer.
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


def _cases():
    import torch

    import entrokit

    def data(n, m, d=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, d, generator=g), torch.rand(m, d, generator=g)

    def reference(x, y, eps):
        return float(entrokit.sinkhorn_divergence(x.double(), y.double(), eps=eps, tol=1e-9))

    def divergence(n):
        x, y = data(n, n)
        xg = x.clone().requires_grad_()

        def run():
            val = entrokit.sinkhorn_divergence(xg, y, eps=1e-2)
            val.backward()
            return float(val)
        return run, lambda: reference(x, y, 1e-2)

    def solve(n, online, grad=False):
        x, y = data(n, n)

        def run():
            xg = x.clone().requires_grad_(grad)
            res = entrokit.sinkhorn(None, None, entrokit.PointCloud(xg, y, online=online), 0.05, tol=1e-5)
            if grad:
                res.value.backward()
            return float(res.transport_cost)
        ref = lambda: float(entrokit.sinkhorn(None, None, entrokit.PointCloud(x.double(), y.double()), 0.05,  # noqa: E731
                                              tol=1e-9).transport_cost)
        return run, ref

    def plan_sums(n):
        x, y = data(n, n)
        f, g = torch.zeros(1, n), torch.zeros(1, n)
        w = torch.full((1, n), 1.0 / n)
        geom = entrokit.PointCloud(x, y, online=True).flatten_batch()
        dense = entrokit.PointCloud(x.double(), y.double(), online=False).flatten_batch()
        return (lambda: float(geom.plan_reduce(f, g, w, w, 0.05, accumulate=torch.float64)[2]),
                lambda: float(dense.plan_reduce(f.double(), g.double(), w.double(), w.double(), 0.05)[2]))

    return {
        "divergence dense n=1000 eps=1e-2 (+grad)": divergence(1000),
        "sinkhorn PointCloud dense n=1000": solve(1000, False),
        "sinkhorn PointCloud online n=2000": solve(2000, True),
        "sinkhorn PointCloud online n=1000 value.backward": solve(1000, True, grad=True),
        "plan_reduce online n=3000 (float64 sums)": plan_sums(3000),
    }


def _run_one() -> dict:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = {}
    for name, (fn, ref) in _cases().items():
        best, cpu, spent = float("inf"), 0.0, 0.0
        while spent < 2.0 or best == float("inf"):
            t, c = time.perf_counter(), time.process_time()
            val = fn()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if dt < best:
                best, cpu = dt, dc
            spent += dt
        want = ref()
        out[name] = (best, cpu, abs(val - want) / max(abs(want), 1e-300))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="store_true", help="time this process's entrokit and print JSON")
    p.add_argument("--tree", action="append", default=[], help="a src/ directory (give two or more)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.run:
        print(json.dumps(_run_one()))
        return
    times: dict[str, dict[str, list]] = {t: {} for t in args.tree}
    for _ in range(args.rounds):
        for tree in args.tree:
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--run"], env=env, capture_output=True, text=True,
                                  check=True)
            for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                times[tree].setdefault(k, []).append(v)
    base = args.tree[0]
    print("| case | " + " | ".join(f"{t}: wall s (cpu s), rel. err. vs float64" for t in args.tree)
          + " | ratio new/old |")
    print("|---|" + "---|" * (len(args.tree) + 1))
    for k in times[base]:
        cells, med = [], {}
        for t in args.tree:
            rows = times[t][k]
            med[t] = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            cells.append(f"{med[t]:.3f} ({cpu:.3f}), {statistics.median(r[2] for r in rows):.1e}")
        print(f"| {k} | " + " | ".join(cells) + f" | {med[args.tree[-1]] / med[base]:.2f} |")


if __name__ == "__main__":
    main()
