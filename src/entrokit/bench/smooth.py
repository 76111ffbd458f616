"""Benchmark: quadratic and sparsity-constrained OT vs POT (``ot.smooth``) and RegOT.

Problem: ``n`` source points uniform in [0, 1]^2, ``n`` target points uniform in
[0.5, 1.5]^2, squared Euclidean cost divided by its maximum, uniform weights; objective
:math:`\\langle C,T\\rangle + \\frac\\gamma2\\|T\\|^2` (the convention of all three
libraries: POT ``reg=gamma``, RegOT ``reg=gamma``). Every run is timed once in a child
process with a wall-clock budget; the marginal error
:math:`\\|T1-a\\|_1 + \\|T^\\top 1-b\\|_1`, the objective and the largest column
cardinality are recomputed here from each returned plan.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["run", "make_problem_np"]


def make_problem_np(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2))
    y = rng.random((n, 2)) + 0.5
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    C /= C.max()
    a = np.full(n, 1.0 / n)
    return a, a.copy(), C


def _solve(lib, method, n, gamma, k, q):
    torch.set_num_threads(int(os.environ.get("ENTROKIT_BENCH_THREADS", torch.get_num_threads())))
    warnings.simplefilter("ignore")
    sys.stdout = open(os.devnull, "w")  # POT's sparse projection prints debug shapes
    a, b, C = make_problem_np(n)
    t0 = time.perf_counter()
    if lib == "entrokit":
        import entrokit

        form, solver = method.split("/")
        reg = "topk" if k else "l2"
        r = entrokit.smooth_ot(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(C), reg=reg, k=k,
                               gamma=gamma, formulation=form, solver=solver, tol=1e-6)
        T = r.plan.to_dense().numpy()
    elif lib == "POT":
        import ot

        fn = ot.smooth.smooth_ot_dual if method == "dual" else ot.smooth.smooth_ot_semi_dual
        rt = "sparsity_constrained" if k else "l2"
        T = fn(a, b, C, gamma, reg_type=rt, max_nz=k)
    else:
        import regot

        fn = getattr(regot, method)
        T = fn(np.asfortranarray(C), a, b, gamma, tol=1e-9, max_iter=10000).plan
    dt = time.perf_counter() - t0
    merr = float(np.abs(T.sum(1) - a).sum() + np.abs(T.sum(0) - b).sum())
    obj = float((T * C).sum() + 0.5 * gamma * (T * T).sum())
    q.put((dt, merr, obj, int((T > 0).sum(0).max())))


def _timed(lib, method, n, gamma, k, budget):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_solve, args=(lib, method, n, gamma, k, q))
    p.start()
    try:
        res = q.get(timeout=budget)
    except Exception:
        res = None
    p.join(1.0)
    if p.is_alive():
        p.kill()
        p.join()
    return res


def _machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, Python {sys.version.split()[0]}")


def run(quick: bool = False, budget: float = 60.0, out: str | None = "benchmarks/results/smooth.md"):
    """Run the suite; print a text table and write a markdown table to ``out``."""
    sizes = [300] if quick else [300, 1000, 3000]
    gammas = [1e-1, 1e-2]
    cases = [
        ("entrokit", "dual/newton", None), ("entrokit", "semi_dual/newton", None),
        ("POT", "dual", None), ("POT", "semi_dual", None),
        ("RegOT", "qrot_grssn", None), ("RegOT", "qrot_lbfgs_dual", None), ("RegOT", "qrot_lbfgs_semi_dual", None),
        ("entrokit", "semi_dual/lbfgs", 2), ("entrokit", "dual/lbfgs", 2),
        ("POT", "dual", 2), ("POT", "semi_dual", 2),
    ]
    rows = []
    for n in sizes:
        for gamma in gammas:
            for lib, method, k in cases:
                res = _timed(lib, method, n, gamma, k, budget)
                reg = f"topk k={k}" if k else "l2"
                if res is None:
                    row = (n, gamma, reg, lib, method, f"> {budget:g}", "-", "-", "-")
                else:
                    dt, merr, obj, mx = res
                    row = (n, gamma, reg, lib, method, f"{dt:.3f}", f"{merr:.2e}", f"{obj:.8f}", str(mx))
                rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)
    head = ("n", "gamma", "reg", "library", "method", "time [s]", "marginal err (L1)", "objective", "max nnz/col")
    md = [f"Machine: {_machine()}; threads: {os.environ.get('ENTROKIT_BENCH_THREADS', torch.get_num_threads())}; "
          f"budget {budget:g} s per run; one run each.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(md)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return rows


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
