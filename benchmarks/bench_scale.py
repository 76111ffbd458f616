"""Point clouds past one dense matrix: entrokit's online and multiscale paths vs GeomLoss
(KeOps online and multiscale backends) and POT ``empirical_sinkhorn``.

Problem: x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, uniform weights, cost |x - y|^2 (ours and
POT's; GeomLoss runs |x - y|^2 / 2 with blur = sqrt(eps / 2), the same problem), eps = 1e-2,
float32, one thread. Every library is scored by the L1 marginal error of its potentials,
recomputed here in float64 tile by tile: P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

Sections:
  pass       one soft-min pass at n = 20k: entrokit (compiled tile, eager tile, KeOps
             backend) vs GeomLoss's KeOps online soft-min.
  iteration  one Sinkhorn iteration at n = 5k: online vs entrokit's dense
             stabilized-kernel iteration.
  solve      full solves at n = 5k and 20k to 1e-4 (and entrokit at GeomLoss's own error).
  large      n = 100k and 1M: time per iteration of the online path (1M: measured on a
             block of rows and scaled to all rows) and whole-process peak RSS; at 100k the
             full multiscale solve.
  grad       n = 20k and 50k: a solve on the online path whose points require gradients,
             then backward of value + transport_cost (implicit gradients), against the same
             solve without gradients: peak RSS, wall and process CPU time (memory table:
             eps = 1, tol = 1e-2, so that a row takes minutes, not hours).

Each row runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own.

    python benchmarks/bench_scale.py [--sections pass iteration solve large grad] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

EPS = 1e-2
TOL = 1e-4


def clouds(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    y = 0.8 * torch.rand(n, 3, generator=gen, dtype=torch.float64) + 0.1
    return x.to(dtype), y.to(dtype)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def marginal_error(x, y, f, g, eps: float, cost_scale: float = 1.0) -> float:
    """L1 error of both marginals in float64, uniform weights, computed online by entrokit's
    geometry (tiles; the plan formula is the one in the module docstring)."""
    from entrokit import PointCloud

    x, y = x.detach().double()[None], y.detach().double()[None]
    f, g = f.detach().double().reshape(1, -1), g.detach().double().reshape(1, -1)
    n, m = x.shape[1], y.shape[1]
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    b = torch.full((1, m), 1.0 / m, dtype=torch.float64)
    geom = PointCloud(x * math.sqrt(cost_scale), y * math.sqrt(cost_scale), online=True, kernel="eager")
    row, col = geom.marginals(f, g, a, b, eps)
    return float((row - a).abs().sum() + (col - b).abs().sum())


# -- child rows ---------------------------------------------------------------------------
PASS_KINDS = ("entrokit-compile", "entrokit-eager", "entrokit-keops", "keops-lazytensor", "geomloss-keops")


def _pass_fn(kind: str, x, y, h, log_w):
    """One soft-min pass ``-eps log sum_j exp((h_j - |x_i - y_j|^2)/eps + log w_j)`` over all i."""
    if kind == "geomloss-keops":
        from geomloss._legacy.sinkhorn_samples import cost_formulas, lse_genred, softmin_online

        lse = lse_genred(cost_formulas[2], 3, dtype="float32")  # its cost |x-y|^2/2 at eps/2: our problem
        hy = (log_w + h / EPS).reshape(-1)
        return lambda: softmin_online(EPS / 2, (x, y), hy, log_conv=lse)
    if kind == "keops-lazytensor":
        from pykeops.torch import LazyTensor

        x_i, y_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
        hw_j = LazyTensor((h / EPS + log_w).reshape(-1, 1)[None, :, :])
        z = hw_j - ((x_i - y_j) ** 2).sum(-1) / EPS  # the reduction KeOps documents for log-sum-exp
        return lambda: -EPS * z.logsumexp(dim=1)
    from entrokit import PointCloud

    if kind == "entrokit-keops":
        from entrokit.geometry.keops import KeOpsPointCloud

        geom = KeOpsPointCloud(x, y).flatten_batch()
    else:
        geom = PointCloud(x, y, online=True, kernel=kind.split("-")[1]).flatten_batch()
    return lambda: geom.softmin(h, log_w, EPS, axis=1)


def row_pass(n: int, instances: int = 3, repeats: int = 3) -> dict:
    """Every kind in one process, interleaved: per instance (seed) one warm-up per kind
    (compilation), then ``repeats`` rounds timing each kind in turn; per kind the median
    over instances of the per-instance median (process CPU and wall time), and the max
    |difference| of its output from the float64 soft-min."""
    out = {k: {"cpu": [], "wall": [], "diff": 0.0} for k in PASS_KINDS}
    for seed in range(instances):
        x, y = clouds(n, seed=seed)
        h = torch.zeros(1, n)
        log_w = torch.full((1, n), -math.log(n))
        fns = {k: _pass_fn(k, x, y, h, log_w) for k in PASS_KINDS}
        ref = None
        for k in PASS_KINDS:
            val = fns[k]().reshape(-1).double() * (2.0 if k == "geomloss-keops" else 1.0)  # GeomLoss: half
            if ref is None:  # the float64 reference, on a block of rows (exact soft-min)
                xs, yd = x[:512].double(), y.double()
                C = torch.cdist(xs, yd).square()
                ref = -EPS * torch.logsumexp((h.double() - C) / EPS + log_w.double(), dim=-1).reshape(-1)
            out[k]["diff"] = max(out[k]["diff"], float((val[:512] - ref).abs().max()))
        runs = {k: [] for k in PASS_KINDS}
        for _ in range(repeats):
            for k in PASS_KINDS:
                c, w = time.process_time(), time.perf_counter()
                fns[k]()
                runs[k].append((time.process_time() - c, time.perf_counter() - w))
        for k in PASS_KINDS:
            out[k]["cpu"].append(statistics.median(r[0] for r in runs[k]))
            out[k]["wall"].append(statistics.median(r[1] for r in runs[k]))
    res = {k: {"cpu": statistics.median(v["cpu"]), "wall": statistics.median(v["wall"]), "diff": v["diff"]}
           for k, v in out.items()}
    res["rss"] = peak_rss_mib()
    return res


def row_iteration(kind: str, n: int, iters: int = 10) -> dict:
    from entrokit import PointCloud
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    x, y = clouds(n)
    a = torch.full((n,), 1.0 / n)
    online = kind == "online"
    pb = make_problem(a, a, PointCloud(x, y, online=online), check_inputs=False).with_batch()
    opts = SinkhornOptions(max_iter=iters, fixed_iter=True, lse_mode=True if online else False)
    sinkhorn_problem(pb, EPS, SinkhornOptions(max_iter=2, fixed_iter=True, lse_mode=opts.lse_mode))
    t = time.perf_counter()
    sinkhorn_problem(pb, EPS, opts)
    return {"time": (time.perf_counter() - t) / iters, "rss": peak_rss_mib()}


SLOW_RUN_S = 30.0  # a first run longer than this is timed once: its repeats would not change the median


def _solve_once(kind: str, x, y, a, tol: float, n: int):
    """One full solve of ``kind``; returns (f, g, iterations) on our scale (cost |x - y|^2)."""
    import geomloss  # imported by row_solve before any clock starts
    import ot

    import entrokit

    la = math.log(1.0 / n)
    if kind.startswith("geomloss"):
        _, backend, scaling = kind.split("-")
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(EPS / 2), scaling=float(scaling), debias=False,
                                    potentials=True, backend=backend)
        F, G = loss(x, y)
        return 2 * F, 2 * G, None
    if kind == "pot-dense":  # the cost materialised: stopThr on the L2 norm of the column error
        M = ot.dist(x, y)
        _, log_ = ot.sinkhorn(a, a, M, EPS, method="sinkhorn_log", numItermax=int(tol_iters(n)),
                              stopThr=tol / math.sqrt(n), log=True, warn=False)
        return EPS * (log_["log_u"] - la), EPS * (log_["log_v"] - la), int(log_["niter"]) + 1
    if kind == "pot-dense-f64":  # POT's default method (plain scaling) on the float64 cost, as a POT user runs it
        M = ot.dist(x.double(), y.double())
        a64 = a.double()
        _, log_ = ot.sinkhorn(a64, a64, M, EPS, numItermax=int(tol_iters(n)), stopThr=tol / math.sqrt(n), log=True,
                              warn=False)
        return EPS * (log_["u"].log() - la), EPS * (log_["v"].log() - la), int(log_["niter"]) + 1
    if kind == "pot":
        # POT checks the L1 error of the row marginal after a column update (columns exact): stopThr = tol
        f, g, log = ot.bregman.empirical_sinkhorn(x, y, EPS, a=a, b=a, numIterMax=int(tol_iters(n)), stopThr=tol,
                                                  isLazy=True, batchSize=2048, log=True, warn=False)
        return EPS * (f - la), EPS * (g - la), int(log["niter"]) + 1
    if kind == "multiscale":
        from entrokit.solvers.multiscale import multiscale_sinkhorn

        res = multiscale_sinkhorn(a, a, x, y, EPS, tol=tol)
    else:
        online = {"dense": False, "online": True, "auto": None}[kind]
        res = entrokit.sinkhorn(a, a, entrokit.PointCloud(x, y, online=online), EPS, tol=tol, max_iter=100_000)
    return res.f, res.g, int(res.n_iter.max())


def row_solve(kind: str, n: int, tol: float, seed: int = 0, repeats: int = 3) -> dict:
    """Full solves of one library on instance ``seed``, in this process. The first run is a
    warm-up (KeOps and torch.compile build their kernels there); if it took under
    ``SLOW_RUN_S`` of CPU, ``repeats`` timed runs follow and their medians are reported,
    otherwise the first run is the one timed. Imports happen before any clock starts."""
    import warnings

    warnings.simplefilter("ignore")
    import geomloss  # noqa: F401  every library imported before the clock starts
    import ot  # noqa: F401

    import entrokit  # noqa: F401

    x, y = clouds(n, seed=seed)
    a = torch.full((n,), 1.0 / n)
    runs = []
    for i in range(1 + repeats):
        c, w = time.process_time(), time.perf_counter()
        f, g, iters = _solve_once(kind, x, y, a, tol, n)
        runs.append((time.process_time() - c, time.perf_counter() - w))
        if i == 0 and runs[0][0] >= SLOW_RUN_S:
            break
    timed = runs if len(runs) == 1 else runs[1:]
    out = {"cpu": statistics.median(r[0] for r in timed), "time": statistics.median(r[1] for r in timed),
           "runs": len(timed), "err": marginal_error(x, y, f, g, EPS), "rss": peak_rss_mib()}
    if iters is not None:
        out["iters"] = iters
    return out


def row_online_solve(n: int, instances: int = 3, repeats: int = 3) -> dict:
    """Full solves to ``TOL`` on the dense and the online path, interleaved in one process:
    per instance (seed) one warm-up solve per path (compiles the tiles at this size), then
    ``repeats`` rounds; per path the median over instances of the per-instance median
    (process CPU and wall time), the iterations, the float64 error and the certification
    pass's share (the float64 plan reduction of the result, timed alone)."""
    import warnings

    import entrokit
    from entrokit.solvers import _entropic

    warnings.simplefilter("ignore")
    paths = ("dense", "online")
    out = {p: {"cpu": [], "wall": [], "iters": [], "loop": [], "err": [], "cert_cpu": []} for p in paths}
    for seed in range(instances):
        x, y = clouds(n, seed=seed)
        a = torch.full((n,), 1.0 / n)
        geoms = {p: entrokit.PointCloud(x, y, online=p == "online") for p in paths}
        if seed == 0:  # warm-up: compiles the online tiles at this size
            for p in paths:
                entrokit.sinkhorn(a, a, geoms[p], EPS, tol=TOL, max_iter=100_000)
        res = {}
        runs = {p: [] for p in paths}
        passes = {p: 0 for p in paths}  # certification passes the solves ran
        real = _entropic.certify_plan
        for _ in range(repeats):
            for p in paths:

                def counted(*args, p=p, passes=passes, real=real, **kw):
                    passes[p] += 1
                    return real(*args, **kw)

                _entropic.certify_plan = counted
                c, w = time.process_time(), time.perf_counter()
                res[p] = entrokit.sinkhorn(a, a, geoms[p], EPS, tol=TOL, max_iter=100_000)
                runs[p].append((time.process_time() - c, time.perf_counter() - w))
                _entropic.certify_plan = real
        for p in paths:
            r = res[p]
            pb = geoms[p].flatten_batch()
            f, g, aa = r.f.reshape(1, -1), r.g.reshape(1, -1), a.reshape(1, -1)
            c = time.process_time()
            real(pb, f, g, aa, aa, EPS)
            # the pass's time where the solve ran it (else certified from the solver's own sums)
            out[p]["cert_cpu"].append((time.process_time() - c) if passes[p] else 0.0)
            out[p]["cpu"].append(statistics.median(t[0] for t in runs[p]))
            out[p]["wall"].append(statistics.median(t[1] for t in runs[p]))
            out[p]["iters"].append(int(r.n_iter))
            # iterations of sinkhorn's own loop: none where the multiscale start certified
            out[p]["loop"].append(0 if r.info.as_dict().get("multiscale_start") else int(r.n_iter))
            out[p]["err"].append(marginal_error(x, y, r.f, r.g, EPS))
    res = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in out.items()}
    res["rss"] = peak_rss_mib()
    return res


