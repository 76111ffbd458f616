"""Quadratic and k-sparse OT plans in 1-D
======================================

1-D two-Gaussian problem (100 bins): exact LP, quadratic OT and k-sparse plans.

Run: python examples/sparse_ot_1d.py [--out examples/out/sparse_ot_1d.png]
"""

import argparse
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linprog

import entrokit


def gauss(n, mean, std):
    x = np.arange(n, dtype=np.float64)
    h = np.exp(-((x - mean) ** 2) / (2 * std**2))
    return h / h.sum()


def exact_lp(a, b, C):
    n, m = C.shape
    A = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    # drop one (redundant) marginal constraint so rounding cannot make the LP infeasible
    r = linprog(C.ravel(), A_eq=A[:-1], b_eq=np.concatenate([a, b])[:-1], bounds=(0, None), method="highs")
    if r.x is None:
        raise RuntimeError(f"linprog failed: {r.message}")
    return r.x.reshape(n, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/out/sparse_ot_1d.png")
    ap.add_argument("--gamma", type=float, default=0.1)
    args = ap.parse_args()
    n = 100
    a, b = gauss(n, 20, 5), gauss(n, 60, 10)
    x = np.arange(n, dtype=np.float64)
    C = (x[:, None] - x[None, :]) ** 2
    C /= C.max()
    t0 = time.perf_counter()
    P_lp = exact_lp(a, b, C)
    rows = [("exact LP", P_lp, time.perf_counter() - t0, None)]
    at, bt, Ct = (torch.from_numpy(v) for v in (a, b, C))
    specs = [("quadratic", dict(reg="l2"))] + [(f"top-k, k={k}", dict(reg="topk", k=k)) for k in (1, 2, 5, 100)]
    for name, kw in specs:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", entrokit.ConvergenceWarning)
            t0 = time.perf_counter()
            r = entrokit.smooth_ot(at, bt, Ct, gamma=args.gamma, **kw)  # dual (l2), semi-dual (top-k)
            dt = time.perf_counter() - t0
        rows.append((name, r.plan.to_dense().numpy(), dt, float(r.marginal_error)))
    print(f"gamma = {args.gamma}  (cost normalised by its max)")
    print(f"{'plan':<14}{'<C,T>':>12}{'nnz':>7}{'max nnz/col':>13}{'marg. err':>11}{'time [s]':>10}")
    for name, P, dt, merr in rows:
        merr = float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())
        nz = P > 1e-14 if name == "exact LP" else P > 0
        print(f"{name:<14}{(P * C).sum():>12.6f}{int(nz.sum()):>7}{int(nz.sum(0).max()):>13}{merr:>11.2e}{dt:>10.2f}")
    fig, axes = plt.subplots(1, len(rows), figsize=(3.0 * len(rows), 3.2))
    for ax, (name, P, _, _) in zip(axes, rows):
        ax.imshow(P[15:45, 20:100] > (1e-14 if name == "exact LP" else 0), cmap="Greys", aspect="auto",
                  extent=(20, 100, 45, 15), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("target bin")
    axes[0].set_ylabel("source bin")
    fig.suptitle(f"Support of the plans, two Gaussians on 100 bins, gamma={args.gamma}", fontsize=11)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("saved", args.out)


if __name__ == "__main__":
    main()
