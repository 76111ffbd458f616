"""entrokit on one CUDA GPU: dense iterations against the HBM bound, online throughput
against GeomLoss/KeOps and FlashSinkhorn, and float32 vs TF32 accuracy.

Problem: x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, uniform weights, cost |x - y|^2 (FlashSinkhorn's
default full cost; GeomLoss runs |x - y|^2 / 2 with eps / 2, the same problem), eps = 1e-2,
float32. Accuracy is the L1 marginal error of each library's potentials, recomputed in float64
by one formula: P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

Sections:
  dense     one stabilized-kernel iteration reads the n x m kernel twice (K v, K^T u): its
            floor is 2 n m itemsize / bandwidth, with the bandwidth measured here.
  online    fixed-iteration runs at eps (no convergence test, no host sync inside the loop):
            time per iteration for entrokit (compiled / eager tiles), FlashSinkhorn
            (TF32 off / on) and GeomLoss's KeOps online soft-min.
  tf32      full solves to 1e-4 with TF32 matmuls off and on: the error each library's
            returned potentials really have.

    python benchmarks/bench_gpu.py [--sections dense online tf32] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from pathlib import Path

import torch

from entrokit.bench.common import Table, measure_bandwidth, write_results

EPS = 1e-2
DEV = "cuda"


def clouds(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    y = 0.8 * torch.rand(n, 3, generator=gen, dtype=torch.float64) + 0.1
    return x.to(DEV, dtype), y.to(DEV, dtype)


def marginal_error(x, y, f, g, eps=EPS) -> float:
    """L1 error of both marginals in float64 (uniform weights), online in tiles."""
    from entrokit import PointCloud

    x, y = x.detach().double()[None], y.detach().double()[None]
    f, g = f.detach().double().reshape(1, -1), g.detach().double().reshape(1, -1)
    n, m = x.shape[1], y.shape[1]
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64, device=x.device)
    b = torch.full((1, m), 1.0 / m, dtype=torch.float64, device=x.device)
    with tf32(False):
        row, col = PointCloud(x, y, online=True, kernel="eager").marginals(f, g, a, b, eps)
    return float((row - a).abs().sum() + (col - b).abs().sum())


class tf32:
    """Context: TF32 matmuls on or off."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def cuda_time(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def entrokit_fixed(x, y, iters: int, online: bool, kernel: str = "auto"):
    from entrokit import PointCloud
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    n = x.shape[0]
    a = torch.full((n,), 1.0 / n, device=DEV, dtype=x.dtype)
    geom = PointCloud(x, y, online=online, kernel=kernel)
    pb = make_problem(a, a, geom, check_inputs=False).with_batch()
    opts = SinkhornOptions(max_iter=iters, fixed_iter=True, lse_mode=True if online else False)
    return lambda: sinkhorn_problem(pb, EPS, opts)


def flash(x, y, iters=None, tf32_on=False, tol=None):
    from flash_sinkhorn import SamplesLoss

    kw = dict(loss="sinkhorn", blur=math.sqrt(EPS), potentials=True, allow_tf32=tf32_on, debias=False)
    if iters is not None:
        kw.update(use_epsilon_scaling=False, eps=EPS, n_iters=iters)
    loss = SamplesLoss(**kw)
    return lambda: loss(x, y)


def keops_softmin(x, y):
    from geomloss._legacy.sinkhorn_samples import cost_formulas, lse_genred, softmin_online

    lse = lse_genred(cost_formulas[2], 3, dtype="float32")
    h = torch.full((x.shape[0],), -math.log(x.shape[0]), device=DEV)
    return lambda: softmin_online(EPS / 2, (x, y), h, log_conv=lse)


DEADLINE = math.inf


def row(table: Table, fn, *cells):
    if time.time() > DEADLINE:
        table.add(*cells, "not run (time budget of this run spent)")
        return
    try:
        table.add(*cells, *fn())
    except Exception as err:  # one anchor failing must not lose the others
        traceback.print_exc()
        table.add(*cells, f"failed: {type(err).__name__}: {str(err)[:80]}")
    print(table.render().splitlines()[-1], flush=True)


def section_dense(quick: bool) -> Table:
    bw = measure_bandwidth(1 << 30, device=DEV)
    t = Table(f"Dense stabilized-kernel iteration vs the HBM bound (float32; measured read bandwidth {bw / 1e12:.2f} TB/s)",
              ["n = m", "time per iteration", "bound 2nm*4/BW", "fraction of bound"])
    iters = 50
    for n in ([4096] if quick else [8192, 16384, 32768]):
        x, y = clouds(n)

        def cells(n=n, x=x, y=y):
            run = entrokit_fixed(x, y, iters, online=False)
            per = cuda_time(run) / iters
            bound = 2 * n * n * 4 / bw
            return f"{per * 1e3:.3f} ms", f"{bound * 1e3:.3f} ms", f"{bound / per:.2f}"

        row(t, cells, n)
    t.notes.append("fraction of bound = floor / measured (1.0 = at the bandwidth floor).")
    return t


