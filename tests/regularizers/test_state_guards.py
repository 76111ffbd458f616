"""Per-sample / EMA state is never updated from a non-finite batch (ELR, PS-KD, LegoGCD)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from entrokit._errors import InputError
from entrokit.regularizers import (
    ELRLoss,
    LocalEntropyRegularizer,
    PSKDLoss,
    local_entropy_loss,
    pskd_targets,
    soft_cross_entropy,
)

N, C = 10, 4
NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _good(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g, dtype=torch.float64), torch.randint(0, C, (b,), generator=g)


def _poison(z, value):
    z = z.clone()
    z[1, 2] = value
    return z


def _state(mod):
    return {k: v.clone() for k, v in mod.state_dict().items()}


def _assert_same(mod, before):
    after = mod.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def _elr():
    return ELRLoss(N, C).double()


def _pskd():
    m = PSKDLoss(N, C, total_epochs=3).double()
    m.set_epoch(1)
    return m


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize(("make", "state"), [(_elr, "targets"), (_pskd, "stored predictions")])
def test_index_losses_reject_nonfinite_batch_and_keep_state(make, state, value):
    loss_fn = make()
    z, y = _good(0)
    idx = torch.tensor([0, 3, 5, 7])
    loss_fn(z, y, idx)  # a good batch fills some rows
    before = _state(loss_fn)
    with pytest.raises(InputError, match=rf"logits of this batch contain NaN or inf.*did not update its {state}"):
        loss_fn(_poison(z, value), y, idx)
    _assert_same(loss_fn, before)
    # the direct update method is guarded too
    update = loss_fn.update_targets if isinstance(loss_fn, ELRLoss) else loss_fn.update_predictions
    with pytest.raises(InputError, match=r"probs of this batch contain NaN or inf"):
        update(_poison(F.softmax(z, 1), value), idx)
    _assert_same(loss_fn, before)
    # training goes on with the next good batch
    z2, y2 = _good(1)
    out = loss_fn(z2, y2, idx)
    assert torch.isfinite(out)
    assert not all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


@pytest.mark.parametrize(("make", "name"), [(_elr, "targets"), (_pskd, "predictions")])
def test_index_losses_without_checks_skip_nonfinite_batch_silently(make, name):
    loss_fn = make()
    loss_fn.check_inputs = False
    z, y = _good(0)
    idx = torch.tensor([0, 3, 5, 7])
    loss_fn(z, y, idx)
    before = _state(loss_fn)
    loss_fn(_poison(z, float("nan")), y, idx)  # no error, no device sync ...
    _assert_same(loss_fn, before)  # ... and no state change
    assert torch.isfinite(getattr(loss_fn, name)).all()


def test_index_losses_eval_mode_never_writes():
    loss_fn = _elr().eval()
    z, y = _good(0)
    loss_fn(z, y, torch.tensor([0, 1, 2, 3]))
    assert loss_fn.targets.abs().sum() == 0


@pytest.mark.parametrize("value", NONFINITE)
def test_legogcd_prior_rejects_nonfinite_batch(value):
    ler = LocalEntropyRegularizer(C, 2).double()
    mask = torch.zeros(4, dtype=torch.bool)
    z, _ = _good(0)
    ler(z, mask)
    before = _state(ler)
    with pytest.raises(InputError, match=r"logits contain NaN or inf.*did not update its class prior"):
        ler(_poison(z, value), mask)
    _assert_same(ler, before)
    with pytest.raises(InputError, match=r"logits contain NaN or inf"):
        ler.update_prior(_poison(z, value))
    _assert_same(ler, before)
    ler(_good(1)[0], mask)
    assert not torch.equal(ler.prior, before["prior"])
    # without checks: skipped silently, prior unchanged and finite
    quiet = LocalEntropyRegularizer(C, 2, check_inputs=False).double()
    p0 = quiet.prior.clone()
    quiet(_poison(z, value), mask)
    assert torch.equal(quiet.prior, p0)


def test_soft_cross_entropy_and_pskd_targets_validate():
    z = torch.zeros(3, 4)
    with pytest.raises(InputError, match=r"target must have the shape of logits \(3, 4\), got \(3, 5\)"):
        soft_cross_entropy(z, torch.full((3, 5), 0.2))
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor"):
        soft_cross_entropy(z, [[0.25] * 4] * 3)
    with pytest.raises(TypeError, match=r"target must have a floating dtype"):
        soft_cross_entropy(z, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
        soft_cross_entropy(z, torch.full((3, 4), 0.25), reduction="avg")
    prev = torch.full((2, 4), 0.25)
    with pytest.raises(InputError, match=r"labels out of range: got 4, expected 0 <= labels < num_classes=4"):
        pskd_targets(torch.tensor([0, 4]), prev, 0.5)
    with pytest.raises(InputError, match=r"labels out of range: got -1"):
        pskd_targets(torch.tensor([-1, 0]), prev, 0.5)
    with pytest.raises(InputError, match=r"labels must have shape \[2\]"):
        pskd_targets(torch.tensor([0, 1, 2]), prev, 0.5)
    with pytest.raises(InputError, match=r"prev_probs rows must sum to 1"):
        pskd_targets(torch.tensor([0, 1]), torch.ones(2, 4), 0.5)
    with pytest.raises(InputError, match=r"prev_probs has negative entries.*not logits"):
        pskd_targets(torch.tensor([0, 1]), torch.tensor([[2.0, -1.0, 0, 0]] * 2), 0.5)
    # without value checks the range check is skipped (no sync), metadata checks remain
    with pytest.raises(InputError, match=r"labels must have shape"):
        pskd_targets(torch.tensor([0]), prev, 0.5, check_inputs=False)


def test_local_entropy_loss_validates():
    z = torch.randn(3, 4)
    m = torch.ones(3, dtype=torch.bool)
    with pytest.raises(InputError, match=r"mask must have shape \[3\]"):
        local_entropy_loss(z, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool"):
        local_entropy_loss(z, torch.ones(3))
    with pytest.raises(InputError, match=r"log_prior must have shape \[4\]"):
        local_entropy_loss(z, m, torch.zeros(3))
    with pytest.raises(InputError, match=r"reduction must be one of"):
        local_entropy_loss(z, m, reduction="avg")
    with pytest.raises(InputError, match=r"logits must have shape \[batch, num_classes\]"):
        local_entropy_loss(z[None], m)


# ---------------------------------------------------------------------------- DDP
WORLD = 2


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, make in (("elr", _elr), ("pskd", _pskd)):
            loss_fn = make()
            z, y = _good(rank)
            idx = torch.tensor([0, 1]) + 2 * rank
            loss_fn(z[:2], y[:2], idx)
            before = _state(loss_fn)
            # only rank 1 sees a NaN; both ranks must raise (no rank hangs in a collective)
            zz = _poison(z, float("nan"))[:2] if rank == 1 else z[:2]
            try:
                loss_fn(zz, y[:2], idx)
                err = None
            except InputError as exc:
                err = str(exc)
            same = all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())
            loss_fn(z[2:], y[2:], idx)  # the next good batch still works on both ranks
            results[name] = (err, same, _state(loss_fn))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_nonfinite_batch_on_one_rank_raises_on_every_rank(tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_ddp_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("elr", "pskd"):
        for r in range(WORLD):
            err, same, _ = res[r][name]
            assert err is not None and "on rank(s) [1]" in err, (name, r, err)
            assert same, (name, r)
        s0, s1 = res[0][name][2], res[1][name][2]
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (name, k)


# ------------------------------------------------- the three losses on one base agree
def _ler():
    return LocalEntropyRegularizer(C, 2).double()


_THREE = [
    (_elr, lambda m, z, y, idx: m(z, y, idx)),
    (_pskd, lambda m, z, y, idx: m(z, y, idx)),
    (_ler, lambda m, z, y, idx: m(z, torch.zeros(z.shape[0], dtype=torch.bool))),
]


@pytest.mark.parametrize(
    "build",
    [lambda **kw: ELRLoss(N, C, **kw), lambda **kw: PSKDLoss(N, C, 3, **kw),
     lambda **kw: LocalEntropyRegularizer(C, 2, **kw)],
    ids=["elr", "pskd", "ler"],
)
def test_sync_is_validated_the_same_way_in_all_three(build):
    with pytest.raises(TypeError, match=r"^sync must be None, True or False, got str"):
        build(sync="yes")
    m = build()
    for bad in ("yes", 1, 0.0):  # on assignment too, and the old value stays
        with pytest.raises(TypeError, match=r"^sync must be None, True or False, got"):
            m.sync = bad
    assert m.sync is None


@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize(("make", "call"), _THREE)
def test_a_minus_inf_logit_batch_is_refused_or_skipped_by_all_three(make, call, check_inputs):
    # softmax of a -inf logit is finite; every loss judges the logits, not their softmax
    m = make()
    m.check_inputs = check_inputs
    z, y = _good(0)
    idx = torch.tensor([0, 3, 5, 7])
    call(m, z, y, idx)
    before = _state(m)
    bad = _poison(z, float("-inf"))
    if check_inputs:
        with pytest.raises(InputError, match=r"logits( of this batch)? contain NaN or inf"):
            call(m, bad, y, idx)
    else:
        call(m, bad, y, idx)
    _assert_same(m, before)
    call(m, _good(1)[0], y, idx)  # the next good batch is written
    assert not all(torch.equal(before[k], v) for k, v in m.state_dict().items())
