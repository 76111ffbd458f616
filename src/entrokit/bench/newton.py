r"""Newton-accelerated Sinkhorn benchmark: the SNS paper's cases, against RegOT and POT.

Cases (Tang et al., ICLR 2024), each solved to L1 marginal error
:math:`\|P\mathbf 1-a\|_1 + \|P^\top\mathbf 1-b\|_1 \le 10^{-8}` in float64:

1. random assignment: :math:`C_{ij}\sim U[0,1]`, uniform weights, :math:`n = 500`;
2. W2 / W1 between two scikit-learn digits (``load_digits`` images 0 and 1, a "0" and a
   "1"), upsampled from 8x8 to 28x28 (bilinear), clipped at 0, normalised to unit mass,
   plus a floor of ``1e-6`` per pixel and renormalised (RegOT takes ``log a`` and needs
   positive weights; the floor moves 7.8e-4 of mass); the ground cost is the squared
   Euclidean (W2) or L1 (W1) distance on the pixel grid divided by its maximum;
3. an :math:`\varepsilon` sweep and :math:`n \in \{500, 1000, 2000\}` on case 1.

Every solver runs in a forked child process with a wall-clock budget (RegOT's C++ loop
cannot be interrupted otherwise); "> budget" marks runs that did not finish. Errors are
recomputed here from each returned plan with the same L1 formula. RegOT's ``reg`` is
our ``eps`` (its plan :math:`e^{(\alpha_i+\beta_j-M_{ij})/\text{reg}}` solves the same
problem); its ``tol`` bounds the L2 norm of its gradient (n+m-1 marginal residuals), so
we pass ``tol = 1e-8 / sqrt(n+m)``, which implies L1 error below 1e-8. POT's
``sinkhorn_log`` stops on the L2 column error checked every 10 iterations; we pass
``stopThr = 1e-8 / sqrt(m)`` as well. Times include each library's Python-call overhead.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["run", "cases", "main"]

TOL = 1e-8
D = torch.float64

try:  # the shared table helpers, when present
    from entrokit.bench.common import Table, machine_info
except ImportError:  # pragma: no cover - standalone fallback with the same interface

    class Table:  # type: ignore[no-redef]
        def __init__(self, title, columns, rows=None, notes=None):
            self.title, self.columns = title, list(columns)
            self.rows, self.notes = list(rows or []), list(notes or [])

        def add(self, *row):
            self.rows.append([str(x) for x in row])

        def render(self):
            widths = [len(c) for c in self.columns]
            for r in self.rows:
                widths = [max(w, len(x)) for w, x in zip(widths, r)]
            line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))
            out = [self.title, "=" * len(self.title), line, "-" * len(line)]
            out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in self.rows]
            return "\n".join(out + [f"  * {n}" for n in self.notes])

        def to_markdown(self):
            out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
            out.append("|" + "|".join("---" for _ in self.columns) + "|")
            out += ["| " + " | ".join(r) + " |" for r in self.rows]
            return "\n".join(out + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def machine_info():
        return (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        )


# -- problems -------------------------------------------------------------------------
def random_assignment(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, n, generator=g, dtype=D)
    a = torch.full((n,), 1.0 / n, dtype=D)
    return a, a.clone(), C


def digits_pair(p: int, floor: float = 1e-6):
    """Digits 0 and 1 of ``load_digits`` at 28x28; ``p=2``: squared Euclidean, ``p=1``: L1."""
    from sklearn.datasets import load_digits

    X = torch.as_tensor(load_digits().images[:2], dtype=D)  # (2, 8, 8)
    up = torch.nn.functional.interpolate(X[:, None], size=(28, 28), mode="bilinear", align_corners=False)
    w = up[:, 0].clamp_min(0).reshape(2, -1)
    w = w / w.sum(1, keepdim=True) + floor
    w = w / w.sum(1, keepdim=True)
    ii, jj = torch.meshgrid(torch.arange(28, dtype=D), torch.arange(28, dtype=D), indexing="ij")
    pts = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1)
    diff = pts[:, None, :] - pts[None, :, :]
    C = (diff**2).sum(-1) if p == 2 else diff.abs().sum(-1)
    return w[0].contiguous(), w[1].contiguous(), C / C.max()


def cases(quick: bool):
    """``(name, eps, builder)`` triples in the order they are reported."""
    eps_sweep = [1e-1, 1e-2, 1e-3, 1 / 1200, 1e-4]
    out = [("random n=500", 1 / 1200, lambda: random_assignment(500))]
    out.append(("digits W2", 1 / 1200, lambda: digits_pair(2)))
    out.append(("digits W1", 1 / 1200, lambda: digits_pair(1)))
    out.append(("random n=2000", 1e-3, lambda: random_assignment(2000)))
    if quick:
        return out
    for name, build in [
        ("random n=500", lambda: random_assignment(500)),
        ("digits W2", lambda: digits_pair(2)),
        ("digits W1", lambda: digits_pair(1)),
    ]:
        out += [(name, e, build) for e in eps_sweep if e != 1 / 1200]
    out.append(("random n=1000", 1 / 1200, lambda: random_assignment(1000)))
    out.append(("random n=2000", 1 / 1200, lambda: random_assignment(2000)))
    return out


# -- solvers (each returns plan, iterations, history) ----------------------------------
def _l1(P, a, b):
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())


def _entrokit(variant):
    def go(a, b, C, eps, budget):
        import entrokit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if variant == "sinkhorn":
                t = time.perf_counter()
                r = entrokit.sinkhorn(a, b, C, eps, tol=TOL, max_iter=10**8)
                t = time.perf_counter() - t
                err = r.errors.numpy()
                times = t * np.arange(1, len(err) + 1) / max(len(err), 1)
                hist = (np.arange(1, len(err) + 1), err, times)
            else:
                t = time.perf_counter()
                r = entrokit.sinkhorn_newton(a, b, C, eps, variant=variant, tol=TOL, time_limit=budget)
                t = time.perf_counter() - t
                err = np.asarray(r.info["marginal_error"])
                hist = (np.arange(1, len(err) + 1), err, np.asarray(r.info["time"]))
        extra = ""
        if variant != "sinkhorn":
            extra = f"{r.info['n_sinkhorn']}+{r.info['n_newton']}"
        return r.plan.numpy(), int(r.n_iter), t, hist, extra

    return go


def _regot(name):
    def go(a, b, C, eps, budget):
        import regot

        M = np.asfortranarray(C.numpy())
        an, bn = a.numpy(), b.numpy()
        n, m = M.shape
        t = time.perf_counter()
        r = getattr(regot, name)(M, an, bn, eps, tol=TOL / math.sqrt(n + m), max_iter=10**6)
        t = time.perf_counter() - t
        err = np.asarray(r.mar_errs)  # RegOT's own measure: L2 norm of its gradient
        hist = (np.arange(len(err)), err, np.asarray(r.run_times) / 1e3)
        return np.asarray(r.plan), int(r.niter), t, hist, ""

    return go


def _pot(a, b, C, eps, budget):
    import ot

    an, bn, M = a.numpy(), b.numpy(), C.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        P, log = ot.bregman.sinkhorn_log(
            an, bn, M, eps, numItermax=10**8, stopThr=TOL / math.sqrt(len(bn)), log=True
        )
        t = time.perf_counter() - t
    err = np.asarray(log["err"])  # L2 column error every 10 iterations
    it = int(log.get("niter", 10 * len(err)))
    hist = (10 * np.arange(len(err)), err, t * np.arange(len(err)) / max(len(err), 1))
    return P, it, t, hist, ""


SOLVERS: dict[str, Callable[..., Any]] = {
    "entrokit sinkhorn": _entrokit("sinkhorn"),
    "entrokit SNS": _entrokit("sns"),
    "entrokit SSNS": _entrokit("ssns"),
    "RegOT sinkhorn_ssns": _regot("sinkhorn_ssns"),
    "RegOT sinkhorn_sparse_newton": _regot("sinkhorn_sparse_newton"),
    "RegOT sinkhorn_splr": _regot("sinkhorn_splr"),
    "RegOT sinkhorn_bcd": _regot("sinkhorn_bcd"),
    "POT sinkhorn_log": _pot,
}


def _child(conn, fn, args):
    try:
        P, it, t, hist, extra = fn(*args)
        conn.send(("ok", _l1(P, args[0].numpy(), args[1].numpy()), it, t, hist, extra))
    except Exception as e:  # pragma: no cover - reported in the table
        conn.send(("error", repr(e)))
    conn.close()


def run_one(fn, a, b, C, eps, budget: float):
    """Run ``fn`` in a forked child with a hard wall-clock budget; ``None`` if over budget."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, (a, b, C, eps, budget)))
    proc.start()
    child.close()
    out = None
    if parent.poll(budget + 5.0):
        out = parent.recv()
    proc.join(0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if out is None or out[0] != "ok":
        return out
    return out


def run(quick: bool = True, budget: float | None = None, figure: str | None = None, results: str | None = None):
    """Run the benchmark; returns a list of tables (and writes the markdown and figure)."""
    budget = budget if budget is not None else (20.0 if quick else 60.0)
    table = Table(
        f"Newton-accelerated Sinkhorn to L1 marginal error {TOL:g} (float64, budget {budget:g} s)",
        ["case", "eps", "solver", "iterations", "Sinkhorn+Newton", "time", "final L1 error", "time / SSNS"],
    )
    curves: dict[str, Any] = {}
    summary: dict[tuple, dict] = {}
    for name, eps, build in cases(quick):
        a, b, C = build()
        rows = {}
        for sname, fn in SOLVERS.items():
            out = run_one(fn, a, b, C, eps, budget)
            if out is None:
                rows[sname] = None
            elif out[0] != "ok":
                rows[sname] = ("error", out[1])
            else:
                _, err, it, t, hist, extra = out
                ok = err <= TOL * (1 + 1e-6)
                rows[sname] = (it, t if ok else None, err, extra, t)
                if name == "random n=500" and abs(eps - 1 / 1200) < 1e-12:
                    curves[sname] = hist
            print(f"  {name} eps={eps:g} {sname}: {rows[sname] if rows[sname] is None else rows[sname][:4]}", flush=True)
        t_ssns = rows.get("entrokit SSNS")
        t_ssns = t_ssns[1] if t_ssns and t_ssns[0] != "error" else None
        for sname, r in rows.items():
            if r is None:
                table.add(name, f"{eps:g}", sname, "-", "", f"> {budget:g} s", "-", f"> {budget / t_ssns:.3g}" if t_ssns else "-")
            elif r[0] == "error":
                table.add(name, f"{eps:g}", sname, "error", "", "-", r[1][:40], "-")
            else:
                it, t, err, extra, traw = r
                tt = f"{traw:.3f} s" + ("" if t is not None else " (not converged)")
                ratio = f"{traw / t_ssns:.2f}" if t_ssns and t is not None else "-"
                table.add(name, f"{eps:g}", sname, it, extra, tt, f"{err:.1e}", ratio)
        summary[(name, eps)] = rows
    table.notes.append(f"machine: {machine_info()}")
    table.notes.append(
        "time / SSNS > 1 means entrokit SSNS is faster; '> x' bounds the ratio for runs over budget; "
        "iterations of RegOT/POT are their own counts (POT checks every 10)."
    )
    tables = [table]
    if figure is not None and curves:
        _plot(curves, figure)
    if results is not None:
        Path(results).mkdir(parents=True, exist_ok=True)
        md = "\n".join(t.to_markdown() for t in tables)
        (Path(results) / "newton.md").write_text(md)
    return tables


def _plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for sname, (its, err, times) in curves.items():
        err = np.maximum(np.asarray(err, dtype=float), 1e-16)
        style = "-" if sname.startswith("entrokit") else "--"
        axes[0].semilogy(its, err, style, label=sname)
        axes[1].loglog(np.maximum(times, 1e-4), err, style, label=sname)
    axes[0].set_xscale("linear")
    for ax, xl in zip(axes, ["iteration", "time (s)"]):
        ax.axhline(TOL, color="k", lw=0.6)
        ax.set_xlabel(xl)
        ax.set_ylabel("marginal error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Random assignment n=500, eps=1/1200, float64")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="all cases (eps sweep, n sweep)")
    p.add_argument("--budget", type=float, default=None, help="seconds per solver run")
    p.add_argument("--figure", default="examples/out/newton_convergence.png")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = run(quick=not args.full, budget=args.budget, figure=args.figure, results=args.results)
    for t in tables:
        print(t.render())
    return 0
