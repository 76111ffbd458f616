"""LegoGCD: selection, LER math, EMA prior, dual-view KL, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from entrokit._errors import InputError
from entrokit.regularizers.legogcd import (
    LocalEntropyRegularizer,
    dual_view_kl,
    local_entropy_loss,
    select_known,
)


def _logits_with_confidences():
    # K = 4 classes, known = {0, 1}; tau_s = 0.1 so a 0.3 cosine gap gives conf ~0.95
    z = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # confident, known (0)   -> selected if unlabelled
            [0.9, 0.1, 0.0, 0.0],  # same but labelled      -> never selected
            [0.0, 0.0, 0.9, 0.1],  # confident, novel (2)   -> not selected
            [0.3, 0.29, 0.0, 0.0],  # unconfident, known    -> not selected
            [0.1, 0.8, 0.1, 0.0],  # confident, known (1)   -> selected
            [0.1, 0.0, 0.0, 0.85],  # confident, novel (3)  -> not selected
        ],
        dtype=torch.float64,
    )
    labeled = torch.tensor([False, True, False, False, False, False])
    return z, labeled


def test_selection_picks_exactly_confident_known_unlabelled():
    z, labeled = _logits_with_confidences()
    p = torch.softmax(z / 0.1, 1)
    conf, pred = p.max(1)
    expect = (~labeled) & (conf >= 0.7) & (pred < 2)
    mask = select_known(z, labeled, num_known=2, threshold=0.7)
    assert mask.tolist() == [True, False, False, False, True, False]
    assert torch.equal(mask, expect)
    # threshold is inclusive, and raising it drops the less confident known row
    c4 = conf[4].item()
    assert select_known(z, labeled, 2, threshold=c4).tolist()[4]
    assert select_known(z, labeled, 2, threshold=min(1.0, c4 + 1e-6)).tolist() == [True, False, False, False, False, False]


def test_ler_equals_hand_computation():
    z, labeled = _logits_with_confidences()
    mask = select_known(z, labeled, 2)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    out = local_entropy_loss(z, mask, prior.log(), tau_o=0.05, lam_ler=0.4)
    total = 0.0
    for i in range(6):
        if not mask[i]:
            continue
        q = [math.exp(v / 0.05) for v in z[i].tolist()]
        q = [v / sum(q) for v in q]
        a = [v / 0.05 + 0.4 * math.log(pk) for v, pk in zip(z[i].tolist(), prior.tolist())]
        lse = math.log(sum(math.exp(v) for v in a))
        total += -sum(qk * (ak - lse) for qk, ak in zip(q, a))
    assert out.item() == pytest.approx(total / 6, rel=1e-12)  # divided by all N rows
    # lam_ler = 0 reduces to the mean masked entropy of the sharpened prediction (Eq. 9)
    q = torch.softmax(z / 0.05, 1)
    h = -(q * q.log()).sum(1)
    torch.testing.assert_close(local_entropy_loss(z, mask, prior.log(), lam_ler=0.0), (h * mask).mean())
    torch.testing.assert_close(local_entropy_loss(z, mask, None), (h * mask).mean())


def test_ler_gradient_flows_only_through_selected_rows_and_target_side():
    z, labeled = _logits_with_confidences()
    mask = select_known(z, labeled, 2)
    z1 = z.clone().requires_grad_(True)
    local_entropy_loss(z1, mask, torch.full((4,), 0.25, dtype=torch.float64).log()).backward()
    assert (z1.grad[~mask] == 0).all() and (z1.grad[mask].abs().sum(1) > 0).all()
    # detaching the target changes the gradient (the reference keeps it attached)
    z2 = z.clone().requires_grad_(True)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    local_entropy_loss(z2, mask, prior, detach_target=True).backward()
    z3 = z.clone().requires_grad_(True)
    local_entropy_loss(z3, mask, prior).backward()
    assert not torch.allclose(z2.grad, z3.grad)
    # with a detached target: d/dz (1/N) CE(q, softmax(s)) = (softmax(s) - q)/(tau_o N) on selected rows
    s = z / 0.05 + 0.4 * prior
    expect = (torch.softmax(s, 1) - torch.softmax(z / 0.05, 1)) / (0.05 * 6) * mask[:, None]
    torch.testing.assert_close(z2.grad, expect)


def test_module_uses_old_prior_then_updates_ema():
    z, labeled = _logits_with_confidences()
    ler = LocalEntropyRegularizer(4, 2, threshold=0.7, momentum=0.9).double()
    p0 = ler.prior.clone()
    torch.testing.assert_close(p0, torch.full((4,), 0.25, dtype=torch.float64))
    out = ler(z, labeled)
    mask = select_known(z, labeled, 2)
    torch.testing.assert_close(out, local_entropy_loss(z, mask, p0.log()))
    assert ler.num_selected == 2
    # p <- m p + (1-m) mean softmax(z / T_p), T_p = 1 (reference), over all rows
    p1 = 0.9 * p0 + 0.1 * torch.softmax(z, 1).mean(0)
    torch.testing.assert_close(ler.prior, p1)
    torch.testing.assert_close(ler.prior.sum(), torch.tensor(1.0, dtype=torch.float64))
    ler(z, labeled)
    torch.testing.assert_close(ler.prior, 0.9 * p1 + 0.1 * torch.softmax(z, 1).mean(0))
    # prior_temperature changes what is averaged
    ler2 = LocalEntropyRegularizer(4, 2, momentum=0.5, prior_temperature=0.1).double()
    ler2(z, labeled)
    torch.testing.assert_close(ler2.prior, 0.5 * p0 + 0.5 * torch.softmax(z / 0.1, 1).mean(0))
    # eval mode freezes the prior
    ler.eval()
    before = ler.prior.clone()
    ler(z, labeled)
    torch.testing.assert_close(ler.prior, before, rtol=0, atol=0)


def test_prior_state_dict_round_trip():
    z, labeled = _logits_with_confidences()
    a = LocalEntropyRegularizer(4, 2, momentum=0.8).double()
    for _ in range(3):
        a(z, labeled)
    b = LocalEntropyRegularizer(4, 2, momentum=0.8).double()
    assert "prior" in a.state_dict()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.prior, a.prior, rtol=0, atol=0)
    assert not torch.allclose(b.prior, torch.full((4,), 0.25, dtype=torch.float64))


def test_dual_view_kl_hand_computation_and_zero():
    z1 = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]], dtype=torch.float64)
    z2 = torch.tensor([[0.1, 0.2, 0.0], [0.2, -0.1, 0.3]], dtype=torch.float64)
    tau = 0.1
    total = 0.0
    for a, b in zip(z1.tolist(), z2.tolist()):
        pa = [math.exp(v / tau) for v in a]
        pa = [v / sum(pa) for v in pa]
        pb = [math.exp(v / tau) for v in b]
        pb = [v / sum(pb) for v in pb]
        total += sum(x * math.log(x / y) for x, y in zip(pa, pb))
    assert dual_view_kl(z1, z2, temperature=tau).item() == pytest.approx(total / 2, rel=1e-12)
    torch.testing.assert_close(
        dual_view_kl(z1, z2, reduction="sum"),
        F.kl_div(F.log_softmax(z2 / tau, 1), F.log_softmax(z1 / tau, 1), log_target=True, reduction="sum"),
    )
    assert dual_view_kl(z1, z1).item() == 0.0
    assert dual_view_kl(z1, z1, form="reference").item() == 0.0
    assert dual_view_kl(z1, z2).item() > 0 and dual_view_kl(z2, z1).item() > 0


def test_dual_view_kl_reference_form_and_gradients_both_views():
    z1 = torch.tensor([[0.5, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[0.1, 0.2, 0.0]], dtype=torch.float64, requires_grad=True)
    out = dual_view_kl(z1, z2, form="reference")
    p1, p2 = torch.softmax(z1 / 0.1, 1), torch.softmax(z2 / 0.1, 1)
    ref = (p1 * (torch.log_softmax(p1, 1) - torch.log_softmax(p2, 1))).sum()
    torch.testing.assert_close(out, ref)
    dual_view_kl(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"threshold": 1.2}, InputError, r"threshold must lie in \[0, 1\]"),
        ({"momentum": -0.1}, InputError, r"momentum must lie in \[0, 1\]"),
        ({"tau_o": 0.0}, InputError, r"tau_o must be a finite number > 0"),
        ({"lam_ler": -1}, InputError, r"lam_ler must be a finite number >= 0"),
        ({"num_known": 11}, InputError, r"num_known=11 exceeds num_classes=10"),
        ({"num_known": 0}, InputError, r"num_known must be an int >= 1"),
    ],
)
def test_bad_options(kwargs, exc, match):
    args = {"num_classes": 10, "num_known": 5, **kwargs}
    with pytest.raises(exc, match=match):
        LocalEntropyRegularizer(**args)


def test_bad_inputs():
    ler = LocalEntropyRegularizer(4, 2)
    z = torch.zeros(3, 4)
    with pytest.raises(TypeError, match=r"labeled_mask must have dtype torch.bool"):
        ler(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match=r"labeled_mask must have shape \[3\]"):
        ler(z, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(InputError, match=r"logits must have shape \[batch, 4\]"):
        ler(torch.zeros(3, 5), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(InputError, match=r"logits_view2 must have the shape of logits_view1"):
        dual_view_kl(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(InputError, match=r"form must be one of 'paper', 'reference'"):
        dual_view_kl(z, z, form="kl")
    with pytest.raises(TypeError, match=r"logits_view1 must be a torch.Tensor"):
        dual_view_kl([[0.0]], z)
    torch.testing.assert_close(ler.prior, torch.full((4,), 0.25))


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_dual_view_kl_detach_second_view_is_algorithm_1(form):
    # Algorithm 1: ``x1_pred, x2_pred.detach() = s_pred.chunk(2)``: same value, the gradient on
    # view 1 is unchanged and view 2 gets none
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    d1, d2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = dual_view_kl(a1, a2, form=form)
    det = dual_view_kl(d1, d2, form=form, detach_second_view=True)
    torch.testing.assert_close(det, full, rtol=0, atol=0)
    full.backward()
    det.backward()
    assert d2.grad is None  # no path to view 2 at all
    assert a2.grad.abs().sum() > 0  # the released code trains view 2 too
    torch.testing.assert_close(d1.grad, a1.grad, rtol=1e-12, atol=1e-15)


def test_dual_view_kl_gradients_match_closed_form():
    g = torch.Generator().manual_seed(8)
    tau, B = 0.1, 6
    z1 = (0.3 * torch.randn(B, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    z2 = (0.3 * torch.randn(B, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    dual_view_kl(z1, z2, temperature=tau).backward()
    p, q = torch.softmax(z1.detach() / tau, 1), torch.softmax(z2.detach() / tau, 1)
    kl = (p * (p.log() - q.log())).sum(1, keepdim=True)
    # d/dz = p (log p/p' - KL) / tau ; d/dz' = (p' - p) / tau ; both / B for the mean
    torch.testing.assert_close(z1.grad, p * (p.log() - q.log() - kl) / (tau * B))
    torch.testing.assert_close(z2.grad, (q - p) / (tau * B))
    w1 = z1.detach().clone().requires_grad_(True)
    w2 = z2.detach().clone().requires_grad_(True)
    dual_view_kl(w1, w2, temperature=tau, detach_second_view=True).backward()
    torch.testing.assert_close(w1.grad, p * (p.log() - q.log() - kl) / (tau * B))
    assert w2.grad is None


def test_detach_and_sync_options_validate():
    z = torch.zeros(3, 4)
    with pytest.raises(TypeError, match=r"detach_second_view must be a bool, got str"):
        dual_view_kl(z, z, detach_second_view="yes")
    with pytest.raises(TypeError, match=r"sync must be None, True or False, got str"):
        LocalEntropyRegularizer(4, 2, sync="auto")
    ler = LocalEntropyRegularizer(4, 2, sync=True)
    with pytest.raises(InputError, match=r"sync=True needs an initialised torch.distributed"):
        ler(z, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(InputError, match=r"sync=True needs an initialised torch.distributed"):
        ler.update_prior(z)
    torch.testing.assert_close(ler.prior, torch.full((4,), 0.25))
    # sync=False (or None without a process group) is the single-process update
    a = LocalEntropyRegularizer(4, 2, sync=False).double()
    b = LocalEntropyRegularizer(4, 2).double()
    zz, labeled = _logits_with_confidences()
    a(zz, labeled)
    b(zz, labeled)
    torch.testing.assert_close(a.prior, b.prior, rtol=0, atol=0)


def test_bfloat16_logits_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(23)
    logits = torch.randn(16, 4, generator=g) * 3
    mask = torch.arange(16) < 8
    out, ref = under_autocast(lambda z: LocalEntropyRegularizer(4, 2, threshold=0.3)(z, mask), logits)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-6)
    kl, kl_ref = under_autocast(lambda z: dual_view_kl(z[:8], z[8:]), logits)
    assert kl.dtype == torch.bfloat16
    torch.testing.assert_close(kl.float(), kl_ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    from mixed_precision import assert_half_in_half_out

    # 2,000 classes: entropies and divergences summed in half precision are units in the last
    # place off; computed in float32 each result is the float64 value rounded once
    g = torch.Generator().manual_seed(33)
    n, k = 8, 2000
    logits, logits2 = 0.2 * torch.randn(n, k, generator=g), 0.2 * torch.randn(n, k, generator=g)
    prior = torch.softmax(torch.randn(k, generator=g), 0)
    everyone = torch.ones(n, dtype=torch.bool)
    assert_half_in_half_out(
        lambda z: local_entropy_loss(z, everyone, torch.log(prior), reduction="none"), logits, dtype=dtype)
    assert_half_in_half_out(lambda z, y: dual_view_kl(z, y, reduction="none"), logits, logits2, dtype=dtype)

    def ler(z):
        fn = LocalEntropyRegularizer(k, k, threshold=0.0)
        fn.prior.copy_(prior)
        return fn(z, ~everyone)

    assert_half_in_half_out(ler, logits, dtype=dtype)
    fn = LocalEntropyRegularizer(k, k, threshold=0.0, momentum=0.5)
    fn(logits.to(dtype), ~everyone)
    assert fn.num_selected == n and fn.prior.dtype == torch.float32
    expected = 0.5 / k + 0.5 * torch.softmax(logits.to(dtype).double(), 1).mean(0)
    torch.testing.assert_close(fn.prior.double(), expected, rtol=1e-5, atol=1e-9)
