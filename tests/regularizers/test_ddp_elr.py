"""Two-process gloo DDP run: per-sample buffers equal a single-process full-batch run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from entrokit.regularizers.elr import ELRLoss
from entrokit.regularizers.pskd import PSKDLoss
from gloo_ranks import run_on_ranks

N, D, C, WORLD = 24, 6, 4, 2
BATCHES = [  # dataset indices of each global batch (size 8); later batches revisit samples
    [0, 5, 9, 13, 2, 17, 21, 8],
    [1, 3, 4, 6, 7, 10, 11, 12],
    [14, 15, 16, 18, 19, 20, 22, 23],
    [5, 9, 1, 3, 21, 8, 12, 19],
]
UNEVEN = [2, 7, 11, 20, 0]  # a last batch of 5: rank 0 gets 3 rows, rank 1 gets 2


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y


def _model():
    g = torch.Generator().manual_seed(1)
    m = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        m.weight.copy_(0.5 * torch.randn(C, D, generator=g, dtype=torch.float64))
        m.bias.zero_()
    return m


def _run(rank: int | None):
    """Train a few SGD steps; rank None = single process on the full batches."""
    x, y = _data()
    model = _model()
    net = DistributedDataParallel(model) if rank is not None else model
    elr = ELRLoss(N, C, lam=3.0, beta=0.7).double()
    pskd = PSKDLoss(N, C, total_epochs=2).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step, batch in enumerate(BATCHES):
        idx = torch.tensor(batch)
        if rank is not None:
            idx = idx.chunk(WORLD)[rank]  # each rank sees half of the batch
        pskd.set_epoch(min(step // 2, 1))
        out = net(x[idx])
        loss = elr(out, y[idx], idx) + pskd(out, y[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # uneven shards: rank 0 has 3 rows, rank 1 has 2
    idx = torch.tensor(UNEVEN)
    if rank is not None:
        idx = idx[:3] if rank == 0 else idx[3:]
    with torch.no_grad():
        elr.update_targets(F.softmax(model(x[idx]), 1), idx)
    return {
        "targets": elr.targets.clone(),
        "predictions": pskd.predictions.clone(),
        "seen": pskd.seen.clone(),
        "weight": model.weight.detach().clone(),
    }


def _scenarios(rank: int):
    return _run(rank)

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("ddp"), timeout_s=120)


def test_ddp_elr_targets_equal_single_process(ddp_results):
    ref = _run(None)
    assert ref["targets"].abs().sum() > 0
    for res in ddp_results:
        # same model trajectory (DDP averages the half-batch gradients)
        torch.testing.assert_close(res["weight"], ref["weight"], rtol=1e-10, atol=1e-12)
        # every rank holds the full-batch targets, incl. rows seen only by the other rank
        torch.testing.assert_close(res["targets"], ref["targets"], rtol=1e-10, atol=1e-12)
    # identical across ranks
    torch.testing.assert_close(ddp_results[0]["targets"], ddp_results[1]["targets"], rtol=0, atol=0)
    # rows never visited stay zero
    visited = sorted({i for b in BATCHES for i in b} | set(UNEVEN))
    mask = torch.ones(N, dtype=torch.bool)
    mask[visited] = False
    assert ddp_results[0]["targets"][mask].abs().sum() == 0


def test_ddp_pskd_predictions_equal_single_process(ddp_results):
    ref = _run(None)
    for res in ddp_results:
        torch.testing.assert_close(res["predictions"], ref["predictions"], rtol=1e-10, atol=1e-12)
        assert torch.equal(res["seen"], ref["seen"])