def _online_rows(t: Table, n: int) -> None:
    x, y = clouds(n)
    iters = 20 if n <= 32768 else 5
    base = {}

    def ours(kernel):
        with tf32(False):
            per = cuda_time(entrokit_fixed(x, y, iters, online=True, kernel=kernel), repeat=2) / iters
        base.setdefault("t", per)
        return f"{per * 1e3:.2f} ms", f"{2 * n * n / per / 1e9:.1f}", f"{per / base['t']:.2f}"

    def anchor(make, calls_per_iteration):
        def cells():
            per = cuda_time(make(), repeat=2) / calls_per_iteration
            return f"{per * 1e3:.2f} ms", f"{2 * n * n / per / 1e9:.1f}", f"{per / base['t']:.2f}" if base else ""
        return cells

    row(t, lambda: ours("compile"), n, "entrokit compiled tiles")
    row(t, lambda: ours("eager"), n, "entrokit eager tiles")
    row(t, anchor(lambda: flash(x, y, iters, tf32_on=False), iters), n, "FlashSinkhorn, TF32 off")
    row(t, anchor(lambda: flash(x, y, iters, tf32_on=True), iters), n, "FlashSinkhorn, TF32 on")
    # GeomLoss: one soft-min pass is half an iteration
    row(t, anchor(lambda: keops_softmin(x, y), 0.5), n, "GeomLoss KeOps online soft-min x2")


def section_online(quick: bool) -> Table:
    t = Table("Online (never stores the cost) Sinkhorn iteration, d = 3, float32, eps = 1e-2",
              ["n = m", "library / kernel", "time per iteration", "G entries/s (2nm per iteration)",
               "ratio to entrokit compiled"])
    for n in ([8192] if quick else [32768, 131072]):
        _online_rows(t, n)
    t.notes.append("ratio = time / entrokit compiled tiles (> 1: entrokit faster). FlashSinkhorn: fixed eps, "
                   "n_iters iterations, no eps-scaling; GeomLoss: two soft-min passes of its KeOps online backend.")
    return t


def section_tf32(quick: bool) -> Table:
    import entrokit

    t = Table("float32 vs TF32: full solves to L1 error 1e-4 (error recomputed in float64)",
              ["n = m", "library / path", "TF32", "time", "L1 error", "converged flag"])
    n = 4096 if quick else 16384
    x, y = clouds(n)
    a = torch.full((n,), 1.0 / n, device=DEV)
    for online in (False, True):
        for on in (False, True):
            def cells(online=online, on=on):
                with tf32(on):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = entrokit.sinkhorn(a, a, entrokit.PointCloud(x, y, online=online), EPS, tol=1e-4, max_iter=20_000)
                    torch.cuda.synchronize()
                    el = time.perf_counter() - t0
                return f"{el:.2f} s", f"{marginal_error(x, y, res.f, res.g):.2e}", str(bool(res.converged))
            row(t, cells, n, f"entrokit {'online' if online else 'dense'}", "on" if on else "off")
    for on in (False, True):
        def fcells(on=on):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f, g = flash(x, y, tf32_on=on)()
            torch.cuda.synchronize()
            el = time.perf_counter() - t0
            return f"{el:.2f} s", f"{marginal_error(x, y, f, g):.2e}", "(no flag)"
        row(t, fcells, n, "FlashSinkhorn (its eps-scaling schedule)", "on" if on else "off")
    t.notes.append("entrokit's tiles run their x.y products in float32 whatever the TF32 setting (see the online "
                   "geometry docstring); the dense path's cost is built once in float32.")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["dense", "tf32", "online"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--budget", type=float, default=None, help="seconds after which remaining rows are skipped")
    args = parser.parse_args()
    global DEADLINE
    if args.budget is not None:
        DEADLINE = time.time() + args.budget
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device.")
    tables = []
    for name in args.sections:
        tables.append({"dense": section_dense, "online": section_online, "tf32": section_tf32}[name](args.quick))
        print(tables[-1].render(), flush=True)
        write_results("gpu" + ("_quick" if args.quick else ""), tables, args.out)


if __name__ == "__main__":
    main()
