"""AEPO: entropy held at arbitrary targets by the sampling temperature
======================================================================

Does AEPO's temperature rule hold the entropy within ±10 % of a target (0.3, 0.6 and 0.9 x the
initial entropy), and is pass@1 non-monotonic across the targets?

Claims ("Arbitrary Entropy Policy Optimization", AEPO; 597358816/AEPO ``ray_trainer.py::fit``).
(1) Entropy is stable at an arbitrary target; (2) performance is non-monotonic in entropy,
first rising, then falling. AEPO replaces the entropy bonus by REINFORCE on extra samples
drawn at a regulated temperature: each step, if the last entropy is at or below the target
H*, a quarter of the prompts is re-sampled at T_high = 1.2, else at T_low = 0.8; the samples
with advantage above 0.05 (at most 60, 30 above target) get advantage 1 and join the batch.

Regime: the entropy-collapse regime of ``rl_entropy_mechanism.py`` (digit-sum with 4 digits,
GRU 128, GRPO 32 x 8, 4 PPO epochs, Adam 3e-3, no KL). Arms, from the same initial weights
per seed (paired):

* GRPO: token-mean clipped surrogate, clip 0.2;
* AEPO at H* = 0.3, 0.6 and 0.9 x H0 (H0: the first rollout's entropy):
  ``TemperatureScheduler(H*, 0.8, 1.2, 60)`` picks the temperature of 8 prompts x 8
  auxiliary samples, ``aepo_select_positives`` the samples, ``aepo_reinforce_loss`` their
  REINFORCE term; the batch loss is the token mean over the rollout and the selected samples,
  as when the reference splices them into the batch;
* fixed T = 1 at 0.6 x H0 (the decisive ablation): the same REINFORCE samples always drawn
  at temperature 1, so whether the temperature rule, not the extra positive samples, holds
  the entropy.

The scheduler reads the exact valid-token mean entropy of the rollout
(:func:`entrokit.rl.token_entropy`), where the reference uses the Monte-Carlo estimate
:func:`entrokit.rl.losses.sampled_entropy` (unbiased here at the first PPO epoch, as the
rollout is sampled at T = 1). "Held" per run: the mean rollout entropy over the second half
of training is within ±10 % of H*; ``in band`` is the share of those steps inside ±10 %.
Non-monotonic: the paired pass@1 differences of the middle target to both ends
(0.6 - 0.3 and 0.6 - 0.9) have the same sign, each with its 95 % interval excluding 0.

Run: ``python examples/rl_aepo.py [--seeds 5] [--seed0 0] [--steps 120] [--quick] [--out PATH]``
"""

from __future__ import annotations

import functools
import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from entrokit.plotting import format_ci95, mean_ci95  # noqa: E402
from entrokit.rl import TemperatureScheduler  # noqa: E402
from entrokit.rl.losses import aepo_reinforce_loss, aepo_select_positives, clipped_surrogate  # noqa: E402
from entrokit.rl.toy import DigitSum, group_advantages, grpo_objective, sample, token_logprobs  # noqa: E402
from entrokit.rl.toy.study import (  # noqa: E402
    Arm,
    apply_quick,
    paired_diff,
    print_paired,
    print_table,
    run_or_load,
    save_study_figure,
    study_figure,
    study_parser,
)

fmt = functools.partial(format_ci95, digits=3, width=6)
GROUP, TARGETS = 8, (0.3, 0.6, 0.9)


def aepo(ratio: float, switch: bool = True):
    """AEPO at H* = ratio x H0; ``switch=False`` samples the REINFORCE rollouts at T = 1."""

    def make(g):
        state = {}

        def objective(b):
            m = b.mask.float()
            if b.epoch == 0:  # one temperature decision and one auxiliary rollout per step
                h_now = float((b.entropy.detach() * m).sum() / m.sum())
                if "sched" not in state:
                    state["sched"] = TemperatureScheduler(ratio * h_now, 0.8, 1.2, 60, sync=False)
                sched = state["sched"]
                sched.step(h_now)
                tau = sched.temperature if switch else 1.0
                prompts = b.prompt_ids[: b.prompt_ids.numel() // 4]  # a quarter of the groups
                aux = sample(b.policy, b.task, prompts, temperature=tau, generator=g)
                adv = group_advantages(aux.rewards.view(-1, GROUP)).reshape(-1)
                idx, sel = aepo_select_positives(adv, threshold=0.05, max_samples=sched.samples)
                state["aux"] = (aux.prompt_ids[idx], aux.inputs[idx], aux.actions[idx], aux.mask[idx])
                state["row"] = {"target": sched.target, "temperature": tau, "num_selected": sel["num_selected"]}
            pid, inp, act, msk = state["aux"]
            pg, stats = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, check_inputs=False)
            n_b, n_a = m.sum(), msk.float().sum()
            if pid.numel():
                logp = token_logprobs(b.policy(pid, inp)[0], act)
                rf, _ = aepo_reinforce_loss(logp, msk, check_inputs=False)
                pg = (pg * n_b + rf * n_a) / (n_b + n_a)  # token mean over the spliced batch
            return pg, {**stats, **state["row"]}
        return objective
    return make


