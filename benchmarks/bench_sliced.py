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
    """Medians of the wall and process CPU time of ``repeats`` calls ``fn(*args, **kwargs)``,
    and the last result as a float."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), float(out)


def value_and_grad(fn, x, y, **kwargs):
    """``fn(x, y, **kwargs)`` and its gradient with respect to ``x`` (what a loss user consumes)."""
    xr = x.detach().clone().requires_grad_()
    v = fn(xr, y, **kwargs)
    v.backward()
    value_and_grad.last_grad = xr.grad
    return v.detach()


# --------------------------------------------------------------------------- part 1

INSTANCES = 3
REPEATS = 3


def _instance(n: int, d: int, k: int):
    g = gen(1000 * k + n + d)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, d, generator=g, dtype=D) * 1.5 + 0.5
    return x, y


def _time(t):
    """``wall / CPU`` of a (wall, CPU) pair of medians."""
    return f"{fmt_time(t[0])} / {fmt_time(t[1])}"


def part_speed(quick: bool) -> Table:
    import ot

    ns = [1000] if quick else [1000, 10_000]
    ds = [3, 64]
    Ls = [50, 500]
    tab = Table(
        "SW_2 on equal projections: value, and value + gradient, time (wall / CPU, median over "
        f"{INSTANCES} instances of the median of {REPEATS} repeats) and error vs a reference",
        [
            "n", "d", "L", "entrokit", "POT numpy", "POT torch", "CPU ek/POT np", "CPU ek/POT torch",
            "entrokit value+grad", "POT torch value+grad", "CPU ek/POT torch (value+grad)",
            "max abs(ek - POT) value / grad", "err plain (ek)", "err plain (POT)", "err LCV (ek)", "err UCV (ek)",
            "LCV CPU / plain", "UCV CPU / plain",
        ],
    )
    for n in ns:
        n_ref = 10_000 if quick else (REF_PROJECTIONS if n <= 1000 else REF_PROJECTIONS // 5)
        for d in ds:
            for L in Ls:
                runs = {k: [] for k in ("ek", "lower", "upper", "pot", "pot_t", "ek_g", "pot_g")}
                err = {"ek": [], "pot": [], "lower": [], "upper": []}
                gap = ggap = 0.0
                for k in range(INSTANCES):
                    x, y = _instance(n, d, k)
                    ref = math.sqrt(reference_sw2(x, y, n_proj=n_ref)[0])
                    th = random_projections(L, d, generator=gen(1000 + k), dtype=D)
                    thn = np.ascontiguousarray(th.T.numpy())
                    xn, yn = x.numpy(), y.numpy()
                    # interleaved: every library in turn on this instance
                    *t, v_ek = clock(sliced_wasserstein, x, y, projections=th, repeats=REPEATS)
                    runs["ek"].append(t)
                    *t, v_l = clock(sliced_wasserstein, x, y, projections=th, control_variate="lower", repeats=REPEATS)
                    runs["lower"].append(t)
                    *t, v_u = clock(sliced_wasserstein, x, y, projections=th, control_variate="upper", repeats=REPEATS)
                    runs["upper"].append(t)
                    *t, v_pot = clock(ot.sliced_wasserstein_distance, xn, yn, projections=thn, p=2, repeats=REPEATS)
                    runs["pot"].append(t)
                    *t, _ = clock(ot.sliced_wasserstein_distance, x, y, projections=th.T, p=2, repeats=REPEATS)
                    runs["pot_t"].append(t)
                    *t, _ = clock(value_and_grad, sliced_wasserstein, x, y, projections=th, repeats=REPEATS)
                    runs["ek_g"].append(t)
                    g_ek = value_and_grad.last_grad
                    *t, _ = clock(value_and_grad, ot.sliced_wasserstein_distance, x, y, projections=th.T, p=2,
                                  repeats=REPEATS)
                    runs["pot_g"].append(t)
                    ggap = max(ggap, float((g_ek - value_and_grad.last_grad).abs().max()))
                    gap = max(gap, abs(v_ek - v_pot))
                    for key, v in (("ek", v_ek), ("pot", v_pot), ("lower", v_l), ("upper", v_u)):
                        err[key].append(abs(v - ref))
                med = {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                       for key, v in runs.items()}
                me = {key: statistics.fmean(v) for key, v in err.items()}
                cpu = {key: v[1] for key, v in med.items()}
                tab.add(
                    n, d, L, _time(med["ek"]), _time(med["pot"]), _time(med["pot_t"]),
                    f"{cpu['ek'] / cpu['pot']:.2f}", f"{cpu['ek'] / cpu['pot_t']:.2f}",
                    _time(med["ek_g"]), _time(med["pot_g"]), f"{cpu['ek_g'] / cpu['pot_g']:.2f}",
                    f"{gap:.1e} / {ggap:.1e}", f"{me['ek']:.2e}", f"{me['pot']:.2e}", f"{me['lower']:.2e}",
                    f"{me['upper']:.2e}", f"{cpu['lower'] / cpu['ek']:.2f}", f"{cpu['upper'] / cpu['ek']:.2f}",
                )
                print(tab.rows[-1], flush=True)
    tab.notes += [
        f"x ~ N(0, I_d), y ~ N(0.5, 1.5^2 I_d), n = m points, uniform weights, float64, one thread; "
        f"{INSTANCES} instances (seeded draws of x, y and of the L directions); the same directions go to "
        "entrokit and POT (as POT's (d, L) matrix). Every library runs on each instance in turn, "
        f"{REPEATS} repeats per call.",
        "POT numpy: its default backend on NumPy arrays (no gradient); POT torch: its torch backend on the "
        "same tensors, the configuration a PyTorch user with a loss would pick; value+grad: the value and "
        "its gradient in x by autograd (what a loss consumes). max abs(ek - POT): largest difference of "
        "the values (numpy) and of the gradients (torch) over the instances.",
        f"err: mean over the instances of |SW_2 estimate - reference|, reference = plain Monte Carlo with "
        f"{REF_PROJECTIONS} directions at n = 1000 and {REF_PROJECTIONS // 5} at n = 10000 (its own standard "
        "error is about the error at L divided by sqrt(directions / L)).",
        "LCV / UCV: entrokit's lower / upper control variates on the same directions (value only).",
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
         "var plain / var UCV", "RMSE plain", "RMSE LCV", "RMSE UCV", "time plain (wall / CPU)", "LCV CPU / plain",
         "UCV CPU / plain"],
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
            t1, _, _ = clock(sliced_wasserstein, x, y, projections=th[0], repeats=3)
            k = max(1, math.ceil(0.05 / t1))
            ts = {cv: [] for cv in cvs}
            cs = {cv: [] for cv in cvs}
            for _ in range(15):
                for cv in cvs:
                    t, c = time.perf_counter(), time.process_time()
                    for _ in range(k):
                        sliced_wasserstein(x, y, projections=th[0], control_variate=cv)
                    ts[cv].append((time.perf_counter() - t) / k)
                    cs[cv].append((time.process_time() - c) / k)
            times = {cv: statistics.median(v) for cv, v in ts.items()}
            cpus = {cv: statistics.median(v) for cv, v in cs.items()}
            tab.add(
                name, L, f"{ref2:.5g} (s.e. {ref_se:.1e})", f"{std[None]:.3e}", f"{std['lower']:.3e}",
                f"{std['upper']:.3e}", f"{(std[None] / std['lower']) ** 2:.2f}", f"{(std[None] / std['upper']) ** 2:.2f}",
                f"{rmse[None]:.2e}", f"{rmse['lower']:.2e}", f"{rmse['upper']:.2e}",
                f"{fmt_time(times[None])} / {fmt_time(cpus[None])}",
                f"{cpus['lower'] / cpus[None]:.2f}", f"{cpus['upper'] / cpus[None]:.2f}",
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
        "time per call: median over 15 interleaved rounds of blocks of calls (>= 50 ms per block) on the "
        "pair and one seed's directions, wall / process CPU; the ratios are of CPU time (forward only, "
        "value checks on); "
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

    t0, load0 = time.perf_counter(), os.getloadavg()
    tables = [part_speed(args.quick), *part_variance(args.quick)]
    load1 = os.getloadavg()
    tables[0].notes.append(f"POT {ot.__version__}; total run time of this benchmark {time.perf_counter() - t0:.0f} s; "
                           f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; command: "
                           "`OMP_NUM_THREADS=1 python benchmarks/bench_sliced.py`.")
    for t in tables:
        print()
        print(t.render())
    out = args.out if args.out is not None else (None if args.quick else str(Path(__file__).resolve().parent / "results"))
    path = write_results("sliced", tables, out)
    if path is not None:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
