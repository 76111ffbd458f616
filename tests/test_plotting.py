"""entrokit.plotting: the demo figure answers "which solver at which eps" and labels everything."""

import pytest

import entrokit
from entrokit.data import digit_density, grid_cost
from entrokit.plotting import FIGURE_STYLE, plot_demo

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def demo_runs():
    size = 8
    a, b, C = digit_density(0, size), digit_density(1, size), grid_cost(size, 2)
    runs = []
    for eps in (1e-1, 1e-2):
        for method, seconds in (("sinkhorn", 0.05), ("sns", 0.2), ("ssns", 0.01)):
            res = entrokit.solve(a, b, C, eps=eps, method=method)
            runs.append((eps, method, res, seconds * (1 if eps == 1e-1 else 3)))
    return runs, a, b, size


def _texts(fig):
    out = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()]
        leg = ax.get_legend()
        if leg is not None:
            out += [leg.get_title(), *leg.get_texts()]
    return [t for t in out if t.get_text()]


def test_demo_figure_shows_time_to_tol_per_solver_and_eps(demo_runs):
    runs, a, b, size = demo_runs
    fig = plot_demo(runs, a, b, size, tol=1e-6)
    texts = _texts(fig)
    strings = [t.get_text() for t in texts]
    # no "W2" for a transport cost on a normalised cost; the axis says what is measured
    assert not any("W2" in s for s in strings)
    assert any("time to L1 marginal error <= 1e-06" in s for s in strings)
    assert {"eps = 0.1", "eps = 0.01"} <= set(strings)
    # every colour bar has a label
    cbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert cbar and all(ax.yaxis.label.get_text().startswith("log10 P_ij") for ax in cbar)
    # one "fastest" per eps, on the smallest time: ssns here (0.01 s and 0.03 s)
    fastest = [s for s in strings if s.startswith("fastest:")]
    assert len(fastest) == 2 and all("Newton step" in s for s in fastest)
    # a Newton step is not counted as a Sinkhorn sweep
    bars = [s for s in strings if " ms, " in s]
    assert all(("Sinkhorn sweep" in s) != ("Newton step" in s) for s in bars) and len(bars) == 6
    # every text at least 9 pt (FIGURE_STYLE)
    assert min(t.get_fontsize() for t in texts) >= min(FIGURE_STYLE.values())


def test_a_run_that_missed_tol_is_marked(demo_runs):
    runs, a, b, size = demo_runs
    a_, b_, C = digit_density(0, size), digit_density(1, size), grid_cost(size, 2)
    with pytest.warns(entrokit.ConvergenceWarning):
        bad = entrokit.solve(a_, b_, C, eps=1e-2, method="sinkhorn", max_iter=3)
    runs = [r if (r[0], r[1]) != (1e-2, "sinkhorn") else (1e-2, "sinkhorn", bad, 0.001) for r in runs]
    strings = [t.get_text() for t in _texts(plot_demo(runs, a, b, size))]
    missed = [s for s in strings if "missed tol" in s]
    assert len(missed) == 1 and "3 Sinkhorn sweeps" in missed[0]
    # the fastest marker goes to a run that met tol, not to the faster failed one
    assert not any(s.startswith("fastest:") and "missed" in s for s in strings)
