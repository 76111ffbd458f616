"""The entropy mechanism of GRPO: collapse, the R = -a exp(H) + b law, Clip-Cov and KL-Cov
==========================================================================================

Does plain GRPO collapse on a toy verifiable-reward task, does the fitted law hold, and do
the official Clip-Cov / KL-Cov settings keep the entropy up?

Claims (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models"). (1) Without entropy intervention the policy entropy collapses early and
performance saturates; (2) performance and entropy follow R = -a exp(H) + b (their Eq. 1,
fitted with high R^2); (3) Clip-Cov and KL-Cov, which restrain the few tokens of largest
covariance between log-probability and advantage, keep the entropy far above GRPO's (their
Fig. 9: over 10x higher at the end of training).

Regime (``../shared/docs/anchors_rl.md`` section 4, the measured pilot): digit-sum (emit 4
digits that sum to the prompted target 0..36; ``entrokit.rl.toy.DigitSum``), a GRU policy
(hidden 128) trained from scratch, GRPO with 32 prompts x 8 samples, 4 PPO epochs per
rollout, Adam 3e-3, no KL: the off-policy reuse that makes collapse appear. The test of
claim (1) is: final / initial entropy < 0.15 and fewer distinct correct answers than at
initialisation. Arms, from the same initial weights per seed (paired):

* GRPO: token-mean clipped surrogate, clip 0.2 (``entrokit.rl.toy.grpo_objective``);
* Clip-Cov "official": ``clip_cov_policy_loss(preset="official")`` (0.02 % of tokens drawn
  from 1 < cov < 5, PPO clip 1 as in the recipe);
* KL-Cov "official": ``kl_cov_policy_loss(preset="official")`` (0.2 % of tokens, beta 1).

Measures (``entrokit.rl.toy.evaluate``, 128 samples per target at the end): pass@1, pass@64
(unbiased), distinct correct answers, coverage (distinct / the 10^4 correct answers that
exist) and the per-step rollout entropy. Law: fitted per GRPO seed on the checkpoints (every
10 steps, pass@1 and entropy from 16 samples per target). Every number is a mean over seeds
with a 95 % t-interval; method - GRPO differences are paired by seed.

``--cov-ratio r`` replaces both presets' token ratios by ``r`` (a test of scale: the official
ratios touch 1-2 of the 1024 tokens of a toy batch); the claim (3) is about the official preset.

Run: ``python examples/rl_entropy_mechanism.py [--seeds 5] [--seed0 0] [--steps 200] [--cov-ratio R] [--quick] [--out PATH]``
"""

from __future__ import annotations

import functools
import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from entrokit.plotting import format_ci95, mean_ci95  # noqa: E402
from entrokit.rl.losses import clip_cov_policy_loss, kl_cov_policy_loss  # noqa: E402
from entrokit.rl.toy import DigitSum, grpo_objective  # noqa: E402
from entrokit.rl.toy.study import (  # noqa: E402
    Arm,
    apply_quick,
    fit_entropy_law,
    paired_diff,
    run_or_load,
    save_study_figure,
    study_figure,
    study_parser,
)

fmt = functools.partial(format_ci95, digits=3, width=6)


def make_arms(ratio: float | None = None) -> list[Arm]:
    """GRPO, Clip-Cov and KL-Cov with the official preset, or with both ratios set to ``ratio``."""
    tag = "official" if ratio is None else f"ratio {ratio:g}"

    def clip_cov(g):
        return lambda b: clip_cov_policy_loss(b.logp, b.old_logp, b.advantages, b.mask, preset="official",
                                              ratio=ratio, generator=g, check_inputs=False)

    def kl_cov(g):
        return lambda b: kl_cov_policy_loss(b.logp, b.old_logp, b.advantages, b.mask, preset="official",
                                            ratio=ratio, check_inputs=False)

    return [
        Arm("grpo", "GRPO", lambda g: grpo_objective(0.2), "tab:gray"),
        Arm("clip_cov", f"Clip-Cov ({tag})", clip_cov, "tab:blue"),
        Arm("kl_cov", f"KL-Cov ({tag})", kl_cov, "tab:green"),
    ]


METRICS = ("pass@1", "pass@64", "coverage", "distinct", "entropy")