def tol_iters(n: int) -> int:
    return 3000


def row_large(n: int, rows: int) -> dict:
    """One online iteration (two soft-min passes); with ``rows < n`` the passes run on a
    block of ``rows`` source points against all targets and are scaled by n / rows."""
    from entrokit import PointCloud

    x, y = clouds(n)
    h = torch.zeros(1, n)
    log_w = torch.full((1, n), -math.log(n))
    xs = x[:rows]
    geom = PointCloud(xs, y, online=True).flatten_batch()
    geom.softmin(h, log_w, EPS, axis=1)  # compile once
    t = time.perf_counter()
    geom.softmin(h, log_w, EPS, axis=1)  # rows x n entries
    geom.softmin(h[:, :rows], log_w[:, :rows], EPS, axis=0)  # n x rows entries
    elapsed = (time.perf_counter() - t) * (n / rows)
    return {"time": elapsed, "rss": peak_rss_mib()}


GRAD_EPS, GRAD_TOL = 1.0, 1e-2


def row_grad(n: int, grad: bool) -> dict:
    """Online solve with (or without) differentiable points, then backward; the tile
    kernel is compiled once on a small problem first (compilation excluded)."""
    import entrokit

    x, y = clouds(n)
    w = min(n, 4096)
    entrokit.PointCloud(x[:w], y[:w], online=True, kernel="compile").flatten_batch().softmin(
        torch.zeros(1, w), torch.full((1, w), -math.log(w)), GRAD_EPS, axis=1)
    x.requires_grad_(grad)
    y.requires_grad_(grad)
    a = torch.full((n,), 1.0 / n)
    t, c = time.perf_counter(), time.process_time()
    res = entrokit.sinkhorn(a, a, entrokit.PointCloud(x, y, online=True), GRAD_EPS, tol=GRAD_TOL)
    fwd, fwd_cpu = time.perf_counter() - t, time.process_time() - c
    bwd = bwd_cpu = 0.0
    if grad:
        t, c = time.perf_counter(), time.process_time()
        (res.value + res.transport_cost).backward()
        bwd, bwd_cpu = time.perf_counter() - t, time.process_time() - c
    rss = peak_rss_mib()
    err = marginal_error(x, y, res.f, res.g, GRAD_EPS)
    return {"fwd": fwd, "fwd_cpu": fwd_cpu, "bwd": bwd, "bwd_cpu": bwd_cpu, "rss": rss, "err": err,
            "iters": int(res.n_iter), "finite": bool(not grad or torch.isfinite(x.grad).all())}


