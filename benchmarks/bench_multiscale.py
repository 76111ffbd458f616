"""Truncated multiscale Sinkhorn on 3-D point clouds; writes benchmarks/results/multiscale.md.

Problem (the task's): x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, uniform weights, squared
Euclidean cost, eps = 1e-2, float32, tol = 1e-4 (L1 marginal error), one thread.

* n = m = 100k: time of the full :func:`multiscale_sinkhorn` solve (clustering, coarse
  solve, extrapolation, truncation, fine solve, certification), its marginal error
  recomputed *exactly* in float64 over all n m pairs from the returned potentials with the
  dense formula P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) (in tiles; the cost of that
  pass is first estimated on a slice of rows), and the peak RSS of the process right after
  the solve (``resource.getrusage(...).ru_maxrss``).
* n = m = 10k: the same solve vs ``entrokit.sinkhorn(a, b, PointCloud(x, y,
  chunk_size=2048), eps, tol=1e-4)`` (online point cloud, eps-scaling "auto"), after a
  warm-up call of the latter on a smaller problem (it may compile its tile kernel once per
  process); both results are checked in float64 over all pairs.

Each size runs ``--instances`` seeded problems (default 3), every solve ``--repeats`` times
(default 3, interleaved with the other solver at n = 10k); the tables give medians over the
instances of the median over the repeats, wall and process CPU time, the largest error over
the instances and the largest peak RSS.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_multiscale.py`` (about 25 min
on a 2-core AMD EPYC).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import entrokit  # noqa: E402
from entrokit.bench.common import Table, fmt_time, machine_info, write_results  # noqa: E402
from entrokit.geometry import PointCloud  # noqa: E402
from entrokit.solvers.multiscale import multiscale_sinkhorn  # noqa: E402

EPS, TOL = 1e-2, 1e-4


def problem(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen)
    y = 0.8 * torch.rand(n, 3, generator=gen) + 0.1
    a = torch.full((n,), 1.0 / n)
    return a, a.clone(), x, y


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def dense_marginal_error(f, g, a, b, x, y, eps, *, rows: int | None = None, tile=(1024, 8192)):
    """Exact L1 marginal error of P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) in float64
    over all pairs (or the first ``rows`` rows: then only the row part, for timing).

    Tiles of ``tile`` entries; C_ij = |x_i|^2 + |y_j|^2 - 2 x_i.y_j from float64 copies of
    the (centred) points, whose rounding (~1e-16) is far below the tolerance."""
    f, g, a, b = (t.to(torch.float64) for t in (f, g, a, b))
    centre = 0.5 * (torch.cat([x, y]).amin(0) + torch.cat([x, y]).amax(0))
    x, y = (x - centre).to(torch.float64), (y - centre).to(torch.float64)
    n = x.shape[0] if rows is None else rows
    m = y.shape[0]
    xx, yy = (x * x).sum(-1), (y * y).sum(-1)
    row = torch.zeros(n, dtype=torch.float64)
    col = torch.zeros(m, dtype=torch.float64)
    tr, tcols = tile
    for i0 in range(0, n, tr):
        i1 = min(n, i0 + tr)
        for j0 in range(0, m, tcols):
            j1 = min(m, j0 + tcols)
            # (f_i + g_j - C_ij)/eps with C = |x|^2 + |y|^2 - 2 x.y
            S = torch.addmm((g[j0:j1] - yy[j0:j1]).unsqueeze(0), x[i0:i1], y[j0:j1].t(), alpha=2.0)
            S.add_((f[i0:i1] - xx[i0:i1]).unsqueeze(1)).div_(eps).exp_()
            S.mul_(a[i0:i1].unsqueeze(1)).mul_(b[j0:j1].unsqueeze(0))
            row[i0:i1] += S.sum(1)
            col[j0:j1] += S.sum(0)
    err_rows = float((row - a[:n]).abs().sum())
    return err_rows if rows is not None else err_rows + float((col - b).abs().sum())


def timed(solve, repeats: int):
    """``(result, median wall, median CPU)`` of ``repeats`` calls of ``solve()``."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        res = solve()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return res, statistics.median(walls), statistics.median(cpus)


