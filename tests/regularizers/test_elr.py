"""ELR: closed-form gradient, target update, state_dict, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from entrokit._errors import InputError
from entrokit.regularizers.elr import ELRLoss, IndexedDataset, elr_penalty


def _batch(seed: int = 0, b: int = 6, c: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, labels


def test_penalty_gradient_matches_closed_form():
    # d/dz_c log(1 - <p,t>) = p_c (<p,t> - t_c) / (1 - <p,t>)   (paper Lemma 2)
    logits, _ = _batch(1)
    g = torch.Generator().manual_seed(2)
    t = torch.rand(6, 4, generator=g, dtype=torch.float64)
    t = 0.9 * t / t.sum(1, keepdim=True)  # row sums 0.9, like a partly filled EMA
    z = logits.clone().requires_grad_(True)
    elr_penalty(z, t, reduction="sum").backward()
    p = F.softmax(logits, dim=1)
    s = (p * t).sum(1, keepdim=True)
    closed = p * (s - t) / (1 - s)
    torch.testing.assert_close(z.grad, closed, rtol=1e-10, atol=1e-12)
    # the term pushes toward the target: the target's top class gets a negative gradient
    top = t.argmax(1)
    assert (closed.gather(1, top[:, None]) < 0).all()
    # and gradients sum to zero over classes (softmax invariance to shifts)
    torch.testing.assert_close(closed.sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_full_loss_gradient_matches_closed_form():
    # total logit gradient of mean(CE + lam*reg) = (p - onehot + lam*g) / B, with updated t
    logits, labels = _batch(3)
    index = torch.tensor([0, 3, 5, 7, 8, 9])
    lam, beta = 3.0, 0.7
    loss_fn = ELRLoss(10, 4, lam=lam, beta=beta).double()
    # pre-fill targets to something non-trivial
    g = torch.Generator().manual_seed(4)
    loss_fn.targets.copy_(0.5 * torch.softmax(torch.randn(10, 4, generator=g, dtype=torch.float64), 1))
    t_before = loss_fn.targets.clone()
    z = logits.clone().requires_grad_(True)
    loss_fn(z, labels, index).backward()
    p = F.softmax(logits, 1)
    t = beta * t_before[index] + (1 - beta) * p  # update happens before the loss (code order)
    s = (p * t).sum(1, keepdim=True)
    grad = (p - F.one_hot(labels, 4) + lam * p * (s - t) / (1 - s)) / 6
    torch.testing.assert_close(z.grad, grad, rtol=1e-9, atol=1e-12)


def test_target_update_rule_and_values():
    loss_fn = ELRLoss(5, 3, lam=3.0, beta=0.7).double()
    z = torch.tensor([[1.0, 2.0, 0.5], [30.0, 0.0, 0.0]], dtype=torch.float64)
    idx = torch.tensor([4, 1])
    loss_fn(z, torch.tensor([0, 0]), idx)
    p = torch.softmax(z, 1).clamp(1e-4, 1 - 1e-4)
    p = p / p.sum(1, keepdim=True)
    torch.testing.assert_close(loss_fn.targets[idx], 0.3 * p)  # t starts at 0
    assert loss_fn.targets[[0, 2, 3]].abs().sum() == 0  # untouched rows
    # clamp: the near-one-hot row has no entry below 1e-4 before renormalisation
    assert loss_fn.targets[1].min() >= 0.3 * 1e-4 / (1 + 1e-4) - 1e-15
    loss_fn(z, torch.tensor([0, 0]), idx)
    torch.testing.assert_close(loss_fn.targets[idx], 0.7 * 0.3 * p + 0.3 * p)
    # eval mode reads but does not update
    loss_fn.eval()
    before = loss_fn.targets.clone()
    loss_fn(z, torch.tensor([0, 0]), idx)
    torch.testing.assert_close(loss_fn.targets, before, rtol=0, atol=0)


def test_loss_value_and_lambda_zero_is_ce():
    logits, labels = _batch(5)
    index = torch.arange(6)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(ELRLoss(6, 4, lam=0.0).double()(logits, labels, index), ce)
    loss_fn = ELRLoss(6, 4, lam=2.0, beta=0.5).double()
    out = loss_fn(logits, labels, index)
    p = torch.softmax(logits, 1).clamp(1e-4, 1 - 1e-4)
    t = loss_fn.targets[index]
    ref = ce + 2.0 * torch.log(1 - (p * t).sum(1)).mean()
    torch.testing.assert_close(out, ref)
    assert out < ce  # the regulariser is negative
    per = ELRLoss(6, 4, lam=2.0, beta=0.5, reduction="none").double()(logits, labels, index)
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), ref)


def test_state_dict_round_trip():
    logits, labels = _batch(6, dtype=torch.float32)
    a = ELRLoss(20, 4)
    a(logits, labels, torch.tensor([1, 2, 3, 10, 11, 19]))
    sd = a.state_dict()
    assert "targets" in sd and sd["targets"].shape == (20, 4)
    b = ELRLoss(20, 4)
    b.load_state_dict(sd)
    torch.testing.assert_close(b.targets, a.targets, rtol=0, atol=0)
    assert b.targets.abs().sum() > 0


def test_targets_memorise_clean_signal():
    # On a fixed prediction, t converges geometrically to the (normalised) prediction.
    loss_fn = ELRLoss(3, 3, beta=0.7).double()
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    for _ in range(60):
        loss_fn(z, torch.tensor([0]), torch.tensor([2]))
    torch.testing.assert_close(loss_fn.targets[2], torch.softmax(z, 1)[0], rtol=1e-8, atol=1e-9)


def test_indexed_dataset():
    ds = IndexedDataset(TensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5)))
    x, y, i = ds[3]
    assert i == 3 and int(y) == 3 and torch.equal(x, torch.tensor([6.0, 7.0]))
    assert len(ds) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)
    _, _, idx = next(iter(loader))
    assert idx.dtype == torch.long and idx.tolist() == [0, 1, 2, 3, 4]
    assert IndexedDataset([10, 20])[1] == (20, 1)
    with pytest.raises(TypeError, match="map-style dataset"):
        IndexedDataset(5)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lam": -1.0}, InputError, r"lam must be a finite number >= 0"),
        ({"lam": float("nan")}, InputError, r"lam must be a finite number >= 0"),
        ({"lam": "3"}, TypeError, r"lam must be a real number"),
        ({"beta": 1.0}, InputError, r"beta must lie in \[0, 1\)"),
        ({"beta": -0.1}, InputError, r"beta must lie in \[0, 1\)"),
        ({"reduction": "avg"}, InputError, r"reduction must be one of"),
        ({"num_samples": 0}, InputError, r"num_samples must be an int >= 1"),
        ({"num_classes": 1}, InputError, r"num_classes must be an int >= 2"),
        ({"num_samples": 5.0}, TypeError, r"num_samples must be an int"),
    ],
)
def test_bad_options(kwargs, exc, match):
    args = {"num_samples": 10, "num_classes": 3, **kwargs}
    with pytest.raises(exc, match=match):
        ELRLoss(**args)


def test_bad_hyperparameter_set_later():
    # options are checked when they are assigned (not on every forward) and a refused
    # assignment keeps the old value
    loss_fn = ELRLoss(10, 3)
    with pytest.raises(InputError, match=r"beta must lie in \[0, 1\)"):
        loss_fn.beta = 1.5
    with pytest.raises(InputError, match=r"reduction must be one of"):
        loss_fn.reduction = "avg"
    with pytest.raises(TypeError, match=r"sync must be None, True or False"):
        loss_fn.sync = "yes"
    assert (loss_fn.beta, loss_fn.reduction, loss_fn.sync) == (0.7, "mean", None)
    loss_fn.beta = 0.9
    loss_fn(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(loss_fn.targets[:2], torch.full((2, 3), 0.1 / 3))


@pytest.mark.parametrize(
    ("logits", "labels", "index", "exc", "match"),
    [
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 10]), InputError,
         r"index out of range: got 10, expected 0 <= index < num_samples=10"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([-1, 0]), InputError,
         r"index out of range: got -1"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), torch.tensor([0, 1]), InputError,
         r"labels out of range: got 3, expected 0 <= labels < num_classes=3"),
        (torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), InputError,
         r"logits must have shape \[batch, 3\]"),
        (torch.zeros(3), torch.tensor([0, 1]), torch.tensor([0, 1]), InputError,
         r"logits must have shape \[batch, 3\]"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), InputError,
         r"labels must have shape \[2\]"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([[0, 1]]), InputError,
         r"index must have shape \[2\]"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), TypeError,
         r"index must have an integer dtype"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 1]), TypeError,
         r"logits must have a floating dtype"),
        ([[0.0, 0.0, 0.0]], torch.tensor([0]), torch.tensor([0]), TypeError,
         r"logits must be a torch.Tensor"),
        (torch.zeros(2, 3), [0, 1], torch.tensor([0, 1]), TypeError,
         r"labels must be a torch.Tensor"),
    ],
)
def test_bad_inputs(logits, labels, index, exc, match):
    with pytest.raises(exc, match=match):
        ELRLoss(10, 3)(logits, labels, index)


def test_bad_inputs_do_not_touch_buffer():
    loss_fn = ELRLoss(10, 3)
    with pytest.raises(InputError):
        loss_fn(torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([0, 11]))
    assert loss_fn.targets.abs().sum() == 0


def test_bfloat16_logits_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(21)
    logits = torch.randn(16, 4, generator=g)
    labels, index = torch.randint(0, 4, (16,), generator=g), torch.arange(16)
    out, ref = under_autocast(lambda z: ELRLoss(16, 4)(z, labels, index), logits)
    # computed in float32 (autocast off), returned in the caller's dtype: one rounding of ref
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    pen, pen_ref = under_autocast(lambda z: elr_penalty(z, torch.full((16, 4), 0.25)), logits)
    assert pen.dtype == torch.bfloat16
    torch.testing.assert_close(pen.float(), pen_ref, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    z = logits.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ELRLoss(16, 4)(z, labels, index).backward()
    assert z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    from mixed_precision import assert_half_in_half_out, wide_batch

    # computed in float32 the result is the float64 value rounded once
    logits, labels, index, t = wide_batch(31)
    b, c = logits.shape
    assert_half_in_half_out(lambda z: elr_penalty(z, t), logits, dtype=dtype)

    def loss(z):
        fn = ELRLoss(b, c)
        fn.targets.copy_(0.5 * t)
        return fn(z, labels, index)

    assert_half_in_half_out(loss, logits, dtype=dtype)
    fn = ELRLoss(b, c)
    fn(logits.to(dtype), labels, index)
    assert fn.targets.dtype == torch.float32  # the targets' update ran on the float32 softmax
    ref = torch.softmax(logits.to(dtype).double(), 1).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(fn.targets.double(), 0.3 * ref / ref.sum(1, keepdim=True), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_minus_inf_logit_batch_leaves_the_targets_unchanged_in_both_modes(check_inputs):
    # softmax of a -inf logit is finite; the batch is still refused (True) or skipped (False)
    logits = torch.tensor([[0.3, float("-inf"), 1.0], [0.1, 0.2, 0.3]])
    labels, index = torch.tensor([0, 2]), torch.tensor([1, 3])
    loss = ELRLoss(4, 3, check_inputs=check_inputs)
    loss.targets.uniform_()
    before = loss.targets.clone()
    if check_inputs:
        with pytest.raises(InputError, match="logits of this batch contain NaN or inf"):
            loss(logits, labels, index)
    else:
        loss(logits, labels, index)
    assert torch.equal(loss.targets, before)