def run_child(args) -> None:
    torch.set_num_threads(1)
    spec = json.loads(args.child)
    fn = {"pass": row_pass, "iteration": row_iteration, "solve": row_solve, "large": row_large,
          "grad": row_grad, "online_solve": row_online_solve}[spec.pop("row")]
    print("RESULT " + json.dumps(fn(**spec)), flush=True)


def child(timeout: float, **spec) -> dict | None:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        print(f"  {spec}: over {timeout:.0f} s, stopped", flush=True)
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            print(f"  {spec}: {res}", flush=True)
            return res
    print(f"  {spec}: failed\n{out.stderr[-2000:]}", flush=True)
    return None


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for mod in ("pykeops", "geomloss", "ot"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # not installed
            pass
    return ", ".join(out)


# -- tables --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["pass", "iteration", "solve", "large"])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds per row before it is stopped")
    parser.add_argument("--pass-n", type=int, default=10_000, help="size of the soft-min pass section")
    parser.add_argument("--instances", type=int, default=3, help="seeds of the pass, online_solve and solve (n = 5000) sections")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per instance (pass, online_solve, solve)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.md"))
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    from entrokit.bench.common import Table, machine_info

    q = args.quick
    tables = []
    if "pass" in args.sections:
        n = 2000 if q else args.pass_n
        t = Table(f"One soft-min pass, n = m = {n}, d = 3, float32, one thread",
                  ["library / kernel", "time per pass, CPU (wall)", "M entries/s (CPU)",
                   "ratio to GeomLoss KeOps (CPU)", "ratio to KeOps LazyTensor (CPU)", "max abs error vs float64"])
        r = child(args.budget, row="pass", n=n, instances=args.instances, repeats=args.repeats)
        if r is None:
            t.add("all", "failed", "", "", "", "")
        else:
            g, lz = r["geomloss-keops"]["cpu"], r["keops-lazytensor"]["cpu"]
            for kind in PASS_KINDS:
                k = r[kind]
                t.add(kind, f"{k['cpu'] * 1e3:.0f} ms ({k['wall'] * 1e3:.0f} ms)", f"{n * n / k['cpu'] / 1e6:.0f}",
                      f"{k['cpu'] / g:.2f}", f"{k['cpu'] / lz:.2f}", f"{k['diff']:.1e}")
            comp, eag = r["entrokit-compile"]["cpu"], r["entrokit-eager"]["cpu"]
            t.notes.append(f"compiled tile vs eager tile: {eag / comp:.2f}x faster (CPU time).")
        t.notes += [
            f"one process, every kind interleaved: per instance ({args.instances} seeds) a warm-up per kind (KeOps "
            f"and torch.compile compile there, excluded), then {args.repeats} rounds; median over instances of the "
            "per-instance median. CPU = process time (time.process_time), wall in brackets.",
            "keops-lazytensor: KeOps directly, `(LazyTensor(h/eps + log w)_j - |x_i - y_j|^2/eps).logsumexp(dim=1)`, "
            "float32, CPU backend (the formula KeOps documents for a log-sum-exp reduction); geomloss-keops: "
            "GeomLoss's own online soft-min (`softmin_online` with its `lse_genred` kernel, the inner loop of "
            "SamplesLoss(backend='online')); entrokit-keops: entrokit's KeOpsPointCloud; entrokit-compile / "
            "-eager: PointCloud(online=True) with the torch.compile'd or the eager tile.",
            "max abs error: |soft-min - float64 soft-min| on the first 512 rows, max over instances.",
        ]
        tables.append(t)
    if "iteration" in args.sections:
        n = 1000 if q else 5000
        t = Table(f"One Sinkhorn iteration, n = m = {n}, float32, one thread",
                  ["path", "time per iteration", "ratio to dense", "peak RSS"])
        dense = child(args.budget, row="iteration", kind="dense", n=n)
        for kind in ("dense", "online"):
            r = dense if kind == "dense" else child(args.budget, row="iteration", kind=kind, n=n)
            if r is None:
                t.add(kind, "failed", "", "")
                continue
            t.add(kind, f"{r['time'] * 1e3:.1f} ms", f"{r['time'] / dense['time']:.2f}" if dense else "",
                  f"{r['rss']:.0f} MiB")
        t.notes.append("dense = entrokit's stabilized-kernel engine on the materialised cost (two mat-vecs per "
                       "iteration); online = two tiled soft-min passes (compiled tiles).")
        tables.append(t)
    if "online_solve" in args.sections:
        n = 1000 if q else 5000
        t = Table(f"Full solve to L1 marginal error {TOL:g} on the dense and the online path, n = m = {n} "
                  f"(d = 3, eps = {EPS:g}, float32, one thread)",
                  ["path", "time CPU (wall)", "ratio to dense (CPU)", "iterations", "loop iterations",
                   "L1 error (float64)", "certification pass CPU"])
        r = child(args.budget, row="online_solve", n=n, instances=args.instances, repeats=args.repeats)
        if r is None:
            t.add("both", "failed", "", "", "", "", "")
        else:
            for p in ("dense", "online"):
                k = r[p]
                t.add(p, f"{k['cpu']:.2f} s ({k['wall']:.2f} s)", f"{k['cpu'] / r['dense']['cpu']:.2f}",
                      f"{k['iters']:.0f}", f"{k['loop']:.0f}", f"{k['err']:.2e}", f"{k['cert_cpu']:.2f} s")
        t.notes += [
            f"one process, the two paths interleaved: a warm-up solve per path on the first instance (the online "
            f"path compiles its tiles at this size there), then per instance ({args.instances} seeds) "
            f"{args.repeats} round(s); median over instances of the per-instance median (the L1 error too); CPU = "
            "process time, wall in brackets.",
            "dense = PointCloud(online=False): the cost is materialised and the loop runs the stabilized-kernel "
            "engine (two mat-vecs per iteration, no exp); online = PointCloud(online=True): sinkhorn starts from "
            "multiscale_sinkhorn's potentials and returns them where the certificate accepts their plan on the "
            "whole cloud; otherwise its loop goes on (two tiled log-sum-exp passes per iteration, n*m exps each). "
            "iterations = the result's n_iter (for a certified start, its truncated iterations); loop iterations "
            "= those of sinkhorn's own loop. certification = the float64 plan reduction that certifies the "
            "result (certify_plan), timed alone on the returned potentials, where the solve runs it (0: the result "
            "is certified from the float64 finish's own sums of its plan, no pass).",
        ]
        tables.append(t)
    if "solve" in args.sections:
        t = Table(f"Full solves to L1 marginal error {TOL:g} (d = 3, eps = {EPS:g}, float32, one thread)",
                  ["n", "library / setting", "instances", "time CPU (wall)", "timed runs", "L1 error (float64)",
                   "iterations", "peak RSS", "entrokit at the anchor's error, CPU (error)", "ratio (CPU)"])
        for n, seeds in ([(1000, 2)] if q else [(5000, args.instances), (20_000, 1)]):
            rows = [("entrokit auto", "auto"), ("entrokit online", "online"), ("entrokit multiscale", "multiscale"),
                    ("GeomLoss online scaling=0.5", "geomloss-online-0.5"),
                    ("GeomLoss online scaling=0.9", "geomloss-online-0.9"),
                    ("GeomLoss multiscale scaling=0.5", "geomloss-multiscale-0.5"),
                    ("POT empirical_sinkhorn (lazy)", "pot"), ("POT sinkhorn_log (dense cost)", "pot-dense"),
                    ("POT sinkhorn, default method (dense float64 cost)", "pot-dense-f64")]
            if n > 5000:
                rows = [r for r in rows if r[1] not in ("geomloss-online-0.9", "pot-dense", "pot-dense-f64")]
            found = {kind: [] for _, kind in rows}
            stopped = set()
            for seed in range(seeds):  # instances outermost: every library runs on one seed before the next
                for _, kind in rows:
                    if kind in stopped:
                        continue
                    r = child(args.budget, row="solve", kind=kind, n=n, tol=TOL, seed=seed, repeats=args.repeats)
                    if r is None:
                        stopped.add(kind)
                        continue
                    if kind.startswith("geomloss") or kind.startswith("pot"):
                        # entrokit at the anchor's own error on the same instance
                        r["eq"] = child(args.budget, row="solve", kind="auto", n=n, tol=r["err"], seed=seed,
                                        repeats=args.repeats)
                    found[kind].append(r)
            for label, kind in rows:
                rs = found[kind]
                if kind in stopped or not rs:
                    t.add(n, label, seeds, f"> {args.budget:.0f} s (stopped)", "", "", "", "", "", "")
                    continue

                def med(key, rs=rs):
                    return statistics.median(r[key] for r in rs)
                eq, ratio = "", ""
                eqs = [r["eq"] for r in rs if r.get("eq")]
                if len(eqs) == len(rs) and eqs:
                    eq = f"{statistics.median(e['cpu'] for e in eqs):.2f} s ({statistics.median(e['err'] for e in eqs):.2e})"
                    ratio = f"{statistics.median(e['cpu'] / r['cpu'] for e, r in zip(eqs, rs)):.2f}"
                iters = f"{med('iters'):.0f}" if all("iters" in r for r in rs) else ""
                t.add(n, label, len(rs), f"{med('cpu'):.2f} s ({med('time'):.2f} s)",
                      "/".join(str(r["runs"]) for r in rs), f"{med('err'):.2e}", iters, f"{max(r['rss'] for r in rs):.0f} MiB",
                      eq, ratio)
        t.notes.append(f"each (library, instance) runs in its own process (its peak RSS is its own), instances "
                       f"outermost so that every library meets the machine in the same state; in each process a "
                       f"warm-up run (KeOps and torch.compile build their kernels there), then {args.repeats} timed "
                       f"runs, or the first run alone where it took over {SLOW_RUN_S:.0f} s of CPU "
                       "(\"timed runs\", per instance); medians over instances; CPU = process time, wall in brackets.")
        t.notes.append("ratio = median over instances of entrokit's CPU time at the anchor's own error on that instance "
                       "/ the anchor's CPU time (< 1: entrokit faster); entrokit runs `sinkhorn` on "
                       "`PointCloud(x, y)` (online=None: the library picks the path).")
        t.notes.append("GeomLoss stops after its fixed eps-schedule; its error is what that schedule reached. "
                       "POT's lazy solver runs numpy tiles of 2048 rows with stopThr = tol on the L1 error of its row "
                       "marginal (checked after a column update, so it implies the target); POT's dense "
                       "`sinkhorn_log` runs on the materialised float32 cost with stopThr = tol / sqrt(n) on the L2 "
                       "norm of its column error; POT's default `ot.sinkhorn` (plain scaling, the fastest POT solver on this "
                       "problem while exp(-C/eps) stays in float64's range) runs on the float64 cost with the same rule.")
        t.notes.append("a library stopped at the budget on one instance is not run on the next.")
        t.notes.append("entrokit online (and auto, which picks the online path at n = 20,000) starts from "
                       "multiscale_sinkhorn's potentials on 1000 voxels and returns them where the certificate (one "
                       "float64 pass over the plan) accepts them on the whole cloud, as here; 'iterations' are then "
                       "the start's truncated iterations. entrokit multiscale = multiscale_sinkhorn itself (2000 "
                       "voxels, its own certificate of the truncation).")
        tables.append(t)
    if "large" in args.sections:
        t = Table("Online path at scale (float32, one thread)",
                  ["n", "what", "time", "peak RSS"])
        for n, rows in ([(20_000, 2048)] if q else [(100_000, 100_000), (1_000_000, 2048)]):
            r = child(args.budget, row="large", n=n, rows=rows)
            what = "one iteration" + ("" if rows == n else f" (measured on {rows} rows, scaled by n/rows)")
            t.add(n, what, f"{r['time']:.1f} s" if r else "stopped", f"{r['rss']:.0f} MiB" if r else "")
        n = 20_000 if q else 100_000
        r = child(args.budget * 2, row="solve", kind="multiscale", n=n, tol=TOL, repeats=0)
        if r:
            t.add(n, f"multiscale full solve to {TOL:g} (error {r['err']:.2e}, {r['iters']} iterations)",
                  f"{r['time']:.1f} s", f"{r['rss']:.0f} MiB")
        tables.append(t)
    if "grad" in args.sections:
        t = Table(f"Online path with differentiable points (float32, d = 3, eps = {GRAD_EPS:g}, tol = {GRAD_TOL:g}, "
                  "one thread)", ["n", "points require grad", "forward (wall / CPU)", "backward (wall / CPU)",
                                  "iterations", "L1 error (float64)", "peak RSS", "one n x m float32 buffer"])
        for n in ([4000] if q else [20_000, 50_000]):
            for grad in (False, True):
                r = child(args.budget, row="grad", n=n, grad=grad)
                if r is None or not r["finite"]:
                    t.add(n, grad, "failed" if r is None else "non-finite gradient", "", "", "", "", "")
                    continue
                t.add(n, grad, f"{r['fwd']:.1f} s / {r['fwd_cpu']:.1f} s",
                      f"{r['bwd']:.1f} s / {r['bwd_cpu']:.1f} s" if grad else "", r["iters"], f"{r['err']:.2e}",
                      f"{r['rss']:.0f} MiB", f"{n * n * 4 / 2**20:.0f} MiB")
        t.notes.append("backward = (value + transport_cost).backward() with implicit gradients (adjoint CG on the "
                       "online plan); the peak RSS is the whole process's (ru_maxrss), forward and backward.")
        t.notes.append("before the custom plan backward, the solve with differentiable points kept about 5.7 float32 "
                       "n x m buffers (2.4 GiB at n = 10000; OOM-killed at 21.7 GB at n = 50000).")
        tables.append(t)
    text = ["# Benchmark: scale\n", f"Machine: {machine_info()}  ", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"]
    text += [tb.to_markdown() for tb in tables]
    out_arg = "" if Path(args.out).name == "scale.md" else f" --out benchmarks/results/{Path(args.out).name}"
    text.append(f"Printed by `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_scale.py --sections "
                f"{' '.join(args.sections)} --pass-n {args.pass_n} --instances {args.instances} --repeats "
                f"{args.repeats} --budget {args.budget:g}{' --quick' if q else ''}{out_arg}`; versions: "
                f"{versions()}; load average at the end: "
                f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}.\n")
    print("\n".join(tb.render() for tb in tables))
    if not q:
        Path(args.out).write_text("\n".join(text))


if __name__ == "__main__":
    main()
