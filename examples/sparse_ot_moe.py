"""Mixture-of-experts routing with a k-sparse OT plan
==================================================

Toy mixture of experts: OT router (k-sparse, capacity-bounded) vs top-1 softmax routing.

Synthetic task: inputs from 8 Gaussian clusters, each with its own linear labelling into
4 classes; 4 linear experts; a linear router. Tokens are routed in groups of 64 with
expert capacity 16 (= 64 / 4). Top-1 softmax routing drops tokens that overflow an
expert's capacity (as in Switch/V-MoE); the OT router picks at most ``capacity`` tokens
per expert by construction and balances the load through the marginals. Both use the
softmax gate as combine weight and no auxiliary loss.

Run: python examples/sparse_ot_moe.py [--out examples/out/sparse_ot_moe.png]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from entrokit.nn import SparseOTRouter

D_IN, N_CLUSTERS, N_CLASSES, E, GROUP, CAP = 8, 8, 4, 4, 64, 16


def make_data(n, g, centers, W):
    c = torch.randint(0, N_CLUSTERS, (n,), generator=g)
    x = centers[c] + 0.5 * torch.randn(n, D_IN, generator=g)
    y = torch.einsum("nd,ndk->nk", x, W[c]).argmax(-1)
    return x, y


def top1_route(logits):
    gates = torch.softmax(logits, -1)
    choice = logits.argmax(-1)
    onehot = torch.nn.functional.one_hot(choice, E).bool()
    # position of each token in its expert's queue; overflow is dropped
    pos = torch.cumsum(onehot.long(), dim=-2) * onehot
    dispatch = onehot & (pos <= CAP)
    return dispatch, gates * dispatch


class MoE(torch.nn.Module):
    def __init__(self, router: str):
        super().__init__()
        self.router_kind = router
        self.gate = torch.nn.Linear(D_IN, E)
        self.experts = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.ReLU(), torch.nn.Linear(32, N_CLASSES))
             for _ in range(E)])
        self.ot = SparseOTRouter(num_experts=E, capacity=CAP)

    def forward(self, x):
        xg = x.reshape(-1, GROUP, D_IN)
        logits = self.gate(xg)
        if self.router_kind == "ot":
            out = self.ot(logits)
            dispatch, combine = out.dispatch, out.combine
        else:
            dispatch, combine = top1_route(logits)
        y = sum(combine[..., e : e + 1] * self.experts[e](xg) for e in range(E))
        return y.reshape(-1, N_CLASSES), dispatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/out/sparse_ot_moe.png")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(N_CLUSTERS, D_IN, generator=g)
    centers[:, 0] += 4.0  # skewed inputs: a naive router overloads some experts
    W = torch.randn(N_CLUSTERS, D_IN, N_CLASSES, generator=g)
    xtr, ytr = make_data(256 * 40, g, centers, W)
    xte, yte = make_data(GROUP * 64, g, centers, W)
    hist, final = {}, {}
    for kind in ["top1", "ot"]:
        torch.manual_seed(1)
        model = MoE(kind)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gb = torch.Generator().manual_seed(2)
        hist[kind] = []
        t0 = time.perf_counter()
        for step in range(args.steps):
            idx = torch.randint(0, len(xtr), (256,), generator=gb)
            logits, _ = model(xtr[idx])
            loss = torch.nn.functional.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 20 == 0 or step == args.steps - 1:
                with torch.no_grad():
                    lt, disp = model(xte)
                    acc = float((lt.argmax(-1) == yte).float().mean())
                    dropped = float((disp.sum(-1) == 0).float().mean())
                    load = disp.sum(-2).float()  # tokens per expert per group
                    imb = float((load.max(-1).values / (GROUP / E)).mean())
                hist[kind].append((step, acc, dropped, imb))
        final[kind] = hist[kind][-1] + (time.perf_counter() - t0,)
    print(f"{'router':<8}{'test acc':>10}{'dropped':>10}{'max load / fair':>17}{'train time [s]':>16}")
    for kind, (_, acc, dropped, imb, dt) in final.items():
        print(f"{kind:<8}{acc:>10.4f}{dropped:>10.4f}{imb:>17.3f}{dt:>16.1f}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for kind, h in hist.items():
        s = [r[0] for r in h]
        for ax, i, name in zip(axes, (1, 2, 3), ("test accuracy", "dropped tokens (fraction)", "max expert load / fair load")):
            ax.plot(s, [r[i] for r in h], label="OT router (k-sparse)" if kind == "ot" else "top-1 softmax")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print("saved", args.out)


if __name__ == "__main__":
    main()
