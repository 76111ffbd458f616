"""Matplotlib figures shared by the command line and the examples.

Needs the ``cli`` extra (``pip install 'entrokit[cli]'``); matplotlib is imported inside
the functions. The figures are built with the object-oriented API
(:class:`matplotlib.figure.Figure`), so no backend is selected or switched: save them
with ``fig.savefig(path)``, or display them in a notebook.
"""

from __future__ import annotations

import numpy as np
import torch

from entrokit._optional import require

__all__ = [
    "plot_demo", "plot_solve", "plot_convergence", "plot_time_to_tol", "save_figure", "mean_ci95", "format_ci95",
    "figure_path", "FIGURE_STYLE",
]

# matplotlib rcParams of the examples' figures: every text at least 9 pt, titles a step larger
FIGURE_STYLE = {
    "font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9,
}


def _work_label(res) -> str:
    """The work of one solve in its own units: Sinkhorn sweeps, or Newton steps after a
    Sinkhorn warm-up (a Newton step costs a sparse linear solve, not one sweep)."""
    info = res.info.as_dict() if hasattr(res.info, "as_dict") else dict(res.info or {})
    if "n_newton" in info:
        steps, sweeps = int(info["n_newton"]), int(info.get("n_sinkhorn", 0))
        return _plural(steps, "Newton step") + (f" + {_plural(sweeps, 'sweep')}" if sweeps else "")
    return _plural(int(res.n_iter), "Sinkhorn sweep")


def _plural(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def plot_convergence(ax, runs, *, title="Convergence") -> None:
    """Marginal error per check against the solver's iterations, one curve per (eps,
    method); the x label says what an iteration is (a Sinkhorn sweep or, for the Newton
    solvers, a warm-up sweep then a Newton step)."""
    newton = False
    for eps, method, res in runs:
        err = res.errors.detach().cpu().numpy().reshape(-1)
        if err.size == 0:
            continue
        newton = newton or method in ("sns", "ssns")
        it = np.linspace(int(res.n_iter) / err.size, int(res.n_iter), err.size)
        ax.semilogy(it, np.maximum(err, 1e-17), label=f"{method}, eps={eps:g}")
    ax.set_xlabel("iteration (Sinkhorn sweeps, then Newton steps)" if newton else "Sinkhorn sweeps")
    ax.set_ylabel("L1 marginal error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=FIGURE_STYLE["legend.fontsize"])


def _figure(ncols: int, figsize: tuple[float, float], feature: str, width_ratios=None):
    Figure = require("matplotlib.figure", feature).Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, gridspec_kw={"width_ratios": width_ratios} if width_ratios else None)


def _seconds(run) -> float:
    """Wall time of a run ``(eps, method, res, seconds)``; 3-tuples use the solver's own timer."""
    if len(run) > 3:
        return float(run[3])
    info = run[2].info.as_dict() if hasattr(run[2].info, "as_dict") else dict(run[2].info or {})
    t = info.get("total_time", info.get("time", float("nan")))
    return float(t[-1] if isinstance(t, (list, tuple)) else t)


def _fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1.0 else f"{t:.3g} s"


def plot_time_to_tol(ax, runs, tol: float) -> None:
    """Grouped horizontal bars: wall time of every solver at every eps, on a log axis, each
    labelled with its work; the fastest converged solver of each eps is marked, a run that
    missed ``tol`` is hatched and says so. ``runs``: ``(eps, method, res[, seconds])``."""
    methods = list(dict.fromkeys(r[1] for r in runs))
    eps_list = sorted(dict.fromkeys(r[0] for r in runs), reverse=True)
    colors = {m: c for m, c in zip(methods, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])}
    h = 0.8 / len(methods)
    times = [_seconds(r) for r in runs]
    lo, hi = min(times), max(times)
    yticks, ylabels = [], []
    for gi, eps in enumerate(eps_list):
        group = [(r, t) for r, t in zip(runs, times) if r[0] == eps]
        ok = [t for r, t in group if bool(r[2].converged)]
        best = min(ok) if ok else None
        for r, t in group:
            k = methods.index(r[1])
            y = gi + (k - (len(methods) - 1) / 2) * h
            conv = bool(r[2].converged)
            ax.barh(y, t, height=h * 0.9, color=colors[r[1]], alpha=1.0 if conv else 0.35,
                    hatch=None if conv else "//", edgecolor="k" if t == best else colors[r[1]],
                    linewidth=1.5 if t == best else 0.5)
            text = f"{r[1]}: {_fmt_seconds(t)}, {_work_label(r[2])}"  # the label names the solver
            if not conv:
                text += f": missed tol (error {float(r[2].marginal_error):.1e})"
            elif t == best:
                text = "fastest: " + text
            ax.text(t * 1.15, y, text, va="center", fontsize=FIGURE_STYLE["legend.fontsize"],
                    fontweight="bold" if t == best else "normal")
        yticks.append(gi)
        ylabels.append(f"eps = {eps:g}")
    ax.set_xscale("log")
    ax.set_xlim(lo / 2, hi * 60)  # room for the labels on the right
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels)
    ax.set_ylim(len(eps_list) - 0.5, -0.5)  # largest eps on top
    ax.set_xlabel(f"wall time to L1 marginal error <= {tol:g} (s, log scale; shorter is better)")
    ax.set_title("Which solver at which eps? Time to tolerance")
    ax.grid(True, axis="x", which="major", alpha=0.3)


