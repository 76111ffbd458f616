"""Multi-seed studies on the toy tasks: run arms paired by seed, summarise with 95 %
intervals, fit the entropy-performance law, and draw the reproductions' figures.

Used by the ``examples/rl_*.py`` reproductions. Arms of one seed share the policy's initial
weights and the first rollout's random stream, so differences between arms are paired.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from entrokit.rl.toy.loop import GRUPolicy, Objective, evaluate, train_grpo

__all__ = [
    "Arm", "run_arm", "run_study", "run_or_load", "study_parser", "apply_quick", "print_table", "print_paired", "fit_entropy_law", "paired_diff",
    "plot_entropy_bands", "plot_metric_bars", "tune_arms", "print_tuning", "study_figure", "save_study_figure",
]


@dataclass
class Arm:
    """One method of a study: ``make(generator) -> objective`` builds a fresh objective (and
    its controller) for each seed. ``train`` overrides :func:`train_grpo`'s keywords."""

    name: str
    label: str
    make: Callable[[torch.Generator], Objective]
    color: str = "tab:gray"
    train: dict[str, Any] = field(default_factory=dict)


def _num_inputs(task: Any) -> int:
    return getattr(task, "num_observations", None) or task.vocab_size + 1


def run_arm(task: Any, arm: Arm, seed: int, *, steps: int, hidden: int = 128, eval_every: int = 10,
            eval_samples: int = 16, final_samples: int = 128, k: int = 64,
            init_policy: Callable[[GRUPolicy], None] | None = None,
            measure: Callable[[GRUPolicy, int], dict[str, float]] | None = None, **train: Any) -> dict[str, Any]:
    """Train one arm on one seed; returns ``init`` and ``final`` (:func:`evaluate` with
    ``final_samples`` per prompt), ``history`` (per step) and ``checkpoints`` (``eval_every``
    steps, pass@1 and entropy from ``eval_samples`` per prompt). ``init_policy`` edits the
    fresh policy in place (e.g. a prior against noise tokens) before anything runs;
    ``measure(policy, seed)`` adds its metrics to ``final`` after training."""
    policy = GRUPolicy(task.num_prompts, _num_inputs(task), task.vocab_size, hidden, seed=seed)
    if init_policy is not None:
        init_policy(policy)
    g = torch.Generator().manual_seed(seed)
    g_eval = torch.Generator().manual_seed(10**6 + seed)
    init = evaluate(policy, task, samples=final_samples, k=k, generator=g_eval)
    checkpoints = [{"step": 0, **evaluate(policy, task, samples=eval_samples, k=1, generator=g_eval)}]

    def callback(step: int, row: dict[str, float]) -> None:
        if (step + 1) % eval_every == 0:
            checkpoints.append({"step": step + 1, **evaluate(policy, task, samples=eval_samples, k=1,
                                                             generator=g_eval)})

    kw = {**train, **arm.train}
    hist = train_grpo(policy, task, arm.make(g), steps=steps, generator=g, callback=callback, **kw)
    final = evaluate(policy, task, samples=final_samples, k=k, generator=g_eval)
    if measure is not None:
        final.update(measure(policy, seed))
    return {"init": init, "final": final, "history": hist, "checkpoints": checkpoints}


def run_study(task: Any, arms: Sequence[Arm], seeds: Iterable[int], **cfg: Any
              ) -> tuple[dict[str, list[dict]], float, float]:
    """Every arm on every seed, arms interleaved within each seed (:func:`run_arm` with
    ``cfg``); returns ``(results, wall seconds, process CPU seconds)`` with ``results[name]``
    the per-seed runs in seed order."""
    results: dict[str, list[dict]] = {a.name: [] for a in arms}
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in seeds:
        for arm in arms:
            results[arm.name].append(run_arm(task, arm, seed, **cfg))
    return results, time.perf_counter() - wall, time.process_time() - cpu


