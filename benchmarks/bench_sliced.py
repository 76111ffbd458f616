"""Sliced Wasserstein: entrokit vs POT, and the variance of the control-variate estimators.

Part 1 times ``entrokit.losses.sliced.sliced_wasserstein`` against POT's
``ot.sliced_wasserstein_distance`` on the same projections (NumPy and torch backends of
POT), and scores every estimator by the same error: |SW_2 estimate - reference|, where the
reference is plain Monte Carlo with 10^5 projections.

Part 2 measures, over 200 seeds (the same directions for the three estimators of a seed),
the spread of the SW_2^2 estimate for plain Monte Carlo and the lower / upper Gaussian
control variates (Nguyen & Ho, ICLR 2024), on Gaussian pairs and point-cloud pairs, plus
the variance of the gradient in the points and the time per call.

Run: python benchmarks/bench_sliced.py [--quick] [--out DIR]
(writes DIR/sliced.md, default benchmarks/results; --quick runs a reduced grid and writes
nothing unless --out is given). One thread, float64 throughout.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from entrokit.bench.common import Table, fmt_time, write_results  # noqa: E402
from entrokit.losses.sliced import random_projections, sliced_wasserstein  # noqa: E402

torch.set_num_threads(1)
D = torch.float64
REF_PROJECTIONS = 100_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_sw2(x, y, *, n_proj=REF_PROJECTIONS, chunk=1000, seed=12345):
    """Plain Monte Carlo SW_2^2 with ``n_proj`` directions, in chunks; returns (value, s.e.)."""
    g = gen(seed)
    means = []
    with torch.no_grad():
        for _ in range(n_proj // chunk):
            th = random_projections(chunk, x.shape[-1], generator=g, dtype=D)
            means.append(float(sliced_wasserstein(x, y, projections=th)) ** 2)
    m = statistics.fmean(means)
    se = statistics.stdev(means) / math.sqrt(len(means))
    return m, se


def clock(fn, *args, repeats=1, **kwargs):
    """Median wall time of ``repeats`` calls ``fn(*args, **kwargs)`` and the last result as float."""
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), float(out)


# --------------------------------------------------------------------------- part 1


def part_speed(quick: bool) -> Table:
    import ot

    ns = [1000] if quick else [1000, 10_000]
    ds = [3, 64]
    Ls = [50, 500]
    n_ref = 10_000 if quick else REF_PROJECTIONS
    tab = Table(
        "SW_2 on equal projections: time (median over seeds) and error vs a reference",
        [
            "n", "d", "L", "entrokit", "POT numpy", "POT torch", "ratio ek/POT np", "ratio ek/POT torch",
            "max abs(ek - POT)", "err plain (ek)", "err plain (POT)", "err LCV (ek)", "err UCV (ek)",
            "LCV time / plain", "UCV time / plain",
        ],
    )
    for n in ns:
        for d in ds:
            g = gen(n + d)
            x = torch.randn(n, d, generator=g, dtype=D)
            y = torch.randn(n, d, generator=g, dtype=D) * 1.5 + 0.5
            ref2, ref_se = reference_sw2(x, y, n_proj=n_ref)
            ref = math.sqrt(ref2)
            for L in Ls:
                R = 10 if n <= 1000 else 5
                t_ek, t_pot, t_l, t_u, gap = [], [], [], [], 0.0
                err = {"ek": [], "pot": [], "lower": [], "upper": []}
                xn, yn = x.numpy(), y.numpy()
                for r in range(R):
                    th = random_projections(L, d, generator=gen(1000 + r), dtype=D)
                    thn = np.ascontiguousarray(th.T.numpy())
                    t, v_ek = clock(sliced_wasserstein, x, y, projections=th)
                    t_ek.append(t)
                    t, v_l = clock(sliced_wasserstein, x, y, projections=th, control_variate="lower")
                    t_l.append(t)
                    t, v_u = clock(sliced_wasserstein, x, y, projections=th, control_variate="upper")
                    t_u.append(t)
                    t, v_pot = clock(ot.sliced_wasserstein_distance, xn, yn, projections=thn, p=2)
                    t_pot.append(t)
                    gap = max(gap, abs(v_ek - v_pot))
                    err["ek"].append(abs(v_ek - ref))
                    err["pot"].append(abs(v_pot - ref))
                    err["lower"].append(abs(v_l - ref))
                    err["upper"].append(abs(v_u - ref))
                th = random_projections(L, d, generator=gen(999), dtype=D)
                t_pt, _ = clock(ot.sliced_wasserstein_distance, x, y, projections=th.T, p=2, repeats=3)
                te, tp = statistics.median(t_ek), statistics.median(t_pot)
                me = {k: statistics.fmean(v) for k, v in err.items()}
                tab.add(
                    n, d, L, fmt_time(te), fmt_time(tp), fmt_time(t_pt), f"{te / tp:.2f}", f"{te / t_pt:.2f}",
                    f"{gap:.1e}", f"{me['ek']:.2e}", f"{me['pot']:.2e}", f"{me['lower']:.2e}", f"{me['upper']:.2e}",
                    f"{statistics.median(t_l) / te:.2f}", f"{statistics.median(t_u) / te:.2f}",
                )
                print(tab.rows[-1], f"ref={ref:.6f} (s.e. of SW_2^2 {ref_se:.1e})", flush=True)
    tab.notes += [
        "x ~ N(0, I_d), y ~ N(0.5, 1.5^2 I_d), n = m points, uniform weights, float64, one thread; the "
        "same directions (rows of a seeded draw) go to entrokit and POT (as POT's (d, L) matrix).",
        "time: median over the error seeds (10 for n = 1000, 5 for n = 10000); 'POT torch' is POT's "
        "torch backend on the same tensors (median of 3).",
        f"err: mean over those seeds of |SW_2 estimate - reference|, reference = plain Monte Carlo with "
        f"{n_ref} directions (its own standard error is about the error at L divided by sqrt({n_ref}/L)).",
        "LCV / UCV: entrokit's lower / upper control variates on the same directions.",
    ]
    return tab


# --------------------------------------------------------------------------- part 2


def two_moons(n, g):
    t = torch.rand(n, generator=g, dtype=D) * math.pi
    top = torch.rand(n, generator=g) < 0.5
    pts = torch.where(
        top.unsqueeze(-1), torch.stack([t.cos(), t.sin()], -1), torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)
    )
    return pts + 0.05 * torch.randn(n, 2, generator=g, dtype=D)


def ring(n, g, radius=2.0, center=(3.0, 1.0)):
    t = torch.rand(n, generator=g, dtype=D) * 2 * math.pi
    pts = radius * torch.stack([t.cos(), t.sin()], -1) + torch.tensor(center, dtype=D)
    return pts + 0.05 * torch.randn(n, 2, generator=g, dtype=D)


def gaussian_mixture(n, d, centers, g):
    k = centers.shape[0]
    idx = torch.randint(k, (n,), generator=g)
    return centers[idx] + torch.randn(n, d, generator=g, dtype=D)


def pairs(quick: bool):
    g = gen(2024)
    d = 10
    scales = torch.linspace(0.5, 2.0, d, dtype=D)
    out = {
        "Gaussians, d=10, n=m=1000 (x ~ N(0, diag(0.5..2)^2), y ~ N(1, 0.5^2 I))": (
            torch.randn(1000, d, generator=g, dtype=D) * scales,
            torch.randn(1000, d, generator=g, dtype=D) * 0.5 + 1.0,
        ),
        "Gaussians, d=10, n=m=1000 (x ~ N(0, I), y ~ N(0.3, 1.5^2 I))": (
            torch.randn(1000, d, generator=g, dtype=D),
            torch.randn(1000, d, generator=g, dtype=D) * 1.5 + 0.3,
        ),
        "Gaussian mixtures, d=64, n=m=1024 (4 + 4 components, unit covariance)": (
            gaussian_mixture(1024, 64, 3 * torch.randn(4, 64, generator=g, dtype=D), g),
            gaussian_mixture(1024, 64, 3 * torch.randn(4, 64, generator=g, dtype=D), g),
        ),
        "point clouds, 2-D, two moons (n=1000) vs ring (m=800)": (two_moons(1000, g), ring(800, g)),
    }
    if quick:
        out = dict(list(out.items())[::2])
    return out


def part_variance(quick: bool) -> tuple[Table, Table]:
    R = 50 if quick else 200
    Ls = [10] if quick else [10, 100]
    n_ref = 10_000 if quick else REF_PROJECTIONS
    cvs = [None, "lower", "upper"]
    tab = Table(
        f"Spread of the SW_2^2 estimate over {R} seeds (same directions for the three estimators)",
        ["pair", "L", "reference SW_2^2", "std plain", "std LCV", "std UCV", "var plain / var LCV",
         "var plain / var UCV", "RMSE plain", "RMSE LCV", "RMSE UCV", "time plain", "LCV / plain", "UCV / plain"],
    )
    gtab = Table(
        f"Variance of the gradient of SW_2^2 in the points over {R} seeds (sum over coordinates)",
        ["pair", "L", "total var plain", "var plain / var LCV", "var plain / var UCV"],
    )
    for name, (x, y) in pairs(quick).items():
        d = x.shape[-1]
        ref2, ref_se = reference_sw2(x, y, n_proj=n_ref)
        for L in Ls:
            th = random_projections(R * L, d, generator=gen(7 + L), dtype=D).reshape(R, L, d)
            z = {cv: sliced_wasserstein(x, y, projections=th, control_variate=cv) ** 2 for cv in cvs}
            std = {cv: float(v.std()) for cv, v in z.items()}
            rmse = {cv: float(((v - ref2) ** 2).mean().sqrt()) for cv, v in z.items()}
            # blocks of k calls (>= ~50 ms each), 15 rounds interleaved so that load on a shared
            # machine hits the three estimators alike
            t1, _ = clock(sliced_wasserstein, x, y, projections=th[0], repeats=3)
            k = max(1, math.ceil(0.05 / t1))
            ts = {cv: [] for cv in cvs}
            for _ in range(15):
                for cv in cvs:
                    t = time.perf_counter()
                    for _ in range(k):
                        sliced_wasserstein(x, y, projections=th[0], control_variate=cv)
                    ts[cv].append((time.perf_counter() - t) / k)
            times = {cv: statistics.median(v) for cv, v in ts.items()}
            tab.add(
                name, L, f"{ref2:.5g} (s.e. {ref_se:.1e})", f"{std[None]:.3e}", f"{std['lower']:.3e}",
                f"{std['upper']:.3e}", f"{(std[None] / std['lower']) ** 2:.2f}", f"{(std[None] / std['upper']) ** 2:.2f}",
                f"{rmse[None]:.2e}", f"{rmse['lower']:.2e}", f"{rmse['upper']:.2e}", fmt_time(times[None]),
                f"{times['lower'] / times[None]:.2f}", f"{times['upper'] / times[None]:.2f}",
            )
            print(tab.rows[-1], flush=True)
            if L == Ls[0]:
                gv = {}
                for cv in cvs:
                    grads = []
                    for r in range(R):
                        xr = x.clone().requires_grad_()
                        (sliced_wasserstein(xr, y, projections=th[r], control_variate=cv) ** 2).backward()
                        grads.append(xr.grad)
                    gv[cv] = float(torch.stack(grads).var(0).sum())
                gtab.add(name, L, f"{gv[None]:.3e}", f"{gv[None] / gv['lower']:.2f}", f"{gv[None] / gv['upper']:.2f}")
                print(gtab.rows[-1], flush=True)
    tab.notes += [
        "std: standard deviation over seeds of the SW_2^2 estimate (the quantity the control variates "
        "target; the returned SW_2 is its square root). var ratios > 1 mean the control variate reduces "
        "the variance.",
        f"RMSE: root mean square of (estimate - reference) over the seeds; reference = plain Monte Carlo "
        f"with {n_ref} directions (s.e. = its standard error).",
        "time per call: median over 15 interleaved rounds of blocks of calls (>= 50 ms per block) on one "
        "seed's directions (forward only, value checks on); "
        "the control variates add "
        "O(L (n + m)) work to the O(L (n + m) d) projections and the sorts.",
    ]
    gtab.notes += [
        "gradient of the SW_2^2 estimate with respect to x (autograd through the sort and, for the "
        "control variates, through alpha as in the reference code); total variance = sum over the n*d "
        "coordinates of the variance over seeds.",
    ]
    return tab, gtab


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid; writes nothing unless --out")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    import ot

    t0 = time.perf_counter()
    tables = [part_speed(args.quick), *part_variance(args.quick)]
    tables[0].notes.append(f"POT {ot.__version__}; total run time of this benchmark {time.perf_counter() - t0:.0f} s.")
    for t in tables:
        print()
        print(t.render())
    out = args.out if args.out is not None else (None if args.quick else str(Path(__file__).resolve().parent / "results"))
    path = write_results("sliced", tables, out)
    if path is not None:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
