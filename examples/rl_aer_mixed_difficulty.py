"""AER: difficulty-aware entropy coefficients against one global coefficient
=========================================================================

On prompts of mixed difficulty, does giving the entropy bonus only to the prompts the policy
still fails on (AER's difficulty-aware coefficients) beat the same bonus applied to every
prompt with one global coefficient?

Claim (Rediscovering Entropy Regularization, "AER", arXiv 2510.10959, ACL Findings 2026).
Entropy regularization helps RLVR when it is (1) allocated per prompt, to hard prompts only,
(2) aimed at a target anchored to the initial entropy, :math:`H^* = \\rho H_0` with
:math:`\\rho < 1`, and (3) scaled by a global coefficient moved toward that target; the paper
reports gains over GRPO and over a global entropy bonus on math benchmarks. No code was
published; the per-prompt rule is read here as :math:`c_i = \\alpha\\,\\mathbf 1[\\mathrm{acc}_i <
\\tau]` (``DifficultyAwareCoef``) with :math:`\\alpha` from ``AnchoredTargetController``
(:math:`c \\leftarrow \\mathrm{clip}(c + \\eta(\\rho H_0 - H))`).

Regime: ``MixedArithmetic(40, moduli=(2, 5, 10, 25, 50))``: two digits x with x = a + b (mod m);
a random policy passes 50 % of the easy prompts (m = 2) and 2-4 % of the hard ones (m = 25, 50).
GRU 64, GRPO 32 x 8, 4 PPO epochs, Adam 3e-3, no KL: plain GRPO's entropy collapses and the
number of distinct correct answers falls. Arms, from the same initial weights per seed (paired),
all with the same controller (rho 0.5, eta 0.01, c0 0, box [0, ceiling]) fed the rollout's
valid-token mean entropy once per step:

* GRPO: no entropy term;
* global: ``entropy_bonus(H, mask, alpha)`` on every prompt;
* AER: ``entropy_bonus(H, mask, c)`` with the per-response ``c = DifficultyAwareCoef(ctrl,
  tau)(group accuracy).repeat_interleave(8)``;
* global, matched (the ablation): one coefficient for every prompt, equal to AER's *mean*
  coefficient in the batch, alpha x (share of prompts with accuracy < tau); it separates where
  the bonus goes from how much of it there is.

Tuning, the same budget for the method and its baseline: the global coefficient tries the
ceilings (0.02, 0.05, 0.1, 0.2) and AER the ceilings (0.05, 0.2) x tau (0.5, 0.9), four
candidates each, on the tuning seeds 1000 and 1001 (``--tune-seeds``), scored by pass@1 at the final
step (the checkpoint every arm is evaluated at); each keeps its best, the matched ablation takes
AER's, and the evaluation seeds (``--seed0``) are disjoint from the tuning seeds.

Measures as in ``rl_entropy_mechanism.py`` (pass@1, pass@64, coverage, distinct correct
answers, entropy) plus pass@1 on the hard prompts (m >= 25) and on the easy ones (m <= 5).
Test of the claim: the paired AER - global difference of pass@1 has its 95 % interval above 0.

Run: ``python examples/rl_aer_mixed_difficulty.py [--seeds 5] [--seed0 0] [--steps 100] [--tuning-cache JSON]
[--save PATH] [--load PATH ...] [--quick] [--out PATH]``
(the committed numbers: ``--seed0 0``; the second seed set: ``--seed0 100``).
"""

from __future__ import annotations

import functools
import os
import time

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from entrokit.plotting import format_ci95, mean_ci95  # noqa: E402
from entrokit.rl import (  # noqa: E402
    AnchoredTargetController,
    DifficultyAwareCoef,
    clipped_surrogate,
    entropy_bonus,
)
from entrokit.rl.toy import MixedArithmetic, grpo_objective  # noqa: E402
from entrokit.rl.toy.loop import sample  # noqa: E402
from entrokit.rl.toy.study import (  # noqa: E402
    Arm,
    apply_quick,
    paired_diff,
    print_tuning,
    run_or_load,
    save_study_figure,
    study_figure,
    study_parser,
    tune_arms,
)