def main() -> None:
    ap = study_parser(__doc__, steps=200, quick_steps=4, out="rl_entropy_mechanism.png")
    ap.add_argument("--cov-ratio", type=float, default=None,
                    help="share of tokens Clip-Cov and KL-Cov touch (default: the official preset's)")
    args = apply_quick(ap.parse_args())
    arms = make_arms(args.cov_ratio)
    torch.set_num_threads(1)
    task = DigitSum(4)
    cfg = {"steps": args.steps, "eval_every": 2 if args.quick else 10, "final_samples": 32 if args.quick else 128,
           "k": 32 if args.quick else 64, "prompts_per_step": 8 if args.quick else 32, "group_size": 8, "ppo_epochs": 4, "lr": 3e-3}
    k = cfg["k"]
    results, wall, cpu = run_or_load(task, arms, args, **cfg)
    print(f"digit-sum (4 digits), GRU 128, GRPO 32x8, 4 PPO epochs, lr 3e-3, {args.steps} steps, "
          f"{args.seeds} seeds ({args.seed0}+); wall {wall:.0f} s, process CPU {cpu:.0f} s; load average {os.getloadavg()[0]:.1f}")

    init = results["grpo"]
    h0 = [r["init"]["entropy"] for r in init]
    print(f"at initialisation: pass@1 {fmt([r['init']['pass@1'] for r in init])}, pass@{k} "
          f"{fmt([r['init'][f'pass@{k}'] for r in init])}, distinct {fmt([r['init']['distinct'] for r in init])}, "
          f"H {fmt(h0)}")
    names = [m if m != "pass@64" else f"pass@{k}" for m in METRICS]
    print(f"{'method':22s} " + " ".join(f"{m:>17s}" for m in names) + "   H_end/H_0")
    ratio = {}
    for arm in arms:
        rs = results[arm.name]
        ratio[arm.name] = [r["final"]["entropy"] / r["init"]["entropy"] for r in rs]
        print(f"{arm.label:22s} " + " ".join(f"{fmt([r['final'][m] for r in rs]):>17s}" for m in names)
              + f"   {fmt(ratio[arm.name])}")
    for arm in arms[1:]:
        print(f"paired {arm.label} - GRPO: " + ", ".join(
            f"{m} {fmt(paired_diff(results, arm.name, 'grpo', m))}" for m in names))

    # the law R = -a exp(H) + b, per GRPO seed, on the training checkpoints
    fits = [fit_entropy_law([c["entropy"] for c in r["checkpoints"]], [c["pass@1"] for c in r["checkpoints"]])
            for r in results["grpo"]]
    a_, b_, r2 = (list(x) for x in zip(*fits))
    print(f"law R = -a exp(H) + b on GRPO checkpoints: a {fmt(a_)}, b {fmt(b_)}, R^2 {fmt(r2)}")

    # verdict on the three claims
    collapse = [rt < 0.15 and r["final"]["distinct"] < r["init"]["distinct"]
                for rt, r in zip(ratio["grpo"], results["grpo"])]
    law_ok = mean_ci95(r2)[0] >= 0.8 and min(a_) > 0
    keep = {n: [c["final"]["entropy"] / g["final"]["entropy"] for c, g in zip(results[n], results["grpo"])]
            for n in ("clip_cov", "kl_cov")}
    for n, v in keep.items():
        print(f"entropy ratio {n} / GRPO at the end (paired): {fmt(v)} (min {min(v):.2f})")
    keep_ok = {n: mean_ci95(v)[0] - np.nan_to_num(mean_ci95(v)[1]) >= 10 for n, v in keep.items()}
    n_tok = cfg["prompts_per_step"] * cfg["group_size"] * task.length
    touched = {"clip_cov": np.mean([np.mean(r["history"]["num_dropped"]) for r in results["clip_cov"]]),
               "kl_cov": np.mean([np.mean(r["history"]["num_penalized"]) for r in results["kl_cov"]])}
    print(f"tokens touched per batch of {n_tok}: Clip-Cov {touched['clip_cov']:.1f}, KL-Cov {touched['kl_cov']:.1f}")
    parts = [
        f"(1) GRPO collapse on {sum(collapse)}/{len(collapse)} seeds (H_end/H_0 {fmt(ratio['grpo'])})",
        f"(2) law fit R^2 {fmt(r2)}" + ("" if law_ok else " (below 0.8 or a <= 0)"),
        "(3) entropy >= 10x GRPO's: " + ", ".join(
            f"{n} {mean_ci95(keep[n])[0]:.1f}x{'' if keep_ok[n] else ' (lower bound < 10x)'}" for n in keep)
        + (f" (the {'official' if args.cov_ratio is None else 'chosen'} ratios touch {touched['clip_cov']:.0f} and {touched['kl_cov']:.0f} of the {n_tok} tokens"
           " of a batch)" if not all(keep_ok.values()) else ""),
    ]
    n_ok = int(all(collapse)) + int(law_ok) + sum(keep_ok.values()) // 2
    word = "reproduced" if n_ok == 3 else ("partly reproduced" if n_ok else "not reproduced")
    tag = " [--quick smoke run: too short and too few seeds to be evidence]" if args.quick else ""
    print(f"verdict: {word}: " + "; ".join(parts) + tag)

    fig, axes = study_figure(arms, results, [None, ("pass@1", "Final pass@1 (95 % CI)"),
                                             ("distinct", "Distinct correct answers (95 % CI)")],
                             legend={"loc": "lower left"})
    ax = axes[1]
    for r in results["grpo"]:
        hs, ps = [c["entropy"] for c in r["checkpoints"]], [c["pass@1"] for c in r["checkpoints"]]
        ax.plot(hs, ps, ".", color="tab:gray", alpha=0.6)
    hh = np.linspace(0.0, max(max(c["entropy"] for c in r["checkpoints"]) for r in results["grpo"]), 100)
    ax.plot(hh, -np.mean(a_) * np.exp(hh) + np.mean(b_), "k-",
            label=f"R = -{np.mean(a_):.3f} e^H + {np.mean(b_):.2f}\nR² {fmt(r2)}")
    ax.set_xlabel("entropy (nats / token)")
    ax.set_ylabel("pass@1 (checkpoints)")
    ax.set_title("GRPO: pass@1 against entropy")
    ax.legend(loc="upper right")
    save_study_figure(fig, args.out, f"Entropy mechanism on digit-sum: {args.seeds} seeds, {args.steps} GRPO steps",
                      quick=args.quick)


if __name__ == "__main__":
    main()
