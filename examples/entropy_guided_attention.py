"""Entropy-guided attention on a tiny softmax-only LM (Jha & Reagen 2025).

Synthetic copy task: vocabulary 32, length T = 32; the first 16 tokens follow a random sparse
bigram chain, the last 16 repeat them (needs induction-style heads). Batch 32, AdamW lr 3e-3. Decoder-only model,
L = 4 layers, H = 4 heads, d = 64, learned positions. Configurations:

  A  baseline: pre-LayerNorm + GELU FFN
  B  SM: no LayerNorm, no FFN activation, fused d x d FFN, plain residual
  C  SM + ScFFN: B with learnable FFN scaling (beta x + FFN(x) / alpha)
  D  EReg(SM(t) + ScFFN): C + learnable per-head/position temperature + entropy band regulariser

Prints eval loss on the repeated half, the per-(layer, head) entropy, the paper's quartile
fractions (relative to the largest observed head entropy) and whether training hit NaN.
Run: python examples/entropy_guided_attention.py [--steps 400] [--out examples/out/entropy_guided_attention.png]
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

from entrokit.regularizers import (  # noqa: E402
    AttentionEntropyRecorder,
    EntropyBandRegularizer,
    LearnableSoftmaxTemperature,
    ScaledFFN,
    plot_heatmap,
    quartile_fractions,
)

V, T, HALF, L, H, D = 32, 32, 16, 4, 4, 64
BATCH = 32


def make_bigram(g: torch.Generator) -> torch.Tensor:
    # each token has 3 allowed successors with random probabilities
    P = torch.zeros(V, V)
    for v in range(V):
        nxt = torch.randperm(V, generator=g)[:3]
        P[v, nxt] = torch.rand(3, generator=g) + 0.2
    return P / P.sum(1, keepdim=True)


def sample(P: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, HALF, dtype=torch.long)
    x[:, 0] = torch.randint(V, (n,), generator=g)
    for t in range(1, HALF):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g).squeeze(1)
    return torch.cat([x, x], 1)


class Attention(nn.Module):
    def __init__(self, temperature: bool):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)
        self.temp = LearnableSoftmaxTemperature(H, T) if temperature else None
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril())

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        m = self.causal[:n, :n]
        if self.temp is not None:
            a = self.temp(s, m)  # softmax(s / t_{h,i}), learnable temperature
        else:
            a = torch.softmax(s.masked_fill(~m, -math.inf), -1)
        self.attention_probs = a
        return self.o((a @ v).transpose(1, 2).reshape(B, n, D))


class Block(nn.Module):
    def __init__(self, cfg: str):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(temperature=cfg == "D")
        if cfg == "A":
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        elif cfg == "B":
            self.ffn = nn.Linear(D, D)  # FFN_in @ FFN_out fused (no activation)
        else:
            self.ffn = ScaledFFN(nn.Linear(D, D))  # X_out = beta X + FFN(X) / alpha

    def forward(self, x):
        if self.cfg == "A":
            x = x + self.attn(self.ln1(x))
            return x + self.ffn(self.ln2(x))
        x = x + self.attn(x)
        return self.ffn(x) if self.cfg in ("C", "D") else x + self.ffn(x)


class LM(nn.Module):
    def __init__(self, cfg: str):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        self.ln = nn.LayerNorm(D) if cfg == "A" else nn.Identity()
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))

    def attentions(self):
        return [b.attn.attention_probs for b in self.blocks]


def run(cfg: str, steps: int, lam_mean: float, P, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = LM(cfg)
    reg = EntropyBandRegularizer(L, H, lam=lam_mean / (BATCH * T), gamma=0.2) if cfg == "D" else None
    params = list(model.parameters()) + ([] if reg is None else list(reg.parameters()))
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses, nan_at = [], None
    for step in range(steps):
        x = sample(P, BATCH, g)
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        loss = ce + (reg(model.attentions()) if reg is not None else 0.0)  # L_CE + lambda L_ent
        if not torch.isfinite(loss):
            nan_at = step
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    # evaluation on a fixed batch: loss on the repeated half + entropy per (layer, head)
    model.eval()
    ge = torch.Generator().manual_seed(1234)
    xe = sample(P, 256, ge)
    rec = AttentionEntropyRecorder(model, mha=False, sdpa=False)
    for i, b in enumerate(model.blocks):
        rec.register(b.attn, name=f"layer{i}")
    with torch.no_grad(), rec:
        logits = model(xe[:, :-1])
    ev = F.cross_entropy(logits[:, HALF - 1 :].reshape(-1, V), xe[:, HALF:].reshape(-1)).item()
    return dict(losses=losses, eval=ev, nan_at=nan_at, ent=rec.entropy, names=rec.names,
                nent=rec.normalized_entropy,
                theta=None if reg is None else reg.theta.detach().clone())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lam", type=float, default=0.1, help="mean-reduced lambda; lam_sum = lam / (B*T)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out/entropy_guided_attention.png")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    P = make_bigram(torch.Generator().manual_seed(99))
    names = {"A": "A: LN+GELU", "B": "B: SM", "C": "C: SM+ScFFN", "D": f"D: EReg(SM(t)+ScFFN), lam={args.lam}"}
    res = {}
    for cfg in "ABCD":
        t0 = time.time()
        res[cfg] = r = run(cfg, args.steps, args.lam, P, args.seed)
        q = quartile_fractions(r["ent"])
        print(f"{names[cfg]:40s} eval CE (repeated half) {r['eval']:.4f}  final train CE "
              f"{r['losses'][-1] if r['losses'] else float('nan'):.4f}  NaN at step {r['nan_at']}  "
              f"quartiles [0,1/4,1/2,3/4] {[round(v, 3) for v in q.tolist()]}  ({time.time() - t0:.0f}s)")
        print("   mean head entropy per layer:", [round(v, 3) for v in r["ent"].mean(1).tolist()],
              " min head:", round(r["ent"].min().item(), 3), " max head:", round(r["ent"].max().item(), 3),
              f" (log T = {math.log(T):.3f})")
        qn = quartile_fractions(r["ent"], r["nent"], reference="log_n")
        print("   quartiles w.r.t. log(#visible keys) (normalised entropy):", [round(v, 3) for v in qn.tolist()],
              " mean normalised entropy per layer:", [round(v, 3) for v in r["nent"].mean(1).tolist()])
        if r["theta"] is not None:
            print("   learned theta:", [[round(v, 3) for v in row] for row in r["theta"].tolist()])
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), layout="constrained")
    for j, cfg in enumerate("ABCD"):
        plot_heatmap(res[cfg]["ent"], res[cfg]["names"], ax=axes[0, j], vmax=math.log(T), title=names[cfg])
    ax = axes[1, 0]
    for cfg in "ABCD":
        ls = torch.tensor(res[cfg]["losses"])
        k = 20
        if len(ls) > k:
            ls = ls.unfold(0, k, 1).mean(1)
        ax.plot(ls.numpy(), label=names[cfg])
    ax.set_xlabel("step")
    ax.set_ylabel("train CE (moving avg)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    w = 0.2
    for j, cfg in enumerate("ABCD"):
        ax.bar([i + j * w for i in range(4)], quartile_fractions(res[cfg]["ent"]).numpy(), w, label=cfg)
    ax.set_xticks([i + 1.5 * w for i in range(4)], ["[0,1/4)", "[1/4,1/2)", "[1/2,3/4)", "[3/4,1]"])
    ax.set_ylabel("fraction of heads (rel. to max head entropy)")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    ax.bar(list("ABCD"), [res[c]["eval"] for c in "ABCD"])
    ax.set_ylabel("eval CE on repeated half")
    ax = axes[1, 3]
    for j, cfg in enumerate("ABCD"):
        qn = quartile_fractions(res[cfg]["ent"], res[cfg]["nent"], reference="log_n")
        ax.bar([i + j * w for i in range(4)], qn.numpy(), w, label=cfg)
    ax.set_xticks([i + 1.5 * w for i in range(4)], ["[0,1/4)", "[1/4,1/2)", "[1/2,3/4)", "[3/4,1]"])
    ax.set_ylabel("fraction of heads (normalised by log #keys)")
    ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