fmt = functools.partial(format_ci95, digits=3, width=6)
GROUP, RHO, ETA = 8, 0.5, 0.01
# the tuning grids, four candidates each (the same budget): the global coefficient's ceiling,
# and AER's ceiling x its accuracy threshold tau
GLOBAL_GRID = (0.02, 0.05, 0.1, 0.2)
AER_GRID = ((0.05, 0.5), (0.2, 0.5), (0.05, 0.9), (0.2, 0.9))
TUNE_SEED0 = 1000  # tuning seeds 1000+, disjoint from the evaluation sets 0-4 and 100-104


def regularized(allocation: str, coef_max: float, tau: float = 0.5):
    """GRPO + the bonus with AER's anchored global coefficient (ceiling ``coef_max``),
    allocated ``"global"``, ``"aer"`` (prompts with accuracy < ``tau`` only) or ``"matched"``
    (AER's batch-mean coefficient on all)."""
    def make(g):
        coefs = DifficultyAwareCoef(AnchoredTargetController(ratio=RHO, lr=ETA, coef=0.0, coef_min=0.0,
                                                             coef_max=coef_max, sync=False), tau=tau)

        def objective(b):
            acc = b.rewards.view(-1, GROUP).mean(1)
            hard = coefs.per_prompt(acc)  # alpha * 1[acc < tau] per prompt
            if allocation == "aer":
                c = hard.repeat_interleave(GROUP)
            elif allocation == "matched":
                c = float(hard.mean())
            else:
                c = coefs.value
            pg, s = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, check_inputs=False)
            eb, _ = entropy_bonus(b.entropy, b.mask, c, check_inputs=False)
            if b.epoch == 0:
                coefs.step(float((b.entropy.detach() * b.mask).sum() / b.mask.sum()))
            return pg + eb, {**s, "coef": coefs.value, "mean_coef": float(torch.as_tensor(c, dtype=torch.float).mean())}
        return objective
    return make


def candidates(global_grid, aer_grid) -> dict[str, list[Arm]]:
    return {"global": [Arm(f"global@{c:g}", f"global, max {c:g}", regularized("global", c), "tab:orange")
                       for c in global_grid],
            "aer": [Arm(f"aer@{c:g},{t:g}", f"AER, max {c:g}, tau {t:g}", regularized("aer", c, t), "tab:blue")
                    for c, t in aer_grid]}


def arms(global_max: float, aer_max: float, tau: float) -> list[Arm]:
    return [
        Arm("grpo", "GRPO", lambda g: grpo_objective(0.2), "tab:gray"),
        Arm("global", f"global coefficient (max {global_max:g})", regularized("global", global_max), "tab:orange"),
        Arm("aer", f"AER (max {aer_max:g}, tau {tau:g})", regularized("aer", aer_max, tau), "tab:blue"),
        Arm("matched", "global, matched mean", regularized("matched", aer_max, tau), "tab:cyan"),
    ]


@torch.no_grad()
def by_difficulty(policy, task, samples: int, seed: int) -> dict[str, float]:
    """pass@1 on the hard (m >= 25) and the easy (m <= 5) prompts, ``samples`` answers each."""
    prompts = torch.arange(task.num_prompts).repeat_interleave(samples)
    ro = sample(policy, task, prompts, generator=torch.Generator().manual_seed(2 * 10**6 + seed))
    per_prompt = ro.rewards.view(task.num_prompts, samples).mean(1)
    return {"hard pass@1": float(per_prompt[task.moduli >= 25].mean()),
            "easy pass@1": float(per_prompt[task.moduli <= 5].mean())}