ARMS = [
    Arm("grpo", "GRPO", lambda g: grpo_objective(0.2), "tab:gray"),
    *[Arm(f"aepo{r}", f"AEPO {r} H0", aepo(r), c) for r, c in zip(TARGETS, ("tab:blue", "tab:green", "tab:red"))],
    Arm("fixedT", "fixed T=1, 0.6 H0", aepo(0.6, switch=False), "tab:olive"),
]


def add_band(results: dict[str, list[dict]]) -> None:
    """Per run: mean entropy of the second half over the target, and the share of its steps within ±10 %."""
    for runs in results.values():
        for r in runs:
            h = np.asarray(r["history"]["entropy"])
            half = h[len(h) // 2:]
            target = r["history"].get("target", [r["init"]["entropy"]])[-1]
            r["final"]["H/H*"] = float(half.mean() / target)
            r["final"]["in band"] = float(np.mean(np.abs(half / target - 1) <= 0.1))
            r["final"]["H*"] = float(target)


def main() -> None:
    args = apply_quick(study_parser(__doc__, steps=120, quick_steps=4, out="rl_aepo.png").parse_args())
    torch.set_num_threads(1)
    task = DigitSum(4)
    cfg = {"steps": args.steps, "eval_every": 3 if args.quick else 10, "final_samples": 16 if args.quick else 128,
           "k": 8 if args.quick else 64, "prompts_per_step": 8 if args.quick else 32, "group_size": GROUP, "ppo_epochs": 4, "lr": 3e-3}
    k = cfg["k"]
    results, wall, cpu = run_or_load(task, ARMS, args, **cfg)
    add_band(results)
    print(f"digit-sum (4 digits), GRU 128, GRPO 32x8, 4 PPO epochs, lr 3e-3, {args.steps} steps, "
          f"{args.seeds} seeds ({args.seed0}+); wall {wall:.0f} s, process CPU {cpu:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"H0 (first rollout) {fmt([r['history']['entropy'][0] for r in results['grpo']])}")
    names = ("pass@1", f"pass@{k}", "coverage", "distinct", "entropy", "H*", "H/H*", "in band")
    print_table(ARMS, results, names, width=20)
    print_paired(ARMS, results, ARMS[0], ("pass@1", f"pass@{k}", "coverage", "distinct", "entropy"))
    held = {r: [abs(x["final"]["H/H*"] - 1) <= 0.1 for x in results[f"aepo{r}"]] for r in TARGETS}
    d_lo = mean_ci95(paired_diff(results, "aepo0.6", "aepo0.3", "pass@1"))
    d_hi = mean_ci95(paired_diff(results, "aepo0.6", "aepo0.9", "pass@1"))
    abl = mean_ci95(paired_diff(results, "fixedT", "aepo0.6", "H/H*"))
    print(f"pass@1 paired 0.6 - 0.3 H0: {d_lo[0]:+.3f} ± {d_lo[1]:.3f}; 0.6 - 0.9 H0: {d_hi[0]:+.3f} ± {d_hi[1]:.3f}")
    print(f"ablation fixed T=1 - AEPO (0.6 H0): H/H* {abl[0]:+.3f} ± {abl[1]:.3f}")
    held_all = all(all(v) for v in held.values())
    sig = [(m - h > 0) - (m + h < 0) for m, h in (d_lo, d_hi)]  # +1 / -1 significant, 0 not
    nonmono = sig[0] != 0 and sig[0] == sig[1]
    parts = ("(1) held within ±10 % on " + ", ".join(f"{r} H0 {sum(v)}/{len(v)}" for r, v in held.items())
             + f" seeds; (2) pass@1 0.6 - 0.3 H0 {d_lo[0]:+.3f} ± {d_lo[1]:.3f}, 0.6 - 0.9 H0 {d_hi[0]:+.3f} ± "
             f"{d_hi[1]:.3f} ({'non-monotonic' if nonmono else 'non-monotonicity not shown'}); ablation fixed T = 1: "
             f"H/H* {abl[0]:+.3f} ± {abl[1]:.3f} against the scheduled temperature")
    word = "reproduced" if held_all and nonmono else ("partly reproduced" if held_all or nonmono else "not reproduced")
    tag = " [--quick smoke run: too short and too few seeds to be evidence]" if args.quick else ""
    print(f"verdict: {word}: {parts}{tag}")

    fig, axes = study_figure(ARMS, results, [("H/H*", "Entropy / target, 2nd half (95 % CI)",
                                              {"init": False, "arms": ARMS[1:]}),
                                             ("pass@1", "Final pass@1 (95 % CI)"),
                                             ("distinct", "Distinct correct answers (95 % CI)")],
                             legend={"loc": "lower left", "fontsize": 9})
    h0 = float(np.mean([r["history"]["entropy"][0] for r in results["grpo"]]))
    for r, c in zip(TARGETS, ("tab:blue", "tab:green", "tab:red")):
        axes[0].axhspan(0.9 * r * h0, 1.1 * r * h0, color=c, alpha=0.1)
    axes[1].axhspan(0.9, 1.1, color="k", alpha=0.1)
    save_study_figure(fig, args.out, f"AEPO on digit-sum: {args.seeds} seeds ({args.seed0}+), "
                      f"{args.steps} GRPO steps; shaded: targets ±10 %", quick=args.quick)


if __name__ == "__main__":
    main()
