"""Truncated multiscale Sinkhorn on 3-D point clouds; writes benchmarks/results/multiscale.md.

Problem (the task's): x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, uniform weights, squared
Euclidean cost, eps = 1e-2, float32, tol = 1e-4 (L1 marginal error), one thread.

* n = m = 100k: time of the full :func:`multiscale_sinkhorn` solve (clustering, coarse
  solve, extrapolation, truncation, fine solve, certification), its marginal error
  recomputed *exactly* in float64 over all n m pairs from the returned potentials with the
  dense formula P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) (in tiles; the cost of that
  pass is first estimated on a slice of rows), and the peak RSS of the process right after
  the solve (``resource.getrusage(...).ru_maxrss``).
* n = m = 20k: the same solve vs ``entrokit.sinkhorn(a, b, PointCloud(x, y,
  chunk_size=2048), eps, tol=1e-4)`` (online point cloud, eps-scaling "auto"), after a
  warm-up call of the latter on a smaller problem (it may compile its tile kernel once per
  process); both results are checked in float64 over all pairs.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_multiscale.py`` (about 10 min
on a 2-core Xeon).
"""

from __future__ import annotations

import argparse
import os
import resource
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


def solve_multiscale(n: int):
    a, b, x, y = problem(n)
    t, c = time.perf_counter(), time.process_time()
    res = multiscale_sinkhorn(a, b, x, y, EPS, tol=TOL)
    return res, time.perf_counter() - t, time.process_time() - c, (a, b, x, y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="size of the large problem")
    parser.add_argument("--n-compare", type=int, default=20_000, help="size of the comparison with PointCloud")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                        help="directory for multiscale.md ('' to skip writing)")
    parser.add_argument("--skip-dense-check", action="store_true", help="skip the full float64 check at --n")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Machine: {machine_info()}", flush=True)

    # -- large problem ----------------------------------------------------------------------
    rss0 = peak_rss_mib()
    res, t_ms, cpu_ms, (a, b, x, y) = solve_multiscale(args.n)
    rss = peak_rss_mib()
    info = res.info
    print(f"n={args.n}: multiscale {t_ms:.1f} s (CPU {cpu_ms:.1f} s), converged={bool(res.converged)}, certified error "
          f"{float(res.marginal_error):.3e}, iters {int(res.n_iter)}, kept {info.kept_fraction[0]:.3f}, "
          f"peak RSS {rss:.0f} MiB", flush=True)
    check = Table(
        f"Multiscale Sinkhorn, n = m = {args.n:,}, d = 3, eps = {EPS:g}, float32, tol = {TOL:g}",
        ["n", "total time (wall)", "CPU time", "coarse", "fine", "fine iters", "clusters (x, y)", "kept fraction",
         "certified L1 error (bound)", "dense float64 L1 error (all pairs)", "check time", "peak RSS",
         "RSS target < 2 GiB"],
    )
    probe_rows = 2048
    t = time.perf_counter()
    dense_marginal_error(res.f, res.g, a, b, x, y, EPS, rows=probe_rows)
    estimate = (time.perf_counter() - t) * args.n / probe_rows
    print(f"full float64 check: estimated {estimate:.0f} s from {probe_rows} rows", flush=True)
    if args.skip_dense_check:
        dense_err, t_check = None, None
    else:
        t = time.perf_counter()
        dense_err = dense_marginal_error(res.f, res.g, a, b, x, y, EPS)
        t_check = time.perf_counter() - t
        print(f"dense float64 marginal error {dense_err:.3e} ({t_check:.0f} s)", flush=True)
    fine = info.time - info.coarse_time  # extrapolation, truncation, fine solve, certification
    check.add(
        f"{args.n:,}", fmt_time(t_ms), fmt_time(cpu_ms), fmt_time(info.coarse_time), fmt_time(fine), int(res.n_iter),
        f"{info.n_clusters[0]}, {info.n_clusters[1]}", f"{info.kept_fraction[0]:.3f}",
        f"{float(res.marginal_error):.2e}",
        "skipped" if dense_err is None else f"{dense_err:.2e}",
        "n/a" if t_check is None else f"{fmt_time(t_check)} (est. {estimate:.0f} s)",
        f"{rss:.0f} MiB", "yes" if rss < 2048 else "no",
    )
    check.notes += [
        "total time: clustering + coarse eps-scaling solve on the centroids (float64) + extrapolation + "
        "truncation bounds + fine Sinkhorn on the kept blocks + float64 certification of the kept plan and "
        "the dropped-mass bound; 'fine' is everything after the coarse solve.",
        f"certified L1 error = exact float64 error of the truncated plan + 2 x dropped-mass bound "
        f"({info.kept_marginal_error[0]:.2e} + 2 x {info.dropped_mass_bound[0]:.2e}).",
        "dense float64 L1 error: the returned float32 potentials, P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) "
        "over all n m pairs, C in float64, in tiles.",
        f"peak RSS: ru_maxrss right after the solve (the process held {rss0:.0f} MiB after importing torch "
        "and entrokit).",
    ]

    # -- comparison with the online point cloud ------------------------------------------
    cmp = Table(
        f"n = m = {args.n_compare:,}: multiscale vs online PointCloud Sinkhorn (eps = {EPS:g}, float32, "
        f"tol = {TOL:g})",
        ["solver", "time (wall)", "CPU time", "iterations", "converged", "reported L1 error", "dense float64 L1 error",
         "speed-up"],
    )
    res_s, t_s, cpu_s, (a2, b2, x2, y2) = solve_multiscale(args.n_compare)
    aw, bw, xw, yw = problem(4200, seed=1)  # warm-up (the online tile kernel may compile once)
    entrokit.sinkhorn(aw, bw, PointCloud(xw, yw, chunk_size=2048), EPS, tol=1e-2)
    t, c = time.perf_counter(), time.process_time()
    res_o = entrokit.sinkhorn(a2, b2, PointCloud(x2, y2, chunk_size=2048), EPS, tol=TOL)
    t_o, cpu_o = time.perf_counter() - t, time.process_time() - c
    err_s = dense_marginal_error(res_s.f, res_s.g, a2, b2, x2, y2, EPS)
    err_o = dense_marginal_error(res_o.f, res_o.g, a2, b2, x2, y2, EPS)
    print(f"n={args.n_compare}: multiscale {t_s:.1f} s ({int(res_s.n_iter)} fine iters), online "
          f"{t_o:.1f} s ({int(res_o.n_iter)} iters)", flush=True)
    cmp.add("multiscale_sinkhorn", fmt_time(t_s), fmt_time(cpu_s), f"{int(res_s.n_iter)} fine (+{res_s.info.coarse_iters[0]} coarse)",
            bool(res_s.converged), f"{float(res_s.marginal_error):.2e}", f"{err_s:.2e}", f"{cpu_o / cpu_s:.2f}x")
    cmp.add("sinkhorn + PointCloud(chunk_size=2048)", fmt_time(t_o), fmt_time(cpu_o), int(res_o.n_iter), bool(res_o.converged),
            f"{float(res_o.marginal_error):.2e}", f"{err_o:.2e}", "1.00x")
    cmp.notes += [
        f"multiscale kept {res_s.info.kept_fraction[0]:.3f} of the n m pairs "
        f"({res_s.info.n_clusters[0]} x {res_s.info.n_clusters[1]} clusters).",
        "the online solver was warmed up on a 4200-point problem first (its tile kernel may be compiled "
        "once per process); its time is the second call's.",
        "speed-up: online CPU time / multiscale CPU time (one thread; CPU time is less sensitive than wall "
        "time to the other work on this shared machine).",
    ]
    if args.results:
        path = write_results("multiscale", [check, cmp], args.results)
        print(f"wrote {path}")
    print(check.render())
    print(cmp.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
