"""AEnt: clamped entropy with its controller against the naive bonus, with noise tokens
====================================================================================

When the action space holds many irrelevant tokens, does the naive entropy bonus spread
probability onto them and lose accuracy, while AEnt's clamped entropy and its automatic
coefficient do not?

Claim (Shen et al. 2025, "On Entropy Control in LLM-RL Algorithms", AEnt; AReaL
``recipe/AEnt``). The plain bonus fails because the response space is huge and the correct
outputs are sparse: it pushes mass onto useless tokens. AEnt regularises the entropy of the
policy re-normalised on its highest-logit tokens (the lowest-logit fraction c of the
vocabulary is dropped) and adjusts the coefficient with a dead-band integral controller.

Regime: digit-sum (4 digits) with 1000 noise tokens padded into the vocabulary
(``DigitSum(4, noise_tokens=1000)``; never correct). The policy starts "pre-trained" to ignore
them: the head's bias of every noise token is lowered by 9 nats, so about 1 % of the mass sits on
noise at initialisation, as a language model puts little mass on irrelevant words. GRU 128,
GRPO 32 x 8, 4 PPO epochs, Adam 3e-3, no KL. Arms, paired by seed:

* GRPO: no entropy term;
* naive bonus: GRPO + ``entropy_bonus(H, mask, 0.01)`` on the full-vocabulary entropy (the
  coefficient that helped without noise in the pilot of ``../shared/docs/anchors_rl.md`` s. 4);
* AEnt: GRPO + ``entropy_bonus(H_clamp, mask, beta)`` with
  ``H_clamp = token_entropy(logits, support=Clamp(0.4))`` (AReaL README: c = 0.4) and
  ``beta`` from ``DeadbandController`` (band [0.3 H0, 0.6 H0] of the clamped entropy at
  initialisation, lr 0.01, beta0 0.01, box [1e-5, 0.05]).

Test of the claim: the naive bonus raises the noise mass above GRPO's and lowers pass@1
(paired differences with 95 % intervals); AEnt's pass@1 is not below GRPO's and its noise mass
stays below the naive bonus's. Measures as in ``rl_entropy_mechanism.py`` plus the noise mass.

Run: ``python examples/rl_aent_noise_tokens.py [--seeds 5] [--seed0 0] [--steps 40] [--quick] [--out PATH]``
"""

from __future__ import annotations

import functools
import os

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from entrokit.plotting import format_ci95, mean_ci95  # noqa: E402
from entrokit.rl import Clamp, DeadbandController, clipped_surrogate, entropy_bonus, token_entropy  # noqa: E402
from entrokit.rl.toy import DigitSum, bonus_objective, grpo_objective  # noqa: E402
from entrokit.rl.toy.study import (  # noqa: E402
    Arm,
    apply_quick,
    paired_diff,
    run_or_load,
    save_study_figure,
    study_figure,
    study_parser,
)

fmt = functools.partial(format_ci95, digits=3, width=6)
NOISE, PRIOR, BONUS, CLAMP = 1000, 9.0, 0.01, 0.4


def prior(policy):
    with torch.no_grad():
        policy.head.bias[10:] -= PRIOR


def naive(g):
    return bonus_objective(BONUS)


def aent(g):
    state = {}

    def objective(b):
        h = token_entropy(b.logits, support=Clamp(CLAMP), mask=b.mask, check_inputs=False)
        h_now = float((h.detach() * b.mask).sum() / b.mask.sum())
        if "ctrl" not in state:  # band anchored to the clamped entropy at the first step
            state["ctrl"] = DeadbandController(low=0.3 * h_now, high=0.6 * h_now, lr=0.01, coef=0.01,
                                               coef_min=1e-5, coef_max=0.05, sync=False)
        ctrl = state["ctrl"]
        pg, s = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, check_inputs=False)
        eb, _ = entropy_bonus(h, b.mask, ctrl.value, check_inputs=False)
        if b.epoch == 0:
            ctrl.step(h_now)
        return pg + eb, {**s, "coef": ctrl.value, "clamped_entropy": h_now}
    return objective


