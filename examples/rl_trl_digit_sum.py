"""TRL's GRPOTrainer with entrokit's entropy control, on the digit-sum task
==========================================================================

The digit-sum task of the other reproductions (emit 4 digits whose sum is the prompted
target 0..36), trained with TRL's ``GRPOTrainer`` instead of our reference loop: the policy is
a tiny Qwen2 transformer built from a config (random weights; its head gets a bias of -9
nats on the non-digit tokens, as a pre-trained model puts little mass on irrelevant words)
and the tokenizer a word-level
vocabulary built in code, so nothing is downloaded. entrokit enters through
:class:`entrokit.rl.integrations.trl.EntropyControlGRPOTrainer`: the completion's
log-probabilities and token entropies come from :func:`entrokit.rl.token_logprob_entropy`
(no (T, V) logits), and the intervention, an entropy bonus whose coefficient a
:class:`~entrokit.rl.PIController` sets to hold the entropy at a target, is added to TRL's
loss.

Two runs from the same initial weights and data order: TRL's GRPO with the coefficient fixed
at 0 (entrokit only measures the entropy), and the same with the controller (target 0.75 x the
entropy at initialisation; ``PIController.tuned`` with gain 20 and contraction 0.3, coefficient
capped at 0.05); 16 prompts x 8
completions per batch, each batch used for 2 optimizer steps, Adam 5e-3, no KL. Before and after
training, every target is sampled 32 times at temperature 1: pass@1, distinct correct answers
and the exact mean token entropy. The example prints what it measured and draws the
entropy and coefficient the trainer logged. It shows that the integration works outside our
own loop; it is not a study (one seed, no interval).

Needs the ``trl`` extra (``pip install 'entrokit[trl]'``).

Run: ``python examples/rl_trl_digit_sum.py [--steps 200] [--seed 0] [--quick] [--out PATH]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, PrinterCallback, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from entrokit.plotting import FIGURE_STYLE, save_figure  # noqa: E402
from entrokit.rl import FixedCoef, PIController, token_entropy  # noqa: E402
from entrokit.rl.integrations.trl import EntropyControl, EntropyControlGRPOTrainer  # noqa: E402

DIGITS, TARGETS, LENGTH, PRIOR, TARGET = [str(d) for d in range(10)], list(range(37)), 4, 9.0, 0.75
# the controller: plant gain dH/dc of 20 nats per unit coefficient and a cap of 0.05 (with gain 5 and
# a cap of 0.5 the coefficient overshoots and the mass moves onto the non-digit tokens)
GAIN, COEF_MAX = 20.0, 0.05
WORDS = ["<pad>", "<eos>", "<unk>"] + DIGITS + [f"t{t}" for t in TARGETS]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the ten digits, one token per target, and the specials."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(seed: int) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (d = 64) with random weights drawn from ``seed`` and a biased head."""
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
        # a head with a bias: -PRIOR nats on every non-digit token, as a pre-trained model puts
        # little mass on irrelevant words (the prior of rl_aent_noise_tokens.py)
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.fill_(-PRIOR)
            head.bias[[WORDS.index(d) for d in DIGITS]] = 0.0
        model.lm_head = head
    return model


def score(completion: str, target: int) -> float:
    """1 when the first 4 tokens are digits summing to ``target``."""
    toks = completion.split()[:LENGTH]
    return float(len(toks) == LENGTH and all(t in DIGITS for t in toks) and sum(map(int, toks)) == target)


def digit_sum_reward(completions, target, **kwargs):
    return [score(c, t) for c, t in zip(completions, target)]


@torch.no_grad()
def evaluate(model, tok, samples: int, seed: int) -> dict[str, float]:
    """pass@1, distinct correct answers and mean token entropy over ``samples`` per target."""
    model.eval()
    prompts = [f"t{t}" for t in TARGETS for _ in range(samples)]
    ids = tok(prompts, return_tensors="pt").input_ids
    torch.manual_seed(seed)  # generate() draws from the global generator
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=LENGTH, min_new_tokens=LENGTH, pad_token_id=0)
    comp = out[:, ids.shape[1]:]
    text = tok.batch_decode(comp, skip_special_tokens=True)
    rewards = [score(c, t) for c, t in zip(text, (t for t in TARGETS for _ in range(samples)))]
    logits = model(out).logits[:, ids.shape[1] - 1:-1]
    ent = token_entropy(logits)
    correct = {(p, c) for p, c, r in zip(prompts, text, rewards) if r}
    model.train()
    return {"pass@1": sum(rewards) / len(rewards), "distinct": float(len(correct)), "entropy": float(ent.mean())}


