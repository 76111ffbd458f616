"""The study helpers: the entropy-law fit on exact and noisy data, paired differences, and
seed pairing of the arms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entrokit.plotting import format_ci95
from entrokit.rl.toy import DigitSum, grpo_objective
from entrokit.rl.toy.study import (
    Arm,
    apply_quick,
    fit_entropy_law,
    paired_diff,
    print_paired,
    print_table,
    print_tuning,
    run_arm,
    run_or_load,
    run_study,
    save_study_figure,
    study_figure,
    study_parser,
    tune_arms,
)

KW = {"steps": 2, "hidden": 16, "eval_every": 1, "final_samples": 8, "k": 4, "prompts_per_step": 4,
      "group_size": 4, "ppo_epochs": 1}


def test_fit_entropy_law_recovers_a_closed_form():
    h = np.linspace(0.1, 2.3, 25)
    a, b, r2 = fit_entropy_law(h, -0.07 * np.exp(h) + 0.9)
    assert (a, b, r2) == pytest.approx((0.07, 0.9, 1.0), abs=1e-10)
    # pure noise around a constant: the law explains nothing
    rng = np.random.default_rng(0)
    _, _, r2_noise = fit_entropy_law(h, 0.5 + 0.01 * rng.standard_normal(h.size))
    assert r2_noise < 0.3


def test_paired_diff_keeps_seed_order():
    res = {"x": [{"final": {"m": 1.0}}, {"final": {"m": 3.0}}], "y": [{"final": {"m": 0.5}}, {"final": {"m": 4.0}}]}
    assert paired_diff(res, "x", "y", "m") == [0.5, -1.0]


def test_arms_of_one_seed_start_from_the_same_policy():
    task = DigitSum(2)
    arm = Arm("grpo", "GRPO", lambda g: grpo_objective())
    kw = {"steps": 2, "hidden": 16, "eval_every": 1, "final_samples": 8, "k": 4, "prompts_per_step": 4,
          "group_size": 4, "ppo_epochs": 1}
    r1, r2 = run_arm(task, arm, 3, **kw), run_arm(task, arm, 3, **kw)
    assert r1["init"] == r2["init"] and r1["history"] == r2["history"]  # deterministic given the seed
    r3 = run_arm(task, arm, 4, **kw)
    assert r3["init"] != r1["init"]
    assert [c["step"] for c in r1["checkpoints"]] == [0, 1, 2]
    assert torch.isfinite(torch.tensor(r1["history"]["entropy"])).all()


def test_run_study_is_run_arm_per_seed_in_seed_order():
    task = DigitSum(2)
    arms = [Arm("a", "A", lambda g: grpo_objective()), Arm("b", "B", lambda g: grpo_objective(0.1))]
    results, wall, cpu = run_study(task, arms, [5, 2], **KW)
    assert list(results) == ["a", "b"] and wall > 0 and cpu > 0
    for arm in arms:
        for seed, got in zip([5, 2], results[arm.name]):
            ref = run_arm(task, arm, seed, **KW)
            assert got["init"] == ref["init"] and got["history"] == ref["history"] and got["final"] == ref["final"]
    # arms of one seed share the initial policy: the same measures at initialisation
    assert results["a"][0]["init"] == results["b"][0]["init"]


def test_objective_sees_the_policy_and_task_being_trained():
    task = DigitSum(2)
    created, seen = [], []

    def make(g):
        def objective(b):
            seen.append((b.policy, b.task))
            return grpo_objective()(b)
        return objective

    run_arm(task, Arm("x", "X", make), 0, init_policy=created.append, **KW)
    assert len(seen) == KW["steps"] * KW["ppo_epochs"]
    assert all(p is created[0] and t is task for p, t in seen)


def test_study_parser_quick_and_seed0():
    ap = study_parser("Title line\nmore", steps=100, quick_steps=6, out="x.png")
    args = apply_quick(ap.parse_args([]))
    assert (args.seeds, args.seed0, args.steps, args.quick) == (5, 0, 100, False)
    assert args.out.endswith("x.png")
    args = apply_quick(ap.parse_args(["--quick", "--seed0", "100", "--seeds", "9"]))
    assert (args.seeds, args.seed0, args.steps) == (2, 100, 6)
    assert ap.description == "Title line" and not hasattr(args, "tune_seeds")
    tuned = study_parser("T", steps=10, quick_steps=2, out="y.png", tuning=True)
    args = apply_quick(tuned.parse_args(["--tuning-cache", "c.json"]))
    assert (args.tune_seeds, args.tuning_cache) == (2, "c.json")
    assert apply_quick(tuned.parse_args(["--quick", "--tune-seeds", "3"])).tune_seeds == 1


def test_print_table_and_paired_show_the_ci95_of_the_seeds(capsys):
    res = {"x": [{"final": {"m": v}} for v in (1.0, 2.0, 4.0)], "y": [{"final": {"m": v}} for v in (0.5, 2.5, 3.0)]}
    arms = [Arm("x", "arm x", None), Arm("y", "arm y", None)]
    print_table(arms, res, ["m"])
    print_paired(arms, res, arms[0], ["m"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("arm x") and out[1].endswith(format_ci95([1.0, 2.0, 4.0], digits=3, width=6))
    assert out[2].endswith(format_ci95([0.5, 2.5, 3.0], digits=3, width=6))
    assert out[3] == f"paired arm y - arm x: m {format_ci95([-0.5, 0.5, -1.0], digits=3, width=6)}"


def test_study_figure_draws_the_entropy_and_the_metric_panels(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    rows = {"x": [1.0, 2.0, 4.0], "y": [0.5, 2.5, 3.0]}
    res = {k: [{"final": {"m": v}, "init": {"m": 0.25}, "history": {"entropy": [1.0, 0.5, 0.2]}} for v in vals]
           for k, vals in rows.items()}
    arms = [Arm("x", "arm x", None, "tab:blue"), Arm("y", "arm y", None, "tab:red")]
    fig, axes = study_figure(arms, res, [("m", "metric m"), None, ("m", "m of y", {"init": False, "arms": arms[1:]})],
                             legend={"loc": "lower left"})
    assert len(axes) == 4 and axes[0].get_title() == "Rollout entropy (mean, 95 % band)"
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["arm x", "arm y"]
    # a bar per arm at the seeds' mean, and the value at initialisation as a dashed line
    assert [p.get_height() for p in axes[1].patches] == pytest.approx([7 / 3, 2.0])
    assert axes[1].get_title() == "metric m" and axes[1].lines[-1].get_ydata()[0] == 0.25
    assert not axes[2].has_data()  # left to the caller
    assert [p.get_height() for p in axes[3].patches] == pytest.approx([2.0]) and axes[3].get_legend() is None
    save_study_figure(fig, str(tmp_path / "f.png"), "a study", quick=True)
    assert fig._suptitle.get_text() == "[smoke run] a study" and (tmp_path / "f.png").stat().st_size > 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'f.png'}"


def test_seeds_saved_by_separate_runs_load_as_one_study(tmp_path):
    task = DigitSum(2)
    arms = [Arm("a", "A", lambda g: grpo_objective()), Arm("b", "B", lambda g: grpo_objective(0.1))]
    ap = study_parser("t", steps=2, quick_steps=1, out="x.png")
    for seed in (3, 4):
        run_or_load(task, arms, ap.parse_args(["--seeds", "1", "--seed0", str(seed), "--save",
                                               str(tmp_path / f"s{seed}.pt")]), **KW)
    args = ap.parse_args(["--load", str(tmp_path / "s3.pt"), str(tmp_path / "s4.pt")])
    joined, wall, cpu = run_or_load(task, arms, args, **KW)
    together, _, _ = run_study(task, arms, [3, 4], **KW)
    assert (args.seed0, args.seeds) == (3, 2) and wall > 0 and cpu > 0
    for arm in arms:
        assert [r["final"] for r in joined[arm.name]] == [r["final"] for r in together[arm.name]]
        assert [r["history"] for r in joined[arm.name]] == [r["history"] for r in together[arm.name]]
    with pytest.raises(ValueError, match="not consecutive"):
        run_or_load(task, arms, ap.parse_args(["--load", str(tmp_path / "s4.pt"), str(tmp_path / "s3.pt")]), **KW)
    with pytest.raises(ValueError, match="holds runs of 2 steps"):
        run_or_load(task, arms, ap.parse_args(["--load", str(tmp_path / "s3.pt")]), **{**KW, "steps": 5})


def test_tune_arms_same_budget_disjoint_seeds_and_cache(tmp_path, capsys):
    task = DigitSum(2)
    built = []

    def arm(name, clip):
        def make(g):
            built.append(name)
            return grpo_objective(clip)
        return Arm(name, name, make)

    fams = {"base": [arm("b1", 0.1), arm("b2", 0.3)], "method": [arm("m1", 0.2), arm("m2", 0.05)]}
    cache = str(tmp_path / "tune.json")
    chosen, scores = tune_arms(task, fams, [7, 8], metric="pass@1", avoid=[0, 1], cache=cache, **KW)
    assert len(built) == 8  # 2 families x 2 candidates x 2 seeds
    for fam, arms in fams.items():
        # each score is the candidate's final pass@1 on that tuning seed, recomputed independently
        for a in arms:
            assert scores[fam][a.name] == [run_arm(task, a, s, **KW)["final"]["pass@1"] for s in (7, 8)]
        means = [np.mean(scores[fam][a.name]) for a in arms]
        assert chosen[fam] is arms[int(np.argmax(means))]
    built.clear()
    again, scores2 = tune_arms(task, fams, [7, 8], metric="pass@1", cache=cache, **KW)
    assert built == [] and scores2 == scores and {f: a.name for f, a in again.items()} == \
        {f: a.name for f, a in chosen.items()}
    print_tuning(chosen, scores, [7, 8])
    out = capsys.readouterr().out
    assert "tuning on seeds [7, 8]" in out and out.count("*") == 2
    with pytest.raises(ValueError, match="same number"):
        tune_arms(task, {"base": fams["base"], "method": fams["method"][:1]}, [7], **KW)
    with pytest.raises(ValueError, match=r"tuning seeds \[1\] are also evaluation seeds"):
        tune_arms(task, fams, [1, 7], avoid=range(0, 5), **KW)


def test_run_arm_measure_sees_the_trained_policy_and_seed():
    task = DigitSum(2)
    arm = Arm("a", "A", lambda g: grpo_objective())
    seen = []

    def measure(policy, seed):
        seen.append((policy, seed))
        return {"head_norm": float(policy.head.weight.detach().norm())}

    run = run_arm(task, arm, 3, measure=measure, **KW)
    assert len(seen) == 1 and seen[0][1] == 3
    assert run["final"]["head_norm"] == float(seen[0][0].head.weight.detach().norm())
    # measured after training: the untrained policy of the same seed has other head weights
    from entrokit.rl.toy import GRUPolicy

    fresh = GRUPolicy(task.num_prompts, task.vocab_size + 1, task.vocab_size, KW["hidden"], seed=3)
    assert float(fresh.head.weight.detach().norm()) != run["final"]["head_norm"]
