"""Two-process gloo DDP: the entropy band thresholds theta stay identical across ranks.

θ is a parameter of :class:`EntropyBandRegularizer`; DDP all-reduces its gradient only when
the regulariser is a submodule of the wrapped model. Three layouts are run on 2 ranks, each
rank seeing its own half of every global batch:

* ``in_forward``: the penalty is computed in the model's forward (with
  ``find_unused_parameters=True`` to show that it is safe there too);
* ``after_forward``: the regulariser is a submodule, the forward returns the attentions and
  the penalty is computed afterwards (the Hugging Face layout, ``find_unused_parameters=False``);
* ``outside``: the regulariser is not part of the wrapped model (the failure this guards
  against): θ drifts apart across ranks.

The first two must equal a single process on the full batches with λ / world_size (the
per-position penalty sums over the rank's own rows, DDP averages the gradients).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from entrokit.regularizers import EntropyBandRegularizer
from gloo_ranks import run_on_ranks

WORLD, L, H, D, T, V, STEPS, BATCH = 2, 2, 2, 8, 6, 11, 4, 8
LAM = 0.5
LAYOUTS = ("in_forward", "after_forward", "outside")


class TinyLM(nn.Module):
    def __init__(self, reg: EntropyBandRegularizer | None, penalty_in_forward: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.qk = nn.ParameterList(nn.Parameter(torch.randn(2, D, D, generator=g, dtype=torch.float64) / math.sqrt(D))
                                   for _ in range(L))
        self.out = nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64) / math.sqrt(D))
        self.entropy_reg = reg
        self.penalty_in_forward = penalty_in_forward
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril())

    def forward(self, idx):
        x = self.emb[idx]
        attns = []
        for w in self.qk:
            q = (x @ w[0]).view(*x.shape[:2], H, D // H).transpose(1, 2)
            k = (x @ w[1]).view(*x.shape[:2], H, D // H).transpose(1, 2)
            a = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~self.causal, -math.inf), -1)
            attns.append(a)
            x = x + (a @ q).transpose(1, 2).reshape(x.shape)
        logits = x @ self.out
        if self.penalty_in_forward:
            return logits, self.entropy_reg(attns)
        return logits, attns


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(V, (STEPS, BATCH, T + 1), generator=g)


def _reg(lam):
    return EntropyBandRegularizer(L, H, lam=lam, gamma=0.0, theta_init=0.1, dtype=torch.float64)


def _train(layout: str, rank: int | None) -> dict:
    """SGD steps; rank None = one process on the full batches with lam / WORLD."""
    lam = LAM if rank is not None else LAM / WORLD
    reg = _reg(lam)
    model = TinyLM(reg if layout != "outside" else None, penalty_in_forward=layout == "in_forward")
    if rank is not None:
        net = DistributedDataParallel(model, find_unused_parameters=layout == "in_forward")
    else:
        net = model
    params = list(net.parameters()) + (list(reg.parameters()) if layout == "outside" else [])
    opt = torch.optim.SGD(params, lr=0.5)
    for batch in _data():
        if rank is not None:
            batch = batch.chunk(WORLD)[rank]
        logits, extra = net(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        if layout == "in_forward":
            loss = loss + extra
        elif layout == "after_forward":
            loss = loss + model.entropy_reg(extra)  # model is net.module under DDP
        else:
            loss = loss + reg(extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"theta": reg.theta.detach().clone(), "out": model.out.detach().clone()}


def _scenarios(rank: int):
    return {layout: _train(layout, rank) for layout in LAYOUTS}

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("ddp_eg"), timeout_s=120)


@pytest.mark.parametrize("layout", ["in_forward", "after_forward"])
def test_thresholds_inside_the_wrapped_model_stay_identical(ddp_results, layout):
    r0, r1 = ddp_results[0][layout], ddp_results[1][layout]
    init = torch.full((L, H), 0.1, dtype=torch.float64)
    assert (r0["theta"] - init).abs().min() > 1e-3  # theta was trained
    torch.testing.assert_close(r0["theta"], r1["theta"], rtol=0, atol=0)  # bitwise across ranks
    ref = _train(layout, None)  # one process, full batch, lam / world_size
    torch.testing.assert_close(r0["theta"], ref["theta"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r0["out"], ref["out"], rtol=1e-10, atol=1e-12)


def test_thresholds_outside_the_wrapped_model_drift_apart(ddp_results):
    r0, r1 = ddp_results[0]["outside"], ddp_results[1]["outside"]
    torch.testing.assert_close(r0["out"], r1["out"], rtol=0, atol=0)  # the model itself is synced
    assert (r0["theta"] - r1["theta"]).abs().max() > 1e-3  # but each rank learned its own theta
