"""The float64 marginal error that float32 potentials leave, against
``u (max C - min C) / eps`` (the provenance of ``entrokit.solvers.multiscale.ROUNDING_FLOOR``).

For each cloud, the online warm start of ``sinkhorn`` (``online_warm_start``) runs far past
its float32 floor (tol 1e-9, at most 200 fine iterations: where these do not reach it, at
the smaller eps in d = 3, the ratio is larger); its potentials' plan is then
recomputed in float64 on the points' float64 cost, rounded to float32, and its L1 marginal
error divided by ``u (max C - min C) / eps`` (u the float32 unit roundoff). ``sinkhorn``
tries the certificate of a start only where ``tol >= ROUNDING_FLOOR`` times that (times
the mass): the smallest ratio printed here must stay above the constant. Deterministic (seeded), no
timing; forms the n x m cost, so n stays in the thousands.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/rounding_floor.py [--n 300 1000 3000]
"""

from __future__ import annotations

import argparse

import torch

import entrokit
from entrokit import PointCloud
from entrokit.bench.common import machine_info
from entrokit.solvers.multiscale import ROUNDING_FLOOR, online_warm_start


def floor_ratio(n: int, seed: int, gaussian: bool, eps: float, d: int = 2) -> tuple[float, float]:
    """``(error, error / (u range / eps))`` of a start run to its floor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen)
    y = torch.randn(n, d, generator=gen) * 0.3 + 0.5 if gaussian else torch.rand(n, d, generator=gen)
    a = torch.full((n,), 1.0 / n)
    geom = PointCloud(x, y, online=True)
    start = online_warm_start(entrokit.problem.make_problem(a, a, geom).with_batch(), eps, 1e-9, max_iter=200)
    lo, hi = geom.cost_bounds()
    C = torch.cdist(x.double(), y.double()) ** 2
    P = (a.double()[:, None] * a.double()) * torch.exp((start.f.double().T + start.g.double() - C) / eps)
    P = P.float().double()
    err = float((P.sum(1) - a.double()).abs().sum() + (P.sum(0) - a.double()).abs().sum())
    return err, err / (torch.finfo(torch.float32).eps * float(hi - lo) / eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[300, 1000, 3000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_info())
    print(f"ROUNDING_FLOOR = {ROUNDING_FLOOR}\n")
    print("| n | d | clouds | eps | seed | L1 error | error / (u range / eps) |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for n in args.n:
        for d in (2, 3):
            for gaussian in (False, True):
                for eps in (1e-2, 3e-3):
                    for seed in (0, 1):
                        err, ratio = floor_ratio(n, seed, gaussian, eps, d)
                        ratios.append(ratio)
                        kind = "uniform / Gaussian" if gaussian else "uniform / uniform"
                        print(f"| {n} | {d} | {kind} | {eps:g} | {seed} | {err:.2e} | {ratio:.3f} |", flush=True)
    print(f"\nsmallest ratio {min(ratios):.3f}, largest {max(ratios):.3f}")


if __name__ == "__main__":
    main()