def main() -> None:
    args = apply_quick(study_parser(__doc__, steps=100, quick_steps=4, out="rl_aer_mixed_difficulty.png",
                                    tuning=True).parse_args())
    global_grid, aer_grid = (GLOBAL_GRID[1:3], AER_GRID[:2]) if args.quick else (GLOBAL_GRID, AER_GRID)
    torch.set_num_threads(1)
    task = MixedArithmetic(40, moduli=(2, 5, 10, 25, 50))
    cfg = {"steps": args.steps, "hidden": 64, "eval_every": 2 if args.quick else 10,
           "final_samples": 32 if args.quick else 128, "k": 16 if args.quick else 64, "prompts_per_step": 8 if args.quick else 32,
           "group_size": GROUP, "ppo_epochs": 4, "lr": 3e-3}
    k, n_split = cfg["k"], cfg["final_samples"]
    # the global coefficient (the baseline of the claim) and AER get four candidates each, the
    # same tuning seeds and checkpoint (the final step); evaluation seeds are disjoint from them
    tune_seeds = range(TUNE_SEED0, TUNE_SEED0 + args.tune_seeds)
    wall, cpu = time.perf_counter(), time.process_time()
    chosen, scores = tune_arms(task, candidates(global_grid, aer_grid), tune_seeds, metric="pass@1",
                               avoid=range(args.seed0, args.seed0 + args.seeds), cache=args.tuning_cache, **cfg)
    print(f"tuning: wall {time.perf_counter() - wall:.0f} s, process CPU {time.process_time() - cpu:.0f} s")
    print_tuning(chosen, scores, tune_seeds)
    global_max = float(chosen["global"].name.split("@")[1])
    aer_max, tau = (float(x) for x in chosen["aer"].name.split("@")[1].split(","))
    ARMS = arms(global_max, aer_max, tau)
    cfg["measure"] = lambda policy, seed: by_difficulty(policy, task, n_split, seed)
    results, wall, cpu = run_or_load(task, ARMS, args, **cfg)
    print(f"mixed-difficulty arithmetic (40 prompts, moduli 2-50), GRU 64, GRPO 32x8, 4 PPO epochs, lr 3e-3; "
          f"controller rho {RHO}, eta {ETA}; tuned: global box [0, {global_max:g}], AER box [0, {aer_max:g}], tau {tau:g}; "
          f"{args.steps} steps, {args.seeds} seeds "
          f"({args.seed0}+); wall {wall:.0f} s, process CPU {cpu:.0f} s; load average {os.getloadavg()[0]:.1f}")
    init = results["grpo"]
    print(f"at initialisation: pass@1 {fmt([r['init']['pass@1'] for r in init])}, distinct "
          f"{fmt([r['init']['distinct'] for r in init])}, H {fmt([r['init']['entropy'] for r in init])}")
    names = ("pass@1", f"pass@{k}", "coverage", "distinct", "entropy", "hard pass@1", "easy pass@1")
    print(f"{'arm':26s} " + " ".join(f"{m:>17s}" for m in names))
    for arm in ARMS:
        rs = results[arm.name]
        print(f"{arm.label:26s} " + " ".join(f"{fmt([r['final'][m] for r in rs]):>17s}" for m in names))
    for arm in ARMS[1:]:
        print(f"paired {arm.label} - GRPO: " + ", ".join(
            f"{m} {fmt(paired_diff(results, arm.name, 'grpo', m))}" for m in names))
    for base in ("global", "matched"):
        print(f"paired AER - {base}: " + ", ".join(
            f"{m} {fmt(paired_diff(results, 'aer', base, m))}" for m in names))
    for arm in ARMS[1:]:
        rs = results[arm.name]
        print(f"{arm.label}: final global coefficient {fmt([r['history']['coef'][-1] for r in rs])}, "
              f"mean applied coefficient over training "
              f"{fmt([sum(r['history']['mean_coef']) / len(r['history']['mean_coef']) for r in rs])}")
    d = mean_ci95(paired_diff(results, "aer", "global", "pass@1"))
    dm = mean_ci95(paired_diff(results, "aer", "matched", "pass@1"))
    better, worse = d[0] - d[1] > 0, d[0] + d[1] < 0
    parts = (f"AER - global pass@1 {d[0]:+.3f} ± {d[1]:.3f} "
             f"({'higher' if better else ('lower' if worse else 'no significant difference')}); "
             f"AER - matched global pass@1 {dm[0]:+.3f} ± {dm[1]:.3f}")
    word = "reproduced" if better else ("not reproduced, contradicted" if worse else "not reproduced")
    tag = " [--quick smoke run: too short and too few seeds to be evidence]" if args.quick else ""
    print(f"verdict: {word}: {parts}{tag}")

    fig, _ = study_figure(ARMS, results, [("pass@1", "Final pass@1 (95 % CI)"),
                                          ("hard pass@1", "Final pass@1, hard prompts m >= 25 (95 % CI)",
                                           {"init": False}),
                                          ("distinct", "Distinct correct answers (95 % CI)")],
                          legend={"loc": "lower left"})
    save_study_figure(fig, args.out, f"AER on mixed-difficulty arithmetic: {args.seeds} seeds ({args.seed0}+), "
                      f"{args.steps} GRPO steps", quick=args.quick)


if __name__ == "__main__":
    main()