def study_parser(doc: str, *, steps: int, quick_steps: int, out: str, seeds: int = 5,
                 quick_seeds: int = 2, tuning: bool = False) -> argparse.ArgumentParser:
    """The reproductions' shared options: ``--seeds``, ``--seed0`` (first seed; the committed
    numbers use 0, the second seed set 100), ``--steps``, ``--quick`` (CI smoke run),
    ``--out`` (the figure, default ``examples/figures/<out>``), ``--save`` / ``--load``, and
    with ``tuning`` the options of :func:`tune_arms`, ``--tune-seeds`` (from 1000; one in the
    smoke run) and ``--tuning-cache``. Call :func:`apply_quick` on the parsed arguments."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=seeds, help=f"seeds (>= 5 for the verdict; default {seeds})")
    ap.add_argument("--seed0", type=int, default=0,
                    help="first seed (the committed numbers: 0; the second seed set: 100)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--quick", action="store_true",
                    help=f"CI smoke run: {quick_seeds} seeds, {quick_steps} steps (the scripts also take fewer prompts "
                         "per step)")
    ap.add_argument("--out", default=os.path.join("examples", "figures", out))
    ap.add_argument("--save", metavar="PATH", help="also write the runs to PATH (torch.save), e.g. one file per seed")
    ap.add_argument("--load", metavar="PATH", nargs="+",
                    help="do not train: report on the runs saved by --save (seeds in the order given)")
    if tuning:
        ap.add_argument("--tune-seeds", type=int, default=2, help="tuning seeds, from 1000 (default 2)")
        ap.add_argument("--tuning-cache", metavar="JSON", help="reuse / store the tuning runs' scores here")
    ap.set_defaults(_quick=(quick_seeds, quick_steps))
    return ap


def run_or_load(task: Any, arms: Sequence[Arm], args: argparse.Namespace, **cfg: Any
                ) -> tuple[dict[str, list[dict]], float, float]:
    """:func:`run_study` on ``args``' seeds (and ``torch.save`` to ``args.save``), or, with
    ``args.load``, the saved runs of several files joined in the order given (so that the seeds
    of one study can run in separate processes); then ``args.seed0`` / ``args.seeds`` describe
    the joined seeds, and wall and CPU times are the sums over the files."""
    if not getattr(args, "load", None):
        results, wall, cpu = run_study(task, arms, range(args.seed0, args.seed0 + args.seeds), **cfg)
        if getattr(args, "save", None):
            torch.save({"seeds": list(range(args.seed0, args.seed0 + args.seeds)), "results": results,
                        "wall": wall, "cpu": cpu, "steps": cfg.get("steps")}, args.save)
        return results, wall, cpu
    results: dict[str, list[dict]] = {a.name: [] for a in arms}
    seeds, wall, cpu = [], 0.0, 0.0
    for path in args.load:
        saved = torch.load(path, weights_only=False)
        if saved["steps"] != cfg.get("steps"):
            raise ValueError(f"{path} holds runs of {saved['steps']} steps, not {cfg.get('steps')}; pass --steps.")
        seeds += saved["seeds"]
        for a in arms:
            results[a.name] += saved["results"][a.name]
        wall, cpu = wall + saved["wall"], cpu + saved["cpu"]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"the loaded seeds {seeds} are not consecutive.")
    args.seed0, args.seeds = seeds[0], len(seeds)
    return results, wall, cpu


def tune_arms(task: Any, families: dict[str, Sequence[Arm]], seeds: Iterable[int], *, metric: str = "pass@1",
              avoid: Iterable[int] = (), cache: str | None = None, **cfg: Any
              ) -> tuple[dict[str, Arm], dict[str, dict[str, list[float]]]]:
    """Tune every family of arms (a method, its baseline) with the same budget: each
    candidate :class:`Arm` of each family runs on every tuning seed with the same ``cfg``
    (:func:`run_arm`, final checkpoint), and the candidate with the highest mean ``metric``
    wins (the first on ties). Returns ``(chosen arm per family, per family {candidate name:
    the metric per tuning seed}})``.

    Every family must offer the same number of candidates, and the tuning seeds must be
    disjoint from ``avoid`` (the evaluation seeds), else :class:`ValueError`. With ``cache``
    (a JSON path), scores already stored there for the same candidates, seeds, metric and
    steps are reused and new ones are added, so a second evaluation seed set does not rerun
    the tuning.
    """
    seeds = list(seeds)
    sizes = {name: len(arms) for name, arms in families.items()}
    if not seeds or min(sizes.values(), default=0) < 1 or len(set(sizes.values())) != 1:
        raise ValueError(f"every family needs the same number (>= 1) of candidates and >= 1 tuning seed; got "
                         f"{sizes} and seeds {seeds}.")
    if set(seeds) & set(avoid):
        raise ValueError(f"the tuning seeds {sorted(set(seeds) & set(avoid))} are also evaluation seeds; "
                         "tune on disjoint seeds.")
    key = json.dumps({"seeds": seeds, "metric": metric, "steps": cfg.get("steps")})
    stored: dict[str, dict[str, list[float]]] = {}
    if cache and os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            stored = json.load(f)
    known = stored.setdefault(key, {})
    scores: dict[str, dict[str, list[float]]] = {}
    chosen: dict[str, Arm] = {}
    for family, arms in families.items():
        scores[family] = {}
        for arm in arms:
            if arm.name not in known:
                known[arm.name] = [float(run_arm(task, arm, s, **cfg)["final"][metric]) for s in seeds]
            scores[family][arm.name] = known[arm.name]
        means = [float(np.mean(scores[family][a.name])) for a in arms]
        chosen[family] = arms[int(np.argmax(means))]
    if cache:
        with open(cache, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=1)
    return chosen, scores


def print_tuning(chosen: dict[str, Arm], scores: dict[str, dict[str, list[float]]], seeds: Sequence[int],
                 metric: str = "pass@1") -> None:
    """The tuning table of :func:`tune_arms`: per candidate the mean ``metric`` over the
    tuning seeds (and each seed's), the chosen one marked ``*``."""
    print(f"tuning on seeds {list(seeds)} ({metric} at the final step; every family "
          f"{len(next(iter(scores.values())))} candidates):")
    for family, cands in scores.items():
        for name, vals in cands.items():
            mark = "*" if name == chosen[family].name else " "
            print(f"  {mark} {family:10s} {name:22s} mean {np.mean(vals):.3f}  seeds " + " ".join(f"{v:.3f}" for v in vals))


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--quick``, replace ``seeds`` and ``steps`` (and ``tune_seeds``) by the smoke run's."""
    if args.quick:
        args.seeds, args.steps = args._quick
        if hasattr(args, "tune_seeds"):
            args.tune_seeds = 1
    return args


def print_table(arms: Sequence[Arm], results: dict[str, list[dict]], names: Sequence[str], *,
                where: str = "final", width: int = 22) -> None:
    """One row per arm: mean ± 95 % interval over seeds of each metric in ``names``."""
    from entrokit.plotting import format_ci95

    print(f"{'arm':{width}s} " + " ".join(f"{m:>17s}" for m in names))
    for arm in arms:
        rs = results[arm.name]
        print(f"{arm.label:{width}s} " + " ".join(
            f"{format_ci95([r[where][m] for r in rs], digits=3, width=6):>17s}" for m in names))


def print_paired(arms: Sequence[Arm], results: dict[str, list[dict]], base: Arm, names: Sequence[str]) -> None:
    """For every arm but ``base``: the paired (per seed) differences arm - base of each metric."""
    from entrokit.plotting import format_ci95

    for arm in arms:
        if arm.name == base.name:
            continue
        print(f"paired {arm.label} - {base.label}: " + ", ".join(
            f"{m} {format_ci95(paired_diff(results, arm.name, base.name, m), digits=3, width=6)}" for m in names))


def fit_entropy_law(entropy: Sequence[float], reward: Sequence[float]) -> tuple[float, float, float]:
    r"""Least-squares fit of :math:`R = -a\,e^{H} + b` (Cui et al. 2025, "The Entropy Mechanism
    of RL for Reasoning LMs", Eq. 1); returns ``(a, b, R^2)``."""
    x = np.exp(np.asarray(entropy, dtype=np.float64))
    y = np.asarray(reward, dtype=np.float64)
    design = np.stack([-x, np.ones_like(x)], 1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([a, b])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), (1.0 - float((resid**2).sum()) / ss_tot) if ss_tot > 0 else math.nan


def paired_diff(results: dict[str, list[dict]], arm: str, base: str, metric: str, where: str = "final") -> list[float]:
    """Per-seed differences ``arm - base`` of ``metric`` (seeds in the same order)."""
    return [a[where][metric] - b[where][metric] for a, b in zip(results[arm], results[base])]


def plot_entropy_bands(ax, arms: Sequence[Arm], results: dict[str, list[dict]], *, key: str = "entropy",
                       title: str = "Token entropy during training", log: bool = True) -> None:
    """Mean over seeds of the per-step rollout entropy, with a 95 % t-band."""
    from entrokit.plotting import mean_ci95

    for arm in arms:
        curves = np.array([r["history"][key] for r in results[arm.name]])
        stats = [mean_ci95(curves[:, t]) for t in range(curves.shape[1])]
        m = np.array([s[0] for s in stats])
        h = np.nan_to_num(np.array([s[1] for s in stats]))
        steps = np.arange(1, curves.shape[1] + 1)
        ax.plot(steps, m, color=arm.color, label=arm.label)
        ax.fill_between(steps, np.maximum(m - h, 1e-4), m + h, color=arm.color, alpha=0.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("entropy (nats / token)")
    ax.set_title(title)


def plot_metric_bars(ax, arms: Sequence[Arm], results: dict[str, list[dict]], metric: str, *, title: str,
                     init: bool = True) -> None:
    """Final ``metric`` per arm, mean with its 95 % interval and the seeds as dots; the value
    at initialisation as a dashed line."""
    from entrokit.plotting import mean_ci95

    for i, arm in enumerate(arms):
        vals = [r["final"][metric] for r in results[arm.name]]
        m, h = mean_ci95(vals)
        ax.bar(i, m, yerr=0 if math.isnan(h) else h, color=arm.color, alpha=0.7, capsize=4)
        ax.plot(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, "k.", ms=4)
    if init:
        first = results[arms[0].name]
        ax.axhline(float(np.mean([r["init"][metric] for r in first])), color="k", ls="--", lw=1,
                   label="at initialisation")
        ax.legend(loc="best")
    ax.set_xticks(range(len(arms)), [a.label for a in arms], rotation=20, ha="right")
    ax.set_title(title)


def study_figure(arms: Sequence[Arm], results: dict[str, list[dict]], panels: Sequence[tuple | None], *,
                 legend: dict[str, Any] | None = None, log: bool = True):
    """The reproductions' figure, before its title: the rollout entropy of every arm
    (:func:`plot_entropy_bands`, legend ``legend``), then one panel per entry of
    ``panels``, ``(metric, title)`` or ``(metric, title, {"init": False, "arms": ...})`` for
    :func:`plot_metric_bars` and ``None`` for a panel the caller draws. Returns
    ``(fig, axes)``; :func:`save_study_figure` titles and writes it."""
    import matplotlib.pyplot as plt

    from entrokit.plotting import FIGURE_STYLE

    plt.rcParams.update(FIGURE_STYLE)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(17, 4.2) if len(panels) >= 3 else (14, 4.2))
    plot_entropy_bands(axes[0], arms, results, title="Rollout entropy (mean, 95 % band)", log=log)
    for ax, panel in zip(axes[1:], panels):
        if panel is not None:
            metric, title, *extra = panel
            opts = dict(extra[0]) if extra else {}
            plot_metric_bars(ax, opts.pop("arms", arms), results, metric, title=title, **opts)
    axes[0].legend(**(legend or {"loc": "best"}))
    return fig, axes


def save_study_figure(fig, out: str, title: str, *, quick: bool) -> None:
    """Title ``fig`` (marked as a smoke run with ``quick``) and write it to ``out``."""
    from entrokit.plotting import save_figure

    fig.suptitle(("[smoke run] " if quick else "") + title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