def med(values) -> float:
    return statistics.median(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="size of the large problem")
    parser.add_argument("--n-compare", type=int, default=10_000, help="size of the comparison with PointCloud")
    parser.add_argument("--instances", type=int, default=3, help="seeded problems per size (>= 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per instance (>= 3)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                        help="directory for multiscale.md ('' to skip writing)")
    parser.add_argument("--skip-dense-check", action="store_true", help="skip the full float64 check at --n")
    parser.add_argument("--sections", nargs="+", choices=("large", "compare"), default=["large", "compare"],
                        help="the large problem and/or the comparison with PointCloud")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Machine: {machine_info()}", flush=True)

    check = cmp = None
    if "large" in args.sections:
        # -- large problem ----------------------------------------------------------------------
        rss0 = peak_rss_mib()
        runs = []
        for k in range(args.instances):
            a, b, x, y = problem(args.n, seed=k)
            res, t_ms, cpu_ms = timed(functools.partial(multiscale_sinkhorn, a, b, x, y, EPS, tol=TOL), args.repeats)
            rss = peak_rss_mib()
            info = res.info
            print(f"n={args.n}, instance {k}: multiscale {t_ms:.1f} s (CPU {cpu_ms:.1f} s), converged={bool(res.converged)}, "
                  f"certified error {float(res.marginal_error):.3e}, iters {int(res.n_iter)}, kept "
                  f"{info.kept_fraction[0]:.3f}, peak RSS {rss:.0f} MiB", flush=True)
            probe_rows = 2048
            t = time.perf_counter()
            dense_marginal_error(res.f, res.g, a, b, x, y, EPS, rows=probe_rows)
            estimate = (time.perf_counter() - t) * args.n / probe_rows
            dense_err, t_check = None, None
            if not args.skip_dense_check:
                t = time.perf_counter()
                dense_err = dense_marginal_error(res.f, res.g, a, b, x, y, EPS)
                t_check = time.perf_counter() - t
                print(f"  dense float64 marginal error {dense_err:.3e} ({t_check:.0f} s, estimated {estimate:.0f} s)",
                      flush=True)
            runs.append(dict(t=t_ms, cpu=cpu_ms, coarse=info.coarse_time, fine=info.time - info.coarse_time,
                             iters=int(res.n_iter), clusters=info.n_clusters, kept=info.kept_fraction[0],
                             cert=float(res.marginal_error), dense=dense_err, check=t_check, estimate=estimate, rss=rss,
                             conv=bool(res.converged), kept_err=info.kept_marginal_error[0],
                             dropped=info.dropped_mass_bound[0]))
        check = Table(
            f"Multiscale Sinkhorn, n = m = {args.n:,}, d = 3, eps = {EPS:g}, float32, tol = {TOL:g} "
            f"({args.instances} instances x {args.repeats} repeats)",
            ["n", "total time (wall)", "CPU time", "coarse", "fine", "fine iters", "clusters (x, y)", "kept fraction",
             "certified L1 error (bound, max)", "dense float64 L1 error (all pairs, max)", "converged", "check time",
             "peak RSS (max)", "RSS target < 2 GiB"],
        )
        dense = [r["dense"] for r in runs if r["dense"] is not None]
        checks = [r["check"] for r in runs if r["check"] is not None]
        rss_max = max(r["rss"] for r in runs)
        check.add(
            f"{args.n:,}", fmt_time(med(r["t"] for r in runs)), fmt_time(med(r["cpu"] for r in runs)),
            fmt_time(med(r["coarse"] for r in runs)), fmt_time(med(r["fine"] for r in runs)),
            f"{med(r['iters'] for r in runs):g}",
            " / ".join(f"{r['clusters'][0]}, {r['clusters'][1]}" for r in runs),
            f"{med(r['kept'] for r in runs):.3f}", f"{max(r['cert'] for r in runs):.2e}",
            f"{max(dense):.2e}" if dense else "skipped", f"{sum(r['conv'] for r in runs)}/{len(runs)}",
            f"{fmt_time(med(checks))} (est. {med(r['estimate'] for r in runs):.0f} s)" if checks else "n/a",
            f"{rss_max:.0f} MiB", "yes" if rss_max < 2048 else "no",
        )
        check.notes += [
            f"instances: seeds 0..{args.instances - 1} of the problem; times and counts are medians over the "
            f"instances of the median over {args.repeats} repeats; errors are the largest over the instances.",
            "total time: clustering + coarse eps-scaling solve on the centroids (float64) + extrapolation + "
            "truncation bounds + fine Sinkhorn on the kept blocks + float64 certification of the kept plan and "
            "the dropped-mass bound; 'fine' is everything after the coarse solve.",
            "certified L1 error = exact float64 error of the truncated plan + 2 x dropped-mass bound ("
            + "; ".join(f"{r['kept_err']:.2e} + 2 x {r['dropped']:.2e}" for r in runs) + ").",
            "dense float64 L1 error: the returned float32 potentials, P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) "
            "over all n m pairs, C in float64, in tiles.",
            f"peak RSS: ru_maxrss of the process after the solves (it held {rss0:.0f} MiB after importing torch "
            "and entrokit).",
        ]

    if "compare" in args.sections:
        # -- comparison with the online point cloud ------------------------------------------
        cmp = Table(
            f"n = m = {args.n_compare:,}: multiscale vs online PointCloud Sinkhorn (eps = {EPS:g}, float32, "
            f"tol = {TOL:g}; {args.instances} instances x {args.repeats} repeats)",
            ["solver", "time (wall)", "CPU time", "iterations", "converged", "reported L1 error (max)",
             "dense float64 L1 error (max)", "CPU speed-up"],
        )
        aw, bw, xw, yw = problem(4200, seed=100)  # warm-up (the online tile kernel may compile once)
        entrokit.sinkhorn(aw, bw, PointCloud(xw, yw, chunk_size=2048), EPS, tol=1e-2)
        rows = {"multiscale": [], "online": []}
        for k in range(args.instances):
            a2, b2, x2, y2 = problem(args.n_compare, seed=k)
            solvers = {
                "multiscale": functools.partial(multiscale_sinkhorn, a2, b2, x2, y2, EPS, tol=TOL),
                "online": functools.partial(entrokit.sinkhorn, a2, b2, PointCloud(x2, y2, chunk_size=2048), EPS, tol=TOL),
            }
            walls = {name: [] for name in solvers}
            cpus = {name: [] for name in solvers}
            last = {}
            for _ in range(args.repeats):  # interleaved
                for name, solve in solvers.items():
                    last[name], t, c = timed(solve, 1)
                    walls[name].append(t)
                    cpus[name].append(c)
            for name, res_k in last.items():
                err = dense_marginal_error(res_k.f, res_k.g, a2, b2, x2, y2, EPS)
                rows[name].append(dict(t=med(walls[name]), cpu=med(cpus[name]), iters=int(res_k.n_iter),
                                       conv=bool(res_k.converged), rep=float(res_k.marginal_error), dense=err,
                                       coarse=getattr(res_k.info, "coarse_iters", [None])[0] if name == "multiscale" else None,
                                       kept=res_k.info.kept_fraction[0] if name == "multiscale" else None))
                print(f"n={args.n_compare}, instance {k}: {name} {rows[name][-1]['t']:.1f} s (CPU "
                      f"{rows[name][-1]['cpu']:.1f} s), {int(res_k.n_iter)} iters, dense error {err:.2e}", flush=True)
        cpu_ms, cpu_on = med(r["cpu"] for r in rows["multiscale"]), med(r["cpu"] for r in rows["online"])
        for name, label in (("multiscale", "multiscale_sinkhorn"), ("online", "sinkhorn + PointCloud(chunk_size=2048)")):
            rs = rows[name]
            iters = f"{med(r['iters'] for r in rs):g}"
            if name == "multiscale":
                iters += f" fine (+{med(r['coarse'] for r in rs):g} coarse)"
            cmp.add(label, fmt_time(med(r["t"] for r in rs)), fmt_time(med(r["cpu"] for r in rs)), iters,
                    f"{sum(r['conv'] for r in rs)}/{len(rs)}", f"{max(r['rep'] for r in rs):.2e}",
                    f"{max(r['dense'] for r in rs):.2e}", f"{cpu_on / cpu_ms:.2f}x" if name == "multiscale" else "1.00x")
        cmp.notes += [
            f"multiscale kept {med(r['kept'] for r in rows['multiscale']):.3f} of the n m pairs (median over the "
            "instances).",
            "sinkhorn on an online squared-Euclidean cloud in d <= 3 (eps_scaling='auto') starts from "
            "multiscale_sinkhorn's potentials (on 1000 voxels, against multiscale_sinkhorn's 2000) and returns "
            "them where their plan on the whole cloud meets tol (one float64 certification pass over n m); its "
            "'iterations' are then the start's truncated iterations; otherwise its own loop goes on.",
            "the online solver was warmed up on a 4200-point problem first (its tile kernel may be compiled "
            "once per process); the two solvers alternate within each instance's repeats.",
            "CPU speed-up: online CPU time / multiscale CPU time, medians (one thread; CPU time is less sensitive "
            "than wall time to the other work on this shared machine).",
            f"load average at the end of the run: {os.getloadavg()[0]:.2f}.",
        ]
    tables = [t for t in (check, cmp) if t is not None]
    if args.results:
        path = write_results("multiscale", tables, args.results)
        print(f"wrote {path}")
    for t in tables:
        print(t.render())
    return 0

if __name__ == "__main__":
    sys.exit(main())
