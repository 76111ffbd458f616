"""Two-process gloo DDP run: LegoGCD's class prior is all-reduced, identical on every rank.

Each global batch is split between two ranks (the last one unevenly, 3 + 2 rows). With the
all-reduce the prior on both ranks must equal, bit for bit, each other and (to rounding) a
single-process run on the full batches; with ``sync=False`` the ranks drift apart. A
non-finite batch on one rank makes *both* ranks raise before the prior changes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from entrokit._errors import InputError
from entrokit.regularizers.legogcd import LocalEntropyRegularizer
from gloo_ranks import run_on_ranks

N, D, K, KNOWN, WORLD = 24, 6, 5, 2, 2
BATCHES = [  # dataset indices of each global batch (size 8), split in halves between ranks
    [0, 5, 9, 13, 2, 17, 21, 8],
    [1, 3, 4, 6, 7, 10, 11, 12],
    [14, 15, 16, 18, 19, 20, 22, 23],
]
UNEVEN = [2, 7, 11, 20, 0]  # a last batch of 5 rows: rank 0 gets 3, rank 1 gets 2
DEADLINE_S = 60.0


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, KNOWN, (N,), generator=g)
    labeled = torch.rand(N, generator=g) < 0.4
    return x, y, labeled


def _model():
    g = torch.Generator().manual_seed(1)
    m = torch.nn.Linear(D, K, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(0.4 * torch.randn(K, D, generator=g, dtype=torch.float64))
    return m


def _shard(idx: list[int], rank: int | None) -> torch.Tensor:
    t = torch.tensor(idx)
    if rank is None:
        return t
    return t.chunk(WORLD)[rank] if len(idx) % WORLD == 0 else (t[:3] if rank == 0 else t[3:])


def _run(rank: int | None, sync: bool | None = None, poison_rank: int | None = None,
         check_inputs: bool = True):
    """A few SGD steps on LER + CE; rank None = one process on the full batches."""
    x, y, labeled = _data()
    model = _model()
    net = DistributedDataParallel(model) if rank is not None else model
    ler = LocalEntropyRegularizer(K, KNOWN, threshold=0.3, momentum=0.5, sync=sync,
                                  check_inputs=check_inputs).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    priors = []
    for batch in BATCHES:
        idx = _shard(batch, rank)
        z = net(x[idx])
        m = labeled[idx]
        # CE summed over the labelled rows / global batch size (DDP averages over ranks), so
        # the DDP and the single-process runs follow the same trajectory; the LER mean over
        # the local rows already matches for even shards
        ce = F.cross_entropy(z, y[idx], reduction="none")[m].sum()
        loss = ler(z, m) + ce * (WORLD if rank is not None else 1) / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        priors.append(ler.prior.clone())
    idx = _shard(UNEVEN, rank)
    with torch.no_grad():
        z = model(x[idx])
        ler(z, labeled[idx])  # uneven shards: prior update only
        priors.append(ler.prior.clone())
        error = None
        if poison_rank is not None:
            if rank == poison_rank:
                z = z.clone()
                z[0, 1] = float("nan")
            try:
                ler(z, labeled[idx])
            except InputError as exc:
                error = str(exc)
    return {"priors": torch.stack(priors), "prior": ler.prior.clone(), "error": error,
            "weight": model.weight.detach().clone()}


def _scenarios(rank: int):
    return {
        "auto": _run(rank),
        "no_sync": _run(rank, sync=False),
        "poisoned": _run(rank, sync=True, poison_rank=1),
        "poisoned_quiet": _run(rank, sync=True, poison_rank=1, check_inputs=False),
    }

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("ddp_legogcd"), timeout_s=DEADLINE_S)


def test_prior_identical_across_ranks_and_equal_to_single_process(ddp_results):
    ref = _run(None)
    r0, r1 = ddp_results[0]["auto"], ddp_results[1]["auto"]
    # the all-reduced prior is bit-identical on both ranks after every step
    torch.testing.assert_close(r0["priors"], r1["priors"], rtol=0, atol=0)
    # ... and equals the full-batch single-process prior (uneven last batch included)
    torch.testing.assert_close(r0["priors"], ref["priors"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r0["weight"], ref["weight"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ref["prior"], torch.full((K,), 1.0 / K, dtype=torch.float64))


def test_without_sync_the_ranks_drift_apart(ddp_results):
    p0, p1 = ddp_results[0]["no_sync"]["prior"], ddp_results[1]["no_sync"]["prior"]
    assert (p0 - p1).abs().max() > 1e-4  # each rank averages only its own shard
    ref = _run(None)["prior"]
    assert (p0 - ref).abs().max() > 1e-5


def test_nonfinite_batch_on_one_rank_raises_on_every_rank(ddp_results):
    for res in ddp_results:
        out = res["poisoned"]
        assert out["error"] is not None
        assert "rank(s) [1]" in out["error"] and "did not update its class prior" in out["error"]
        # the failed call left the prior as after the previous (good) update, on both ranks
        torch.testing.assert_close(out["prior"], out["priors"][-1], rtol=0, atol=0)
    torch.testing.assert_close(ddp_results[0]["poisoned"]["prior"],
                               ddp_results[1]["poisoned"]["prior"], rtol=0, atol=0)


def test_nonfinite_batch_is_skipped_on_every_rank_without_checks(ddp_results):
    for res in ddp_results:
        out = res["poisoned_quiet"]
        assert out["error"] is None
        torch.testing.assert_close(out["prior"], out["priors"][-1], rtol=0, atol=0)
        assert torch.isfinite(out["prior"]).all()
    torch.testing.assert_close(ddp_results[0]["poisoned_quiet"]["prior"],
                               ddp_results[1]["poisoned_quiet"]["prior"], rtol=0, atol=0)