def plot_demo(runs, a: torch.Tensor, b: torch.Tensor, size: int, *, tol: float = 1e-6,
              cost: str = "squared Euclidean cost normalised to [0, 1]"):
    """The demo's figure: source and target densities, the time to ``tol`` of every
    solver at every eps (:func:`plot_time_to_tol`), and the plan at the smallest eps.
    ``runs``: ``(eps, method, result, seconds)`` per solve (seconds optional)."""
    mpl = require("matplotlib", "entrokit.plotting.plot_demo")
    with mpl.rc_context(FIGURE_STYLE):
        fig, axes = _figure(4, (18, 4.8), "entrokit.plotting.plot_demo", width_ratios=[1, 1, 3.2, 1.5])
        axes[0].imshow(a.reshape(size, size).numpy(), cmap="Greys")
        axes[0].set_title("source density")
        axes[1].imshow(b.reshape(size, size).numpy(), cmap="Greys")
        axes[1].set_title("target density")
        for ax in axes[:2]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{size} x {size} pixels")
        plot_time_to_tol(axes[2], runs, tol)
        # the plan at the smallest eps, from a solver that met tol there
        eps = min(r[0] for r in runs)
        at = [r for r in runs if r[0] == eps]
        eps, method, res = next((r for r in at if bool(r[2].converged)), at[0])[:3]
        P = res.plan.detach().numpy()
        keep_r, keep_c = a.numpy() > 0, b.numpy() > 0
        sub = P[np.ix_(keep_r, keep_c)]
        im = axes[3].imshow(np.log10(np.maximum(sub, 1e-12)), aspect="auto", cmap="magma", vmin=-12)
        axes[3].set_title(f"plan at eps={eps:g} ({method})")
        axes[3].set_xlabel(f"target pixel ({int(keep_c.sum())} with mass)")
        axes[3].set_ylabel(f"source pixel ({int(keep_r.sum())} with mass)")
        fig.colorbar(im, ax=axes[3], fraction=0.046, label="log10 P_ij (clipped at -12)")
        fig.suptitle(f"Entropic OT between two digits, {cost}", fontsize=FIGURE_STYLE["axes.titlesize"])
        fig.tight_layout()
    return fig


def plot_solve(res, x, y, a, b, shape_x=None, shape_y=None):
    """Measures, the barycentric matching (for 1-D/2-D points) and the convergence curve."""
    mpl = require("matplotlib", "entrokit.plotting.plot_solve")
    with mpl.rc_context(FIGURE_STYLE):
        return _plot_solve(res, x, y, a, b, shape_x, shape_y)


def _plot_solve(res, x, y, a, b, shape_x, shape_y):
    fig, axes = _figure(2, (11, 4.5), "entrokit.plotting.plot_solve")
    ax = axes[0]
    if shape_x is not None and shape_y is not None:
        ax.imshow(a.reshape(shape_x).numpy(), cmap="Greys")
        ax.set_title("source (target in the convergence panel legend)")
    elif x.shape[1] <= 2:
        X = x.numpy() if x.shape[1] == 2 else np.c_[x.numpy(), np.zeros(len(x))]
        Y = y.numpy() if y.shape[1] == 2 else np.c_[y.numpy(), np.ones(len(y))]
        ax.scatter(X[:, 0], X[:, 1], s=400 * a.numpy() * len(a) / 10, c="tab:blue", label="source")
        ax.scatter(Y[:, 0], Y[:, 1], s=400 * b.numpy() * len(b) / 10, c="tab:orange", label="target")
        if len(x) * len(y) <= 1 << 22:
            P = res.plan.detach().numpy()
            T = (P @ Y) / np.maximum(P.sum(1, keepdims=True), 1e-300)
            for i in range(0, len(X), max(1, len(X) // 200)):
                ax.plot([X[i, 0], T[i, 0]], [X[i, 1], T[i, 1]], c="k", lw=0.5, alpha=0.6)
        ax.legend()
        ax.set_title("measures and barycentric map")
    else:
        ax.text(0.5, 0.5, f"{x.shape[1]}-D points", ha="center")
    plot_convergence(axes[1], [(res.eps, res.method, res)])
    fig.tight_layout()
    return fig


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` (creating its folder) and say where."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")


def figure_path(out: str, name: str) -> str:
    """``out`` itself, or ``out/name`` when ``out`` is a folder (an existing one, or a path
    ending in a separator): where an example's ``--out`` puts its figure."""
    import os

    return os.path.join(out, name) if out.endswith(os.sep) or os.path.isdir(out) else out


def format_ci95(values, digits: int = 3, width: int = 0) -> str:
    """``"mean ± half-width"`` of :func:`mean_ci95` (``width`` pads the mean; the
    half-width gets one less, for aligned columns)."""
    m, h = mean_ci95(values)
    return f"{m:{width}.{digits}f} ± {h:{max(width - 1, 0)}.{digits}f}"


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % Student-t interval over seeds (NaN for
    fewer than two values)."""
    import math

    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))

