"""Attention entropy of a Hugging Face GPT-2
=========================================

Attention entropy and the entropy band regulariser on a Hugging Face GPT-2 (random weights).

Shows the Hugging Face path of entrokit.regularizers on
``GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64))``
built from the config alone (nothing is downloaded). Needs ``transformers``.

* The model must run the **eager** attention (``attn_implementation="eager"``): the SDPA and
  flash kernels never form the attention probabilities, so neither the recorder nor
  ``output_attentions`` can see them.
* Attention dropout is set to 0: in training mode transformers returns the weights *after*
  dropout, which are no longer probabilities.
* ``AttentionEntropyRecorder(model).register_hf()`` hooks every ``GPT2Attention`` and records a
  layer x head map of mean entropies; the causal mask and the padding mask (passed as
  ``attention_mask=``) decide which keys and queries count.
* ``EntropyBandRegularizer`` takes ``outputs.attentions`` and ``query_mask=attention_mask.bool()``
  so padded positions do not enter the penalty. It is registered as a submodule of the model
  (``model.entropy_reg``), where DDP would all-reduce its thresholds.

Data: random token strings of 6-12 tokens followed by a copy, right-padded to 24 tokens.
Training: AdamW, CE on real tokens + lam * band penalty. Printed: the entropy map before and
after training, the penalty and the learned thresholds.

Run: ``python examples/hf_gpt2_entropy.py [--steps 150] [--lam 0.1] [--quick] [--out PATH]``
"""

from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from entrokit.plotting import FIGURE_STYLE, save_figure  # noqa: E402
from entrokit.regularizers import AttentionEntropyRecorder, EntropyBandRegularizer  # noqa: E402

plt.rcParams.update(FIGURE_STYLE)

VOCAB, MAXLEN, PAD = 64, 24, 0


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded copy sequences ``(ids, attention_mask)``, tokens 1..VOCAB-1, pad 0."""
    ids = torch.full((n, MAXLEN), PAD, dtype=torch.long)
    am = torch.zeros(n, MAXLEN, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(6, MAXLEN // 2 + 1, (1,), generator=g))
        s = torch.randint(1, VOCAB, (k,), generator=g)
        ids[i, : 2 * k] = torch.cat([s, s])
        am[i, : 2 * k] = 1
    return ids, am


def entropy_map(model, ids, am) -> tuple[torch.Tensor, list[str]]:
    model.eval()
    with AttentionEntropyRecorder(model).register_hf() as rec, torch.no_grad():
        model(ids, attention_mask=am)
    model.train()
    return rec.entropy, rec.names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lam", type=float, default=0.1, help="lambda in mean units (lam / (batch x tokens))")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="20 steps (smoke test)")
    ap.add_argument("--out", default=os.path.join("examples", "figures", "hf_gpt2_entropy.png"))
    args = ap.parse_args()
    if args.quick:
        args.steps = 20
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel  # the optional dependency

    t0 = time.time()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
                     attn_pdrop=0.0, bos_token_id=PAD, eos_token_id=PAD, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).train()
    reg = EntropyBandRegularizer(cfg.n_layer, cfg.n_head, lam=args.lam / (args.batch * MAXLEN), gamma=0.2)
    model.entropy_reg = reg  # theta lives inside the model (DDP all-reduces it with the rest)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids_eval, am_eval = batch(128, torch.Generator().manual_seed(2))
    before, names = entropy_map(model, ids_eval, am_eval)
    ces, pens = [], []
    for _ in range(args.steps):
        ids, am = batch(args.batch, g)
        out = model(ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100), output_attentions=True)
        pen = reg(out.attentions, query_mask=am.bool())  # padded queries do not count
        loss = out.loss + pen
        opt.zero_grad()
        loss.backward()
        opt.step()
        ces.append(out.loss.item())
        pens.append(pen.item())
    after, _ = entropy_map(model, ids_eval, am_eval)
    print(f"tiny GPT-2 (2 layers x 2 heads, d=32, random init, eager attention), {args.steps} steps, "
          f"lam = {args.lam:g} (mean units), gamma = 0.2; log({MAXLEN}) = {math.log(MAXLEN):.3f}")
    for n, b, a in zip(names, before.tolist(), after.tolist()):
        print(f"  {n}: head entropy before {[round(v, 3) for v in b]} -> after {[round(v, 3) for v in a]} nats")
    k = max(1, args.steps // 10)
    print(f"train CE {np.mean(ces[:k]):.3f} (first {k} steps) -> {np.mean(ces[-k:]):.3f} (last {k}); "
          f"lam * penalty {np.mean(pens[:k]):.4f} -> {np.mean(pens[-k:]):.4f}")
    print("learned theta:", [[round(v, 3) for v in row] for row in reg.theta.detach().tolist()])
    print(f"elapsed {time.time() - t0:.1f} s")

    fig, ax = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    vmax = max(before.max().item(), after.max().item())
    for a, e, t in ((ax[0], before, "before training"), (ax[1], after, f"after {args.steps} steps")):
        im = a.imshow(e.numpy(), vmin=0, vmax=vmax, cmap="viridis")
        for (i, j), v in np.ndenumerate(e.numpy()):
            a.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=10)
        a.set_xticks(range(e.shape[1]))
        a.set_yticks(range(e.shape[0]), names)
        a.set_xlabel("head")
        a.set_title(f"GPT-2 head entropy (nats), {t}")
        fig.colorbar(im, ax=a)
    ax[2].plot(ces, label="train CE")
    ax[2].plot(pens, label="lam x band penalty")
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("loss (log scale)")
    ax[2].set_yscale("log")
    ax[2].set_title("training losses")
    ax[2].legend()
    save_figure(fig, args.out, dpi=100)


if __name__ == "__main__":
    main()
