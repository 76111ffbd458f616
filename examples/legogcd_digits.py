"""LegoGCD on digits: SimGCD-style baseline vs + LER + DKL (generalized category discovery).

Setting (Cao et al., CVPR 2024, on a toy scale): scikit-learn ``load_digits``,
standardised; known classes 0-4, novel classes 5-9. Half of the known-class samples are
labelled; the unlabelled set holds the other known-class samples and all novel ones.
Accuracy is measured on the unlabelled set with Hungarian matching over all ten classes
(``scipy.optimize.linear_sum_assignment``, the "v2" protocol), split into All/Old/New.

Model: MLP 64-256-128 (GELU) -> L2 normalisation -> weight-normalised prototype layer
(K = 10, no bias), so logits are cosine similarities as in SimGCD. Two views per sample
(Gaussian jitter sigma = 0.3 and 20 % feature dropout).

Baseline ("SimGCD-lite", no representation-learning losses): supervised CE on labelled
rows (tau_s = 0.1), cross-view self-distillation with teacher temperature 0.07 -> 0.04
over the first 30 % of epochs, mean-entropy regulariser with weight eps = 2, combined as
(1 - 0.35) * unsup + 0.35 * sup. LegoGCD adds the dual-view KL inside the unsupervised
term and beta * LER (beta = 1, delta = 0.9, tau_o = 0.05, lam_ler = 0.4, prior momentum
0.999). Adam lr 1e-3, batch 128.

Run: ``python examples/legogcd_digits.py [--seeds 3] [--epochs 100] [--out PATH]``
"""

from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits

from entrokit.plotting import save_figure
from entrokit.regularizers.legogcd import LocalEntropyRegularizer, dual_view_kl

K, KNOWN = 10, 5


class GCDNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 128)
        )
        self.proto = torch.nn.Parameter(torch.randn(K, 128) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.body(x), dim=1)
        return f @ F.normalize(self.proto, dim=1).T  # cosine logits in [-1, 1]


def split(seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    labelled = np.zeros(len(y), dtype=bool)
    known_idx = np.flatnonzero(y < KNOWN)
    labelled[rng.choice(known_idx, len(known_idx) // 2, replace=False)] = True
    return (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), torch.as_tensor(labelled))


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    w = np.zeros((K, K), dtype=np.int64)
    for p, t in zip(y_pred, y_true):
        w[p, t] += 1
    r, c = linear_sum_assignment(w.max() - w)
    mapping = dict(zip(r, c))
    hit = np.array([mapping[p] == t for p, t in zip(y_pred, y_true)])
    old = y_true < KNOWN
    return hit.mean(), hit[old].mean(), hit[~old].mean()


def view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=g) > 0.2).float()
    return (x + 0.3 * torch.randn(x.shape, generator=g)) * keep


def run(method: str, seed: int, epochs: int, beta: float = 1.0, eps: float = 2.0):
    x, y, lab = split(seed)
    torch.manual_seed(seed)
    net = GCDNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ler = LocalEntropyRegularizer(K, KNOWN, threshold=0.9) if method == "lego" else None
    g = torch.Generator().manual_seed(seed)
    warm = max(1, int(0.3 * epochs))
    hist = []
    unl = ~lab
    for ep in range(epochs):
        tau_t = 0.07 + (0.04 - 0.07) * min(ep, warm - 1) / max(1, warm - 1)
        net.train()
        perm = torch.randperm(len(x), generator=g)
        n_sel = 0
        for s in range(0, len(x), 128):
            idx = perm[s : s + 128]
            z = net(torch.cat([view(x[idx], g), view(x[idx], g)]))  # [2b, K], view 1 then view 2
            m2 = torch.cat([lab[idx], lab[idx]])
            y2 = torch.cat([y[idx], y[idx]])
            sup = F.cross_entropy(z[m2] / 0.1, y2[m2]) if m2.any() else z.sum() * 0
            t1, t2 = F.softmax(z.detach() / tau_t, 1).chunk(2)
            ls1, ls2 = F.log_softmax(z / 0.1, 1).chunk(2)
            unsup = 0.5 * (-(t2 * ls1).sum(1).mean() - (t1 * ls2).sum(1).mean())
            pbar = F.softmax(z / 0.1, 1).mean(0)
            unsup = unsup + eps * (math.log(K) + (pbar * pbar.log()).sum())  # eps(log K - H(pbar))
            if ler is not None:
                z1, z2 = z.chunk(2)
                unsup = unsup + dual_view_kl(z1, z2, temperature=0.1)
            loss = 0.65 * unsup + 0.35 * sup
            if ler is not None:
                loss = loss + beta * ler(z, m2)
                n_sel += ler.num_selected
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(x[unl]).argmax(1).numpy()
        hist.append((*cluster_acc(y[unl].numpy(), pred), n_sel))
    return np.array(hist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default=os.path.join("examples", "out", "legogcd_digits.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    res = {m: np.stack([run(m, s, args.epochs) for s in range(args.seeds)]) for m in ("simgcd", "lego")}
    print(f"digits GCD (old 0-4, new 5-9), {args.seeds} seeds, {args.epochs} epochs; "
          "unlabelled-set clustering accuracy (%), mean ± std")
    mid = max(0, int(0.4 * args.epochs) - 1)
    print(f"{'method':<18} {'epoch':>5} {'All':>13} {'Old':>13} {'New':>13} {'best-epoch Old':>15}")
    for m, h in res.items():
        name = "SimGCD-lite" if m == "simgcd" else "+LER+DKL (Lego)"
        best_old = h[:, :, 1].max(1) * 100
        for e in (mid, args.epochs - 1):
            acc = h[:, e, :3] * 100
            print(f"{name:<18} {e + 1:>5} "
                  + " ".join(f"{acc[:, j].mean():6.2f} ± {acc[:, j].std():4.2f}" for j in range(3))
                  + (f" {best_old.mean():8.2f} ± {best_old.std():4.2f}" if e == args.epochs - 1 else ""))
    print(f"rows selected by LER in the last epoch: {res['lego'][:, -1, 3].mean():.0f} "
          f"(of {2 * (~split(0)[2]).sum().item()} unlabelled rows per epoch)")
    print(f"elapsed {time.time() - t0:.1f} s")

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    ep = np.arange(1, args.epochs + 1)
    for m, c in (("simgcd", "tab:gray"), ("lego", "tab:green")):
        for j, name in enumerate(("All", "Old", "New")):
            a = res[m][:, :, j] * 100
            ax[j].plot(ep, a.mean(0), color=c, label="SimGCD-lite" if m == "simgcd" else "+LER+DKL")
            ax[j].fill_between(ep, a.mean(0) - a.std(0), a.mean(0) + a.std(0), color=c, alpha=0.2)
            ax[j].set(title=f"{name} classes", xlabel="epoch")
    ax[0].set_ylabel("clustering accuracy on unlabelled set (%)")
    ax[0].legend()
    fig.tight_layout()
    save_figure(fig, args.out, dpi=120)


if __name__ == "__main__":
    main()
