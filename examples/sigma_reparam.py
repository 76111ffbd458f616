"""σReparam vs plain training of a LayerNorm-free transformer at a high learning rate (Zhai et al. 2023).

Task (synthetic): sequences of T = 32 tokens over a vocabulary of 10; one token is boosted
(probability 0.25) and the label is the most frequent token. Model: 2 layers, 4 heads, d = 64,
**no LayerNorm**, ReLU FFN, mean pooling, attention via F.scaled_dot_product_attention (the
AttentionEntropyRecorder captures it). Adam, no warm-up, no weight decay, batch 32.
Runs: lr 1e-2 (high) and lr 1e-3 (control), each without and with σReparam on every Linear.
Prints final loss/accuracy and mean attention entropy per layer; plots entropy and loss curves.
Run: python examples/sigma_reparam.py [--steps 300] [--out examples/out/sigma_reparam.png]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from entrokit.regularizers import AttentionEntropyRecorder, convert_to_sigma_reparam  # noqa: E402

V, T, L, H, D, B = 10, 32, 2, 4, 64, 32


def sample(n: int, g: torch.Generator):
    c = torch.randint(V, (n,), generator=g)
    p = torch.full((n, V), 0.75 / (V - 1))
    p[torch.arange(n), c] = 0.25
    x = torch.multinomial(p, T, replacement=True, generator=g)
    y = F.one_hot(x, V).sum(1).argmax(1)
    return x, y


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)
        self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, D))  # no LayerNorm anywhere
        return x + self.ffn(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.5)
        self.blocks = nn.Sequential(*[Block() for _ in range(L)])
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.blocks(self.emb(x) + self.pos).mean(1))


def run(lr: float, sigma: bool, steps: int, seed: int, xe, ye):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = Net()
    if sigma:
        convert_to_sigma_reparam(model)  # every Linear: W_hat = gamma / sigma(W) * W
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, ent_steps, ents, nan_at = [], [], [], None
    rec = AttentionEntropyRecorder(model)
    for step in range(steps):
        x, y = sample(B, g)
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            nan_at = step
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            rec.reset()
            with torch.no_grad(), rec:
                model(xe[:128])
            ent_steps.append(step)
            ents.append(rec.entropy.mean(1))  # mean over heads, per layer
    with torch.no_grad():
        logits = model(xe)
        acc = (logits.argmax(1) == ye).float().mean().item()
        ev = F.cross_entropy(logits, ye).item()
    return dict(losses=losses, ent_steps=ent_steps, ents=torch.stack(ents) if ents else None,
                acc=acc, eval=ev, nan_at=nan_at, head_ent=rec.entropy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out/sigma_reparam.png")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xe, ye = sample(1000, torch.Generator().manual_seed(777))
    runs = {}
    for lr in (1e-2, 1e-3):
        for sigma in (False, True):
            t0 = time.time()
            r = runs[(lr, sigma)] = run(lr, sigma, args.steps, args.seed, xe, ye)
            e = r["ents"]
            print(f"lr={lr:g} {'sigmaReparam' if sigma else 'baseline    '}: eval CE {r['eval']:.4f} acc {r['acc']:.3f} "
                  f"final train CE {r['losses'][-1]:.4f} max train CE after step 20 {max(r['losses'][20:]):.3f} "
                  f"NaN at {r['nan_at']} | entropy per layer: start {[round(v, 3) for v in e[0].tolist()]} "
                  f"min {[round(v, 3) for v in e.min(0).values.tolist()]} end {[round(v, 3) for v in e[-1].tolist()]} "
                  f"(log T = {math.log(T):.3f}; {time.time() - t0:.0f}s)")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for (lr, sigma), r in runs.items():
        lab = f"lr={lr:g}, {'σReparam' if sigma else 'baseline'}"
        st = "-" if sigma else "--"
        col = "C0" if lr == 1e-2 else "C1"
        for li in range(L):
            axes[li].plot(r["ent_steps"], r["ents"][:, li].numpy(), st, color=col, label=lab)
        ls = torch.tensor(r["losses"])
        axes[2].plot(ls.unfold(0, 10, 1).mean(1).numpy(), st, color=col, label=lab)
    for li in range(L):
        axes[li].set_title(f"layer {li}: mean attention entropy (eval batch)")
        axes[li].axhline(math.log(T), color="gray", lw=0.5)
        axes[li].set_xlabel("step")
        axes[li].legend(fontsize=7)
    axes[2].set_title("train CE (moving avg 10)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
