"""STEER: token weights from the estimated entropy change, against GRPO
=======================================================================

Does reweighting each token's loss by its estimated entropy change give smaller step-to-step
entropy changes than GRPO, at equal or better pass@1?

Claim ("Rethinking Entropy Interventions in RLVR", STEER; zz-haooo/STEER ``core_algos.py``,
``loss_mode: entropy_control``). Existing interventions act on entropy only indirectly; STEER
estimates, per token, the first-order entropy change of its update,
:math:`\\Omega_t = |A_t/\\pi^{old}_t\\,\\pi_t(1-\\pi_t)(\\log\\pi_t + H_t)|`, and maps it
linearly onto weights in [0.8, 1.2] (largest change, smallest weight) that multiply the
dual-clip PPO loss (c = 10, clip-high 0.28). This keeps entropy changes small and steady and
"significantly mitigates collapse" without a loss of accuracy.

Regime: the entropy-collapse regime of ``rl_entropy_mechanism.py`` (digit-sum with 4 digits,
GRU 128, GRPO 32 x 8, 4 PPO epochs, Adam 3e-3, no KL). Arms, from the same initial weights per
seed (paired):

* GRPO: token-mean clipped surrogate, clip 0.2;
* clip only (the decisive ablation): STEER's surrogate without the weights, i.e. clip 0.2 /
  clip-high 0.28 and dual clip 10: STEER changes the clipping too, and clip-higher alone is
  known to slow collapse;
* STEER: the same surrogate times ``steer_token_weights(..., w_min=0.8, w_max=1.2)``.

Measures as in ``rl_entropy_mechanism.py``, plus ``|dH|``: the mean over steps of
:math:`|H_{s+1} - H_s|`, the valid-token mean entropy of consecutive rollouts, and its
largest value ``max|dH|``. Test of the claim: the paired STEER - GRPO difference of ``|dH|``
has its 95 % upper bound below 0, and that of pass@1 its lower bound above -0.05 ("equal or
better", the margin of ``rl_top_entropy_tokens.py``). The ablation tells whether the weights
or the clipping do it (STEER - clip only).

Run: ``python examples/rl_steer.py [--seeds 5] [--seed0 0] [--steps 100] [--quick] [--out PATH]``
"""

from __future__ import annotations

import functools
import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from entrokit.plotting import format_ci95, mean_ci95  # noqa: E402
from entrokit.rl.losses import clipped_surrogate, steer_token_weights  # noqa: E402
from entrokit.rl.toy import DigitSum, grpo_objective  # noqa: E402
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
MARGIN = 0.05
CLIP_HIGH, DUAL = 0.28, 10.0  # STEER's run script


def steer(weighted: bool):
    def make(g):
        def objective(b):
            w = None
            extra = {}
            if weighted:
                w, extra = steer_token_weights(b.advantages, b.logp.detach(), b.old_logp, b.entropy.detach(), b.mask,
                                               w_min=0.8, w_max=1.2, check_inputs=False)
            loss, stats = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, clip_low=0.2,
                                            clip_high=CLIP_HIGH, dual_clip=DUAL, token_weights=w, check_inputs=False)
            return loss, {**stats, **extra}
        return objective
    return make


ARMS = [
    Arm("grpo", "GRPO", lambda g: grpo_objective(0.2), "tab:gray"),
    Arm("clip", "clip only (0.28, dual 10)", steer(False), "tab:olive"),
    Arm("steer", "STEER (w 0.8-1.2)", steer(True), "tab:red"),
]


def add_entropy_steps(results: dict[str, list[dict]]) -> None:
    """``|dH|`` and ``max|dH|`` of each run's rollout-entropy history, stored with its final measures."""
    for runs in results.values():
        for r in runs:
            d = np.abs(np.diff(np.asarray(r["history"]["entropy"])))
            r["final"]["|dH|"], r["final"]["max|dH|"] = float(d.mean()), float(d.max())


def main() -> None:
    args = apply_quick(study_parser(__doc__, steps=100, quick_steps=4, out="rl_steer.png").parse_args())
    torch.set_num_threads(1)
    task = DigitSum(4)
    cfg = {"steps": args.steps, "eval_every": 4 if args.quick else 10, "final_samples": 32 if args.quick else 128,
           "k": 16 if args.quick else 64, "prompts_per_step": 8 if args.quick else 32, "group_size": 8, "ppo_epochs": 4, "lr": 3e-3}
    k = cfg["k"]
    results, wall, cpu = run_or_load(task, ARMS, args, **cfg)
    add_entropy_steps(results)
    print(f"digit-sum (4 digits), GRU 128, GRPO 32x8, 4 PPO epochs, lr 3e-3, {args.steps} steps, "
          f"{args.seeds} seeds ({args.seed0}+); wall {wall:.0f} s, process CPU {cpu:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    names = ("pass@1", f"pass@{k}", "coverage", "distinct", "entropy", "|dH|", "max|dH|")
    print_table(ARMS, results, names, width=26)
    print_paired(ARMS, results, ARMS[0], names)
    print("paired STEER - clip only: " + ", ".join(
        f"{m} {fmt(paired_diff(results, 'steer', 'clip', m))}" for m in names))
    d_dh = mean_ci95(paired_diff(results, "steer", "grpo", "|dH|"))
    d_acc = mean_ci95(paired_diff(results, "steer", "grpo", "pass@1"))
    w_dh = mean_ci95(paired_diff(results, "steer", "clip", "|dH|"))
    w_acc = mean_ci95(paired_diff(results, "steer", "clip", "pass@1"))
    smaller = d_dh[0] + d_dh[1] < 0
    equal = d_acc[0] - d_acc[1] > -MARGIN
    by_weights = w_dh[0] + w_dh[1] < 0
    parts = (f"STEER - GRPO |dH| {d_dh[0]:+.4f} ± {d_dh[1]:.4f} ({'smaller' if smaller else 'not smaller'}), "
             f"pass@1 {d_acc[0]:+.3f} ± {d_acc[1]:.3f} ({'equal or better' if equal else 'not shown equal'} within "
             f"-{MARGIN}); ablation STEER - clip only: |dH| {w_dh[0]:+.4f} ± {w_dh[1]:.4f}, pass@1 "
             f"{w_acc[0]:+.3f} ± {w_acc[1]:.3f} ({'the weights' if by_weights else 'not the weights'} "
             f"{'make' if by_weights else 'making'} the difference)")
    word = "reproduced" if smaller and equal else ("partly reproduced" if smaller or equal else "not reproduced")
    tag = " [--quick smoke run: too short and too few seeds to be evidence]" if args.quick else ""
    print(f"verdict: {word}: {parts}{tag}")

    fig, _ = study_figure(ARMS, results, [("|dH|", "Mean |H(s+1) - H(s)| per step (95 % CI)", {"init": False}),
                                          ("pass@1", "Final pass@1 (95 % CI)"),
                                          ("distinct", "Distinct correct answers (95 % CI)")],
                          legend={"loc": "lower left"})
    save_study_figure(fig, args.out, f"STEER on digit-sum: {args.seeds} seeds ({args.seed0}+), {args.steps} GRPO steps",
                      quick=args.quick)


if __name__ == "__main__":
    main()
