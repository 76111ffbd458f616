"""Sharded Sinkhorn: 1 vs 2 gloo processes on one problem; writes benchmarks/results/sharded.md.

Problem: x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, squared Euclidean cost, eps = 1e-2,
float32, uniform weights, one thread per process. Two measurements per process count:

* ``n = m = 20k`` (``--n``): a full solve is far too slow on a 2-core machine, so a fixed
  number of iterations of the solver loop (``SinkhornOptions(fixed_iter=True)``) is timed;
* ``n = m = 5k`` (``--small-n``): a full solve to ``tol = 1e-4`` (eps-scaling "auto",
  certification).

The last column, ``2 (n+m) itemsize``, is a reference size (both potentials); what a rank
sends per iteration is the column before it (``2 m`` floats with two ranks).

Both report whether the 1- and 2-process potentials agree (max abs difference) and the
bytes each rank hands to the collectives (``CommCounter``). Each runs ``--instances``
seeded problems (default 3), each timed ``--repeats`` times (default 3): medians over the
instances of the median over the repeats, wall time (the slowest rank) and process CPU time
(summed over the ranks).

Run: python benchmarks/bench_sharded.py [--n 20000 --iters 3 --small-n 5000 --results DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import entrokit
from entrokit.bench.common import Table, write_results
from entrokit.geometry.sharded import CommCounter, ShardedPointCloud
from entrokit.problem import make_problem
from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

EPS = 1e-2


def _points(n: int, m: int, d: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float32)
    y = 0.8 * torch.rand(m, d, generator=gen, dtype=torch.float32) + 0.1
    return x, y


def _worker(rank: int, world: int, init_file: str, out_dir: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=20))
    out = {"fixed": [], "full": []}
    try:
        for k in range(args.instances):
            # fixed iterations at large n (the problem set-up, incl. the bounds pass, is not timed)
            x, y = _points(args.n, args.n, seed=k)
            geom = ShardedPointCloud(x.tensor_split(world)[rank], y, chunk_size=args.chunk_size, kernel=args.kernel)
            problem = make_problem(None, None, geom, check_inputs=False).with_batch()
            # warm-up (untimed): one iteration compiles the tile kernels of the local PointCloud
            sinkhorn_problem(problem, EPS, SinkhornOptions(fixed_iter=True, max_iter=1))
            opts = SinkhornOptions(fixed_iter=True, max_iter=args.iters)
            walls, cpus = [], []
            for _ in range(args.repeats):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                with CommCounter() as counter:
                    f, g, *_ = sinkhorn_problem(problem, EPS, opts)
                cpus.append(time.process_time() - c0)
                dist.barrier()
                walls.append(time.perf_counter() - t0)
            out["fixed"].append(dict(time=statistics.median(walls), cpu=statistics.median(cpus),
                                     bytes=counter.bytes_sent, f=f[0], g=g[0]))

            # full solve at small n
            x, y = _points(args.small_n, args.small_n, seed=k)
            geom = ShardedPointCloud(x.tensor_split(world)[rank], y, chunk_size=args.chunk_size, kernel=args.kernel)
            problem = make_problem(None, None, geom, check_inputs=False).with_batch()
            sinkhorn_problem(problem, EPS, SinkhornOptions(fixed_iter=True, max_iter=1))  # warm-up
            walls, cpus = [], []
            for _ in range(args.repeats):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                with CommCounter() as counter:
                    res = entrokit.sinkhorn(None, None, geom, EPS, tol=args.tol)
                cpus.append(time.process_time() - c0)
                dist.barrier()
                walls.append(time.perf_counter() - t0)
            out["full"].append(dict(
                time=statistics.median(walls), cpu=statistics.median(cpus), bytes=counter.bytes_sent, f=res.f,
                g=res.g, n_iter=int(res.n_iter), value=float(res.value), merr=float(res.marginal_error),
                converged=bool(res.converged),
            ))
        torch.save(out, os.path.join(out_dir, f"w{world}_r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _busy(rank: int, out_dir: str) -> None:
    """A fixed single-thread compute task (no communication), to calibrate the machine."""
    torch.set_num_threads(1)
    a = torch.rand(1500, 1500, generator=torch.Generator().manual_seed(rank))
    t0 = time.perf_counter()
    for _ in range(15):
        (a @ a).exp_().sum()
    Path(out_dir, f"busy{rank}").write_text(str(time.perf_counter() - t0))


def _parallel_capacity(tmp: str) -> tuple[float, float]:
    """``(t1, t2)``: seconds of the task alone, and of two copies run at once (slowest).
    On a machine with two free cores t2 ~ t1; if the cores are shared, t2 ~ 2 t1 and no
    2-process run can be faster than one process."""
    times = []
    for procs in (1, 2):
        mp.start_processes(_busy, args=(tmp,), nprocs=procs, join=True, start_method="spawn")
        times.append(max(float(Path(tmp, f"busy{r}").read_text()) for r in range(procs)))
    return times[0], times[1]


def _run(world: int, tmp: str, args) -> list[dict]:
    init = os.path.join(tmp, f"init{world}")
    mp.start_processes(_worker, args=(world, init, tmp, args), nprocs=world, join=True, start_method="spawn")
    return [torch.load(os.path.join(tmp, f"w{world}_r{r}.pt"), weights_only=False) for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="n = m of the fixed-iteration timing")
    ap.add_argument("--instances", type=int, default=3, help="seeded problems (>= 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per problem (>= 3)")
    ap.add_argument("--iters", type=int, default=3, help="fixed iterations timed at --n")
    ap.add_argument("--small-n", type=int, default=5_000, help="n = m of the full solve")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--kernel", default="compile", help="tile kernel of the local PointCloud (same for 1 and 2 processes)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the machine line reports the per-process thread count

    with tempfile.TemporaryDirectory() as tmp:
        busy1, busy2 = _parallel_capacity(tmp)
        print(f"calibration: one compute process {busy1:.2f} s, two at once {busy2:.2f} s", flush=True)
        runs, loads = {}, {}
        for world in (1, 2):
            t0 = time.perf_counter()
            load0 = os.getloadavg()[0]
            runs[world] = _run(world, tmp, args)
            loads[world] = (load0, os.getloadavg()[0])
            print(f"{world} process(es) done in {time.perf_counter() - t0:.0f} s", flush=True)

    itemsize = 4
    med = statistics.median
    fixed = Table(
        f"Fixed iterations, n = m = {args.n}, d = 3, eps = {EPS:g}, float32 ({args.iters} iterations; "
        f"{args.instances} instances x {args.repeats} repeats)",
        ["processes", "time / iteration (wall)", "CPU / iteration (all ranks)", "speed-up (wall)",
         "max abs diff f", "max abs diff g", "bytes / iteration / rank", "2 (n+m) itemsize"],
    )
    full = Table(
        f"Full solve, n = m = {args.small_n}, tol = {args.tol:g}, float32 ({args.instances} instances x "
        f"{args.repeats} repeats)",
        ["processes", "time (wall)", "CPU (all ranks)", "speed-up (wall)", "iterations", "value (instance 0)",
         "marginal error (max)", "converged", "max abs diff f", "max abs diff g", "bytes / iteration / rank (all in)"],
    )
    K = args.instances

    def per_instance(ranks, key, k, field, combine):
        return combine(r[key][k][field] for r in ranks)

    def cat(ranks, key, k, field):
        return torch.cat([r[key][k][field] for r in ranks], -1)

    t1_fixed = med(per_instance(runs[1], "fixed", k, "time", max) for k in range(K)) / args.iters
    t1_full = med(per_instance(runs[1], "full", k, "time", max) for k in range(K))
    for world, ranks in runs.items():
        per_iter = med(per_instance(ranks, "fixed", k, "time", max) for k in range(K)) / args.iters
        cpu_iter = med(per_instance(ranks, "fixed", k, "cpu", sum) for k in range(K)) / args.iters
        df = max(float((cat(ranks, "fixed", k, "f") - cat(runs[1], "fixed", k, "f")).abs().max()) for k in range(K))
        dg = max(float((r["fixed"][k]["g"] - runs[1][0]["fixed"][k]["g"]).abs().max()) for r in ranks for k in range(K))
        sent = max(r["fixed"][k]["bytes"] for r in ranks for k in range(K)) / args.iters
        fixed.add(world, f"{per_iter:.2f} s", f"{cpu_iter:.2f} s", f"{t1_fixed / per_iter:.2f}x", f"{df:.2e}",
                  f"{dg:.2e}", f"{sent:.0f}", 2 * (2 * args.n) * itemsize)
        t_full = med(per_instance(ranks, "full", k, "time", max) for k in range(K))
        c_full = med(per_instance(ranks, "full", k, "cpu", sum) for k in range(K))
        r0s = [ranks[0]["full"][k] for k in range(K)]
        dF = max(float((cat(ranks, "full", k, "f") - cat(runs[1], "full", k, "f")).abs().max()) for k in range(K))
        dG = max(float((r["full"][k]["g"] - runs[1][0]["full"][k]["g"]).abs().max()) for r in ranks for k in range(K))
        sent_full = max(r["full"][k]["bytes"] / r["full"][k]["n_iter"] for r in ranks for k in range(K))
        full.add(world, f"{t_full:.2f} s", f"{c_full:.2f} s", f"{t1_full / t_full:.2f}x",
                 " / ".join(str(r["n_iter"]) for r in r0s), f"{r0s[0]['value']:.7g}",
                 f"{max(r['merr'] for r in r0s):.2e}", f"{sum(r['converged'] for r in r0s)}/{K}", f"{dF:.2e}",
                 f"{dG:.2e}", f"{sent_full:.0f}")
    ideal = 2 * busy1 / busy2
    fixed.notes += [
        f"machine calibration: a single-thread compute task takes {busy1:.2f} s alone and {busy2:.2f} s "
        f"when two copies run at once, so the best possible 2-process speed-up here is {ideal:.2f}x "
        "(2.00x needs two cores' worth of free throughput).",
        "time / iteration: slowest rank, barriers around the loop, after one untimed warm-up "
        "iteration (kernel compilation); one thread per process, gloo, "
        f"ShardedPointCloud(chunk_size={args.chunk_size}, kernel={args.kernel!r}) with y replicated.",
        "load average (1 min) before/after: " + ", ".join(
            f"{w} process(es) {a:.1f}/{b:.1f}" for w, (a, b) in loads.items()
        ) + f" on {os.cpu_count()} cores (other work on the machine makes absolute times noisy).",
        "bytes: payload handed to collectives by one rank (CommCounter); a 1-process group "
        "sends nothing. Per iteration: all-reduce MAX + SUM of m floats (g-update) and the "
        "marginal error of each convergence check.",
        "max abs diff f, g: potentials of the 2-process run vs the 1-process run (same code path); "
        "differences come only from the order of the cross-rank log-sum-exp merge.",
    ]
    full.notes += [
        "entrokit.sinkhorn(None, None, ShardedPointCloud(...), eps, tol): eps-scaling 'auto', "
        "float64 certification of the marginals; time includes set-up (mass check, cost bounds), "
        "after one untimed warm-up iteration.",
        "bytes / iteration (all in): everything rank 0 sent during the call, divided by the iterations.",
    ]
    for t in (fixed, full):
        print(t.render(), flush=True)
    path = write_results("sharded", [fixed, full], args.results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
