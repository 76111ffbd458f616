"""PS-KD: alpha=0 is CE, target distributions, schedule, buffer, state_dict, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entrokit._errors import InputError
from entrokit.regularizers.pskd import PSKDLoss, pskd_alpha, pskd_targets, soft_cross_entropy


def _batch(seed=0, b=5, c=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=dtype), torch.randint(0, c, (b,), generator=g)


def test_alpha_zero_equals_cross_entropy_value_and_grad():
    logits, labels = _batch(0)
    loss_fn = PSKDLoss(10, 4, total_epochs=3).double()
    # fill the buffer with something far from one-hot so alpha really matters
    loss_fn.predictions.fill_(0.25)
    loss_fn.seen.fill_(True)
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    out = loss_fn(z1, labels, torch.arange(5), alpha=0.0)
    ce = F.cross_entropy(z2, labels)
    torch.testing.assert_close(out, ce, rtol=1e-12, atol=1e-12)
    out.backward()
    ce.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-14)
    # and with alpha > 0 it differs
    loss_fn.predictions.fill_(0.25)
    assert not torch.allclose(loss_fn(logits, labels, torch.arange(5), alpha=0.5), ce)


def test_targets_are_distributions_and_match_formula():
    g = torch.Generator().manual_seed(1)
    prev = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    for a in (0.0, 0.3, 0.8, 1.0):
        t = pskd_targets(labels, prev, a)
        assert (t >= 0).all()
        torch.testing.assert_close(t.sum(1), torch.ones(6, dtype=torch.float64))
        expect = prev * a
        expect[torch.arange(6), labels] += 1 - a
        torch.testing.assert_close(t, expect)


def test_soft_ce_gradient_is_p_minus_target():
    logits, labels = _batch(2)
    tgt = pskd_targets(labels, torch.full((5, 4), 0.25, dtype=torch.float64), 0.6)
    z = logits.clone().requires_grad_(True)
    soft_cross_entropy(z, tgt, reduction="sum").backward()
    torch.testing.assert_close(z.grad, torch.softmax(logits, 1) - tgt)


def test_schedule():
    assert pskd_alpha(0, 4, 0.8) == pytest.approx(0.2)
    assert pskd_alpha(3, 4, 0.8) == pytest.approx(0.8)  # reaches alpha_T in the last epoch
    loss_fn = PSKDLoss(3, 2, total_epochs=10, alpha_T=0.5)
    loss_fn.set_epoch(4)
    assert loss_fn.alpha == pytest.approx(0.25)
    with pytest.raises(InputError, match=r"0 <= epoch < total_epochs=10"):
        loss_fn.set_epoch(10)


def test_buffer_updates_and_progressive_targets():
    loss_fn = PSKDLoss(6, 3, total_epochs=2, alpha_T=0.8).double()
    labels = torch.tensor([0, 2])
    idx = torch.tensor([1, 4])
    z0 = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 2.0]], dtype=torch.float64)
    # epoch 0: unseen rows use the one-hot label, so the target is one-hot -> plain CE
    loss_fn.set_epoch(0)
    out0 = loss_fn(z0, labels, idx)
    torch.testing.assert_close(out0, F.cross_entropy(z0, labels))
    torch.testing.assert_close(loss_fn.predictions[idx], torch.softmax(z0, 1))
    assert loss_fn.seen.tolist() == [False, True, False, False, True, False]
    assert loss_fn.predictions[[0, 2, 3, 5]].abs().sum() == 0
    # epoch 1: target mixes the stored (epoch-0) prediction with alpha = 0.8
    loss_fn.set_epoch(1)
    z1 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out1 = loss_fn(z1, labels, idx)
    tgt = pskd_targets(labels, torch.softmax(z0, 1), 0.8)
    torch.testing.assert_close(out1, -(tgt * torch.log(torch.full((2, 3), 1 / 3, dtype=torch.float64))).sum(1).mean())
    out1.backward()
    torch.testing.assert_close(z1.grad, (torch.full((2, 3), 1 / 3, dtype=torch.float64) - tgt) / 2)
    # and the buffer now holds the latest prediction
    torch.testing.assert_close(loss_fn.predictions[idx], torch.full((2, 3), 1 / 3, dtype=torch.float64))
    # eval mode does not write
    loss_fn.eval()
    loss_fn(z0, labels, idx)
    torch.testing.assert_close(loss_fn.predictions[idx], torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_state_dict_round_trip():
    a = PSKDLoss(8, 3, total_epochs=5)
    a.set_epoch(3)
    logits, labels = _batch(3, b=4, c=3, dtype=torch.float32)
    a(logits, labels, torch.tensor([0, 2, 5, 7]))
    sd = a.state_dict()
    assert set(sd) == {"predictions", "seen", "epoch"}
    b = PSKDLoss(8, 3, total_epochs=5)
    b.load_state_dict(sd)
    torch.testing.assert_close(b.predictions, a.predictions, rtol=0, atol=0)
    assert torch.equal(b.seen, a.seen) and int(b.epoch) == 3
    assert b.alpha == pytest.approx(a.alpha)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"alpha_T": 1.5}, InputError, r"alpha_T must lie in \[0, 1\]"),
        ({"alpha_T": None}, TypeError, r"alpha_T must be a real number"),
        ({"total_epochs": 0}, InputError, r"total_epochs must be an int >= 1"),
        ({"num_samples": -3}, InputError, r"num_samples must be an int >= 1"),
    ],
)
def test_bad_options(kwargs, exc, match):
    args = {"num_samples": 10, "num_classes": 3, "total_epochs": 5, **kwargs}
    with pytest.raises(exc, match=match):
        PSKDLoss(**args)


def test_bad_inputs():
    loss_fn = PSKDLoss(10, 3, total_epochs=5)
    z = torch.zeros(2, 3)
    with pytest.raises(InputError, match=r"index out of range: got 12"):
        loss_fn(z, torch.tensor([0, 1]), torch.tensor([0, 12]))
    with pytest.raises(InputError, match=r"labels out of range: got -1"):
        loss_fn(z, torch.tensor([-1, 1]), torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"logits must have shape \[batch, 3\]"):
        loss_fn(torch.zeros(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"alpha must lie in \[0, 1\]"):
        loss_fn(z, torch.tensor([0, 1]), torch.tensor([0, 1]), alpha=2.0)
    with pytest.raises(TypeError, match=r"labels must have an integer dtype"):
        loss_fn(z, torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert not loss_fn.seen.any()


def test_bfloat16_logits_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(22)
    logits = torch.randn(16, 4, generator=g)
    labels, index = torch.randint(0, 4, (16,), generator=g), torch.arange(16)
    out, ref = under_autocast(lambda z: PSKDLoss(16, 4, 10)(z, labels, index), logits)
    assert out.dtype == torch.bfloat16  # the caller's dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=0)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_minus_inf_logit_batch_leaves_the_buffers_unchanged_in_both_modes(check_inputs):
    logits = torch.tensor([[0.3, float("-inf"), 1.0], [0.1, 0.2, 0.3]])
    labels, index = torch.tensor([0, 2]), torch.tensor([1, 3])
    loss = PSKDLoss(4, 3, 10, check_inputs=check_inputs)
    before, seen = loss.predictions.clone(), loss.seen.clone()
    if check_inputs:
        with pytest.raises(InputError, match="logits of this batch contain NaN or inf"):
            loss(logits, labels, index)
    else:
        loss(logits, labels, index)
    assert torch.equal(loss.predictions, before) and torch.equal(loss.seen, seen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    from mixed_precision import assert_half_in_half_out, wide_batch

    logits, labels, index, target = wide_batch(32)
    b, c = logits.shape
    assert_half_in_half_out(lambda z: soft_cross_entropy(z, target, reduction="none"), logits, dtype=dtype)

    def loss(z):
        fn = PSKDLoss(b, c, 10)
        fn.predictions.copy_(target)
        fn.seen.fill_(True)
        fn.set_epoch(9)
        return fn(z, labels, index)

    assert_half_in_half_out(loss, logits, dtype=dtype)
    fn = PSKDLoss(b, c, 10)
    fn(logits.to(dtype), labels, index)
    assert fn.predictions.dtype == torch.float32  # stored from the float32 softmax
    torch.testing.assert_close(fn.predictions.double(), torch.softmax(logits.to(dtype).double(), 1),
                               rtol=1e-6, atol=1e-9)