def train(arm: str, args, tok, workdir: str) -> tuple[dict, dict, list[dict]]:
    model = make_model(args.seed)
    before = evaluate(model, tok, args.eval_samples, seed=10**6 + args.seed)
    if arm == "grpo":
        control = EntropyControl(controller=FixedCoef(0.0, sync=False))
    else:  # hold TARGET x the entropy at initialisation (sampled completions of every target)
        control = EntropyControl(controller=PIController.tuned(TARGET * before["entropy"], gain=GAIN, lam=0.3, coef=0.0,
                                                               coef_min=0.0, coef_max=COEF_MAX, sync=False))
    data = Dataset.from_dict({"prompt": [f"t{t}" for t in TARGETS] * 200, "target": TARGETS * 200})
    config = GRPOConfig(
        output_dir=os.path.join(workdir, arm), per_device_train_batch_size=128, num_generations=8,
        max_completion_length=LENGTH, max_steps=args.steps, learning_rate=args.lr, num_iterations=2, beta=0.0,
        temperature=1.0, logging_steps=1, report_to="none", use_cpu=True, seed=args.seed, save_strategy="no",
        dataloader_num_workers=0, bf16=False, disable_tqdm=True, log_completions=False,
    )
    trainer = EntropyControlGRPOTrainer(model=model, reward_funcs=digit_sum_reward, args=config, train_dataset=data,
                                        processing_class=tok, entropy_control=control)
    trainer.remove_callback(PrinterCallback)  # the example prints its own summary
    trainer.train()
    after = evaluate(trainer.model, tok, args.eval_samples, seed=2 * 10**6 + args.seed)
    logs = [h for h in trainer.state.log_history if "entrokit/entropy" in h]
    return before, after, logs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 3 steps, 4 samples per target")
    ap.add_argument("--out", default=os.path.join("examples", "figures", "rl_trl_digit_sum.png"))
    args = ap.parse_args()
    args.eval_samples = 4 if args.quick else 32
    if args.quick:
        args.steps = 3
    torch.set_num_threads(1)
    tok = make_tokenizer()
    runs = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as workdir:
        for arm in ("grpo", "control"):
            runs[arm] = train(arm, args, tok, workdir)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"TRL GRPOTrainer + entrokit, digit-sum (4 digits), Qwen2 2 x 64 from a config, 16 prompts x 8 completions, "
          f"2 iterations per batch, lr {args.lr:g}, {args.steps} steps, seed {args.seed}; wall {wall:.0f} s, process "
          f"CPU {cpu:.0f} s; load average {os.getloadavg()[0]:.1f}")
    labels = {"grpo": "TRL GRPO (coef 0, measured)", "control": "TRL GRPO + entrokit PI control"}
    print(f"{'run':32s} {'pass@1 before':>14s} {'after':>7s} {'distinct before':>16s} {'after':>6s} "
          f"{'H before':>9s} {'after':>6s} {'final coef':>11s}")
    for arm, (before, after, logs) in runs.items():
        coef = logs[-1].get("entrokit/coef", float("nan")) if logs else float("nan")
        print(f"{labels[arm]:32s} {before['pass@1']:14.3f} {after['pass@1']:7.3f} {before['distinct']:16.0f} "
              f"{after['distinct']:6.0f} {before['entropy']:9.3f} {after['entropy']:6.3f} {coef:11.4f}")
    tag = " [--quick smoke run: a check that it runs, not a result]" if args.quick else ""
    b, a = runs["control"][1], runs["grpo"][1]
    print(f"measured: entrokit's op and controller ran inside GRPOTrainer for {args.steps} steps; final entropy "
          f"{a['entropy']:.3f} (coef 0) vs {b['entropy']:.3f} (controlled), pass@1 {a['pass@1']:.3f} vs "
          f"{b['pass@1']:.3f}{tag}")

    plt.rcParams.update(FIGURE_STYLE)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = {"grpo": "tab:gray", "control": "tab:green"}
    for arm, (_, _, logs) in runs.items():
        steps = range(1, len(logs) + 1)
        axes[0].plot(steps, [h["entrokit/entropy"] for h in logs], color=colors[arm], label=labels[arm])
        axes[1].plot(steps, [h.get("entrokit/coef", 0.0) for h in logs], color=colors[arm])
        rew = [(i, h["reward"]) for i, h in enumerate(logs, 1) if "reward" in h]  # logged on generation steps
        axes[2].plot([i for i, _ in rew], [r for _, r in rew], color=colors[arm])
    target = runs["control"][0]["entropy"] * TARGET
    axes[0].axhline(target, color="tab:green", ls="--", lw=1, label="target")
    axes[0].set_title("Completion entropy (entrokit's op)")
    axes[0].set_ylabel("nats / token")
    axes[0].legend(loc="best")
    axes[1].set_title("Bonus coefficient (controller)")
    axes[2].set_title("Mean reward of the rollouts")
    for ax in axes:
        ax.set_xlabel("GRPOTrainer step")
    fig.suptitle(("[smoke run] " if args.quick else "") + f"TRL GRPOTrainer with entrokit on digit-sum: seed "
                 f"{args.seed}, {args.steps} steps", fontsize=11)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=110)


if __name__ == "__main__":
    main()