ARMS = [
    Arm("grpo", "GRPO", lambda g: grpo_objective(0.2), "tab:gray"),
    Arm("naive", f"naive bonus {BONUS}", naive, "tab:orange"),
    Arm("aent", f"AEnt (clamp {CLAMP})", aent, "tab:purple"),
]


def main() -> None:
    args = apply_quick(study_parser(__doc__, steps=40, quick_steps=4, out="rl_aent_noise_tokens.png").parse_args())
    torch.set_num_threads(1)
    task = DigitSum(4, noise_tokens=NOISE)
    cfg = {"steps": args.steps, "eval_every": 3 if args.quick else 10, "final_samples": 8 if args.quick else 128,
           "k": 8 if args.quick else 64, "prompts_per_step": 4 if args.quick else 32, "group_size": 8, "ppo_epochs": 4, "lr": 3e-3,
           "init_policy": prior}
    k = cfg["k"]
    results, wall, cpu = run_or_load(task, ARMS, args, **cfg)
    print(f"digit-sum (4 digits) + {NOISE} noise tokens (prior -{PRIOR} nats), GRU 128, GRPO 32x8, 4 PPO epochs, "
          f"lr 3e-3, {args.steps} steps, {args.seeds} seeds ({args.seed0}+); wall {wall:.0f} s, process CPU {cpu:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    init = results["grpo"]
    print(f"at initialisation: pass@1 {fmt([r['init']['pass@1'] for r in init])}, noise mass "
          f"{fmt([r['init']['noise_mass'] for r in init])}, H {fmt([r['init']['entropy'] for r in init])}")
    names = ("pass@1", f"pass@{k}", "coverage", "distinct", "entropy", "noise_mass")
    print(f"{'arm':22s} " + " ".join(f"{m:>17s}" for m in names))
    for arm in ARMS:
        rs = results[arm.name]
        print(f"{arm.label:22s} " + " ".join(f"{fmt([r['final'][m] for r in rs]):>17s}" for m in names))
    for arm in ARMS[1:]:
        print(f"paired {arm.label} - GRPO: " + ", ".join(
            f"{m} {fmt(paired_diff(results, arm.name, 'grpo', m))}" for m in names))
    coefs = [r["history"]["coef"][-1] for r in results["aent"]]
    print(f"AEnt final coefficient {fmt(coefs)}")
    d_noise = mean_ci95(paired_diff(results, "naive", "grpo", "noise_mass"))
    d_acc = mean_ci95(paired_diff(results, "naive", "grpo", "pass@1"))
    a_acc = mean_ci95(paired_diff(results, "aent", "grpo", "pass@1"))
    a_noise = mean_ci95(paired_diff(results, "aent", "naive", "noise_mass"))
    naive_fails = d_noise[0] - d_noise[1] > 0 and d_acc[0] + d_acc[1] < 0
    aent_ok = a_acc[0] + a_acc[1] >= 0 and a_noise[0] + a_noise[1] < 0
    parts = (f"naive - GRPO: noise mass {d_noise[0]:+.3f} ± {d_noise[1]:.3f}, pass@1 {d_acc[0]:+.3f} ± {d_acc[1]:.3f}"
             f" ({'fails as claimed' if naive_fails else 'does not fail significantly'}); AEnt - GRPO pass@1 "
             f"{a_acc[0]:+.3f} ± {a_acc[1]:.3f}, AEnt - naive noise mass {a_noise[0]:+.3f} ± {a_noise[1]:.3f} "
             f"({'holds' if aent_ok else 'does not hold'})")
    word = "reproduced" if naive_fails and aent_ok else ("partly reproduced" if naive_fails or aent_ok
                                                         else "not reproduced")
    tag = " [--quick smoke run: too short and too few seeds to be evidence]" if args.quick else ""
    print(f"verdict: {word}: {parts}{tag}")

    fig, _ = study_figure(ARMS, results, [("noise_mass", "Final mass on noise tokens (95 % CI)"),
                                          ("pass@1", "Final pass@1 (95 % CI)"),
                                          ("distinct", "Distinct correct answers (95 % CI)")])
    save_study_figure(fig, args.out, f"AEnt on digit-sum + {NOISE} noise tokens: {args.seeds} seeds, "
                      f"{args.steps} GRPO steps", quick=args.quick)


if __name__ == "__main__":
    main()
