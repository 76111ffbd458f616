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
    "plot_demo", "plot_solve", "plot_convergence", "save_figure", "mean_ci95", "format_ci95",
    "figure_path", "FIGURE_STYLE",
]

# matplotlib rcParams of the examples' figures: every text at least 9 pt, titles a step larger
FIGURE_STYLE = {
    "font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9,
}


def plot_convergence(ax, runs, *, title="Convergence") -> None:
    """Marginal error per check against iterations, one curve per (eps, method)."""
    for eps, method, res in runs:
        err = res.errors.detach().cpu().numpy().reshape(-1)
        if err.size == 0:
            continue
        it = np.linspace(int(res.n_iter) / err.size, int(res.n_iter), err.size)
        ax.semilogy(it, np.maximum(err, 1e-17), label=f"{method}, eps={eps:g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("L1 marginal error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _figure(ncols: int, figsize: tuple[float, float], feature: str):
    Figure = require("matplotlib.figure", feature).Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def plot_demo(runs, a: torch.Tensor, b: torch.Tensor, size: int):
    """Source, target, convergence curves, and the plan at the smallest eps."""
    fig, axes = _figure(4, (17, 4.2), "entrokit.plotting.plot_demo")
    axes[0].imshow(a.reshape(size, size).numpy(), cmap="Greys")
    axes[0].set_title("source density")
    axes[1].imshow(b.reshape(size, size).numpy(), cmap="Greys")
    axes[1].set_title("target density")
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    plot_convergence(axes[2], runs)
    eps, method, res = min(runs, key=lambda r: r[0])
    P = res.plan.detach().numpy()
    keep_r, keep_c = a.numpy() > 0, b.numpy() > 0
    sub = P[np.ix_(keep_r, keep_c)]
    im = axes[3].imshow(np.log10(np.maximum(sub, 1e-12)), aspect="auto", cmap="magma", vmin=-12)
    axes[3].set_title(f"plan ({method}, eps={eps:g}), log10, support only")
    axes[3].set_xlabel("target pixel")
    axes[3].set_ylabel("source pixel")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    fig.tight_layout()
    return fig


def plot_solve(res, x, y, a, b, shape_x=None, shape_y=None):
    """Measures, the barycentric matching (for 1-D/2-D points) and the convergence curve."""
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

