"""Policy losses and entropy interventions against slow, element-by-element references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrokit import InputError
from entrokit.rl.losses import (
    COV_PRESETS,
    EntropyHistory,
    aepo_reinforce_loss,
    aepo_select_positives,
    anchored_entropy_loss,
    clip_cov_policy_loss,
    clipped_surrogate,
    corridor_entropy_loss,
    entropy_bonus,
    kl_cov_policy_loss,
    phase_weight,
    sampled_entropy,
    steer_token_weights,
)

F64 = torch.float64
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def batch(b=4, t=6, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2 - 0.05
    old = logp + spread * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return logp.requires_grad_(), old, adv, ent.requires_grad_(), mask


# -- slow references --------------------------------------------------------------------------


def ref_agg(vals, mask, mode):
    """vals: nested python lists of 0-dim tensors (or floats), mask: bool tensor."""
    b, t = mask.shape
    if mode == "token-mean":
        items = [vals[i][j] for i in range(b) for j in range(t) if mask[i, j]]
        return sum(items) / len(items)
    seqs = []
    for i in range(b):
        row = [vals[i][j] for j in range(t) if mask[i, j]]
        if not row:
            continue
        seqs.append(sum(row) / len(row) if mode == "seq-mean-token-mean" else sum(row))
    out = sum(seqs) / len(seqs)
    return out / t if mode == "seq-mean-token-sum-norm" else out


def ref_surrogate(logp, old, adv, mask, lo, hi, dual, mode, weights=None):
    b, t = mask.shape
    vals = [[None] * t for _ in range(b)]
    for i in range(b):
        a = adv[i]
        for j in range(t):
            r = torch.exp(logp[i, j] - old[i, j])
            clipped_r = min(max(r, 1 - lo), 1 + hi) if not isinstance(r, torch.Tensor) else r.clamp(1 - lo, 1 + hi)
            term = max(-a * r, -a * clipped_r)
            if dual is not None and a < 0:
                term = min(term, -a * dual)
            vals[i][j] = term * (1.0 if weights is None else float(weights[i, j]))
    return ref_agg(vals, mask, mode)


def cov_ref(adv, logp, mask):
    b, t = mask.shape
    cells = [(i, j) for i in range(b) for j in range(t) if mask[i, j]]
    a_bar = sum(float(adv[i]) for i, _ in cells) / len(cells)
    l_bar = sum(float(logp[i, j]) for i, j in cells) / len(cells)
    return {(i, j): (float(adv[i]) - a_bar) * (float(logp[i, j]) - l_bar) for i, j in cells}


# -- PPO / GRPO -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("lo", "hi", "dual"), [(0.2, None, None), (0.2, 0.28, 3.0), (0.1, 0.5, 1.5)])
def test_clipped_surrogate_matches_reference_value_and_gradient(mode, lo, hi, dual):
    logp, old, adv, _, mask = batch(spread=0.5)
    loss, stats = clipped_surrogate(logp, old, adv, mask, clip_low=lo, clip_high=hi, dual_clip=dual, mode=mode)
    (g,) = torch.autograd.grad(loss, logp)
    lp2 = logp.detach().clone().requires_grad_()
    ref = ref_surrogate(lp2, old, adv, mask, lo, lo if hi is None else hi, dual, mode)
    (g_ref,) = torch.autograd.grad(ref, lp2)
    torch.testing.assert_close(loss, ref.reshape(()))
    torch.testing.assert_close(g, g_ref)
    assert float(g[~mask].abs().sum()) == 0.0  # padding gets no gradient
    cells = mask.nonzero().tolist()
    kl = sum(float(old[i, j] - logp.detach()[i, j]) for i, j in cells) / len(cells)
    assert float(stats["approx_kl"]) == pytest.approx(kl)


def test_clip_high_and_dual_clip_semantics():
    # ratio 2 with A > 0: clipped at 1 + clip_high; ratio 10 with A < 0: dual clip caps the loss at -c A
    logp = torch.log(torch.tensor([[2.0, 10.0]], dtype=F64))
    old = torch.zeros(1, 2, dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    loss, stats = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                    mode="seq-mean-token-sum")
    assert float(loss) == pytest.approx(-1.28 + 3.0)
    assert float(stats["dual_clip_frac"]) == 0.5 and float(stats["clip_frac"]) == 0.5


def test_token_weights_multiply_the_per_token_loss():
    logp, old, adv, ent, mask = batch()
    w, _ = steer_token_weights(adv, logp, old, ent, mask)
    loss, _ = clipped_surrogate(logp, old, adv, mask, token_weights=w, dual_clip=10.0, clip_high=0.28)
    ref = ref_surrogate(logp.detach(), old, adv, mask, 0.2, 0.28, 10.0, "token-mean", weights=w)
    torch.testing.assert_close(loss, ref.reshape(()))


# -- entropy terms ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_entropy_bonus_and_per_prompt_coefficients(mode):
    _, _, _, ent, mask = batch()
    loss, stats = entropy_bonus(ent, mask, 0.01, mode=mode)
    rows = [[ent[i, j] for j in range(mask.shape[1])] for i in range(mask.shape[0])]
    torch.testing.assert_close(loss, (-0.01 * ref_agg(rows, mask, mode)).reshape(()))
    torch.testing.assert_close(stats["entropy"], ref_agg(rows, mask, mode).detach().reshape(()))
    c = torch.tensor([0.0, 0.1, 0.2, 0.0], dtype=F64)
    loss, _ = entropy_bonus(ent, mask, c, mode=mode)
    rows_c = [[c[i] * ent[i, j] for j in range(mask.shape[1])] for i in range(mask.shape[0])]
    torch.testing.assert_close(loss, (-ref_agg(rows_c, mask, mode)).reshape(()))


def test_anchored_loss_is_the_squared_deviation():
    _, _, _, ent, mask = batch()
    loss, stats = anchored_entropy_loss(ent, mask, anchor=0.7, coef=0.005)
    rows = [[ent[i, j] for j in range(mask.shape[1])] for i in range(mask.shape[0])]
    h = ref_agg(rows, mask, "seq-mean-token-mean")
    torch.testing.assert_close(loss, (0.005 * (h - 0.7) ** 2).reshape(()))
    (g,) = torch.autograd.grad(loss, ent)
    n_seq = 4  # the gradient of c (H - a)^2 on a token of sequence b is 2 c (H - a) / (n_b * n_seq)
    i, j = 1, 2
    assert float(g[i, j]) == pytest.approx(2 * 0.005 * float((h - 0.7).detach()) / (6 * n_seq))


def test_corridor_penalty_reference():
    _, _, _, ent, mask = batch()
    hbar, kl, kr, alpha, lam, beta = 0.9, 0.8, 1.2, 0.5, 0.1, phase_weight(3, 10, gamma=0.5)
    loss, stats = corridor_entropy_loss(ent, mask, hbar, coef=lam, alpha=alpha, kappa=(kl, kr), beta=beta)
    b, t = mask.shape
    h_rows = [[ent[i, j] for j in range(t)] for i in range(b)]
    out_rows = [[max(kl * hbar - ent[i, j], 0 * ent[i, j]) + max(ent[i, j] - kr * hbar, 0 * ent[i, j])
                 for j in range(t)] for i in range(b)]
    ref = -lam * (ref_agg(h_rows, mask, "token-mean") - beta * alpha * ref_agg(out_rows, mask, "token-mean"))
    torch.testing.assert_close(loss, ref.reshape(()))
    assert float(stats["history_mean"]) == hbar
    loss0, stats0 = corridor_entropy_loss(ent, mask, None, coef=lam, alpha=alpha, kappa=(kl, kr))
    torch.testing.assert_close(loss0, (-lam * ref_agg(h_rows, mask, "token-mean")).reshape(()))
    assert math.isnan(float(stats0["history_mean"]))


def test_phase_weight_closed_form():
    assert phase_weight(0, 100) == 2.0
    assert phase_weight(50, 100, gamma=math.log(3)) == pytest.approx(1 + 1 / 3)
    assert phase_weight(np.int64(10), np.int64(20)) == pytest.approx(1 + math.exp(-1))
    with pytest.raises(TypeError, match="step must be an int, got float"):
        phase_weight(1.5, 10)
    with pytest.raises(InputError, match="total_steps must be an int >= 2"):
        phase_weight(0, 1)


def test_entropy_history_mean_resume_and_refusal():
    hist = EntropyHistory(sync=False)
    assert hist.mean is None
    for v in (1.0, 2.0, np.float32(4.0)):
        hist.update(v)
    assert hist.mean == pytest.approx(7 / 3)
    other = EntropyHistory(sync=False)
    other.load_state_dict(hist.state_dict())
    assert other.mean == hist.mean
    with pytest.raises(InputError, match="EntropyHistory did not update its entropy history"):
        hist.update(float("nan"))
    assert hist.mean == pytest.approx(7 / 3) and float(hist.count) == 3


# -- Clip-Cov / KL-Cov ------------------------------------------------------------------------


def test_presets_are_the_anchor_numbers():
    # anchors note, section 2.1-2.2: official KL-Cov takes 0.2 % of tokens with beta 1; verl 0.02 % with 0.1
    assert COV_PRESETS["official"]["kl_cov_ratio"] == 2e-3 and COV_PRESETS["official"]["kl_coef"] == 1.0
    assert COV_PRESETS["verl"]["kl_cov_ratio"] == 2e-4 and COV_PRESETS["verl"]["kl_coef"] == 0.1
    for name in ("official", "verl"):
        assert COV_PRESETS[name]["clip_cov_ratio"] == 2e-4 and COV_PRESETS[name]["clip_cov_bounds"] == (1.0, 5.0)
    assert COV_PRESETS["official"]["clip_low"] == COV_PRESETS["official"]["clip_high"] == 1.0  # recipe
    assert COV_PRESETS["verl"]["clip_low"] == COV_PRESETS["verl"]["clip_high"] == 0.2


def test_kl_cov_presets_differ_ten_fold_in_tokens_and_strength():
    g = torch.Generator().manual_seed(3)
    b, t = 50, 200  # 10,000 valid tokens
    logp = -torch.rand(b, t, generator=g, dtype=F64)
    old = logp + 0.05 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.ones(b, t, dtype=torch.bool)
    aggregate_unclipped = (-adv[:, None] * torch.exp(logp - old)).mean()
    lo, so = kl_cov_policy_loss(logp, old, adv, mask, preset="official")
    lv, sv = kl_cov_policy_loss(logp, old, adv, mask, preset="verl")
    assert float(so["num_penalized"]) == 20 and float(sv["num_penalized"]) == 2
    assert float(lo) > float(lv) > float(aggregate_unclipped) - 1e-15


@pytest.mark.parametrize("preset", ["official", "verl"])
def test_kl_cov_matches_reference(preset):
    logp, old, adv, _, mask = batch(b=6, t=8, seed=4)
    ratio, beta = 0.2, COV_PRESETS[preset]["kl_coef"]
    loss, stats = kl_cov_policy_loss(logp, old, adv, mask, preset=preset, ratio=ratio)
    cov = cov_ref(adv, logp.detach(), mask)
    k = max(1, int(len(cov) * ratio))
    chosen = set(sorted(cov, key=lambda c: -cov[c])[:k])
    b, t = mask.shape
    vals = [[-adv[i] * torch.exp(logp[i, j] - old[i, j])
             + (beta * (logp[i, j] - old[i, j]).abs() if (i, j) in chosen else 0.0)
             for j in range(t)] for i in range(b)]
    torch.testing.assert_close(loss, ref_agg(vals, mask, "token-mean").reshape(()))
    assert float(stats["num_penalized"]) == k


def _clip_cov_ref(logp, old, adv, mask, ratio, lb, ub, lo, hi, seed):
    cov = cov_ref(adv, logp.detach(), mask)
    b, t = mask.shape
    cand = []
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            r = math.exp(float(logp.detach()[i, j] - old[i, j]))
            a = float(adv[i])
            clipped = -a * min(max(r, 1 - lo), 1 + hi) > -a * r
            if not clipped and lb < cov[(i, j)] < ub:
                cand.append((i, j))
    n = min(max(1, int(ratio * int(mask.sum()))), len(cand))
    perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed)).tolist()
    dropped = {cand[p] for p in perm[:n]}
    vals = [[0.0 * logp[i, j] if (i, j) in dropped else
             torch.maximum(-adv[i] * torch.exp(logp[i, j] - old[i, j]),
                           -adv[i] * torch.exp(logp[i, j] - old[i, j]).clamp(1 - lo, 1 + hi))
             for j in range(t)] for i in range(b)]
    return ref_agg(vals, mask, "token-mean"), dropped, cand


@pytest.mark.parametrize("preset", ["official", "verl"])
def test_clip_cov_matches_reference_with_a_generator(preset):
    logp, old, adv, _, mask = batch(b=6, t=8, seed=5, spread=0.4)
    p = COV_PRESETS[preset]
    bounds, ratio = (-0.05, 2.0), 0.25
    loss, stats = clip_cov_policy_loss(logp, old, adv, mask, preset=preset, ratio=ratio, bounds=bounds,
                                       generator=torch.Generator().manual_seed(11))
    ref, dropped, cand = _clip_cov_ref(logp, old, adv, mask, ratio, *bounds, p["clip_low"], p["clip_high"], 11)
    assert len(cand) > len(dropped) > 1  # the draw is a real choice
    torch.testing.assert_close(loss, ref.reshape(()))
    (g,) = torch.autograd.grad(loss, logp)
    for i, j in dropped:
        assert float(g[i, j]) == 0.0
    assert float(stats["num_dropped"]) == len(dropped)
    # reproducible with the same seed, and the seed matters
    again, _ = clip_cov_policy_loss(logp, old, adv, mask, preset=preset, ratio=ratio, bounds=bounds,
                                    generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(again, loss)
    others = {float(clip_cov_policy_loss(logp.detach(), old, adv, mask, preset=preset, ratio=ratio, bounds=bounds,
                                         generator=torch.Generator().manual_seed(s))[0]) for s in range(8)}
    assert len(others) > 1


def test_clip_cov_with_no_candidate_drops_nothing():
    logp, old, adv, _, mask = batch()
    loss, stats = clip_cov_policy_loss(logp, old, adv, mask, bounds=(100.0, 200.0))
    ref, _ = clipped_surrogate(logp, old, adv, mask, clip_low=1.0, clip_high=1.0)
    torch.testing.assert_close(loss, ref)
    assert float(stats["num_dropped"]) == 0


# -- STEER ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 5), st.integers(5, 8), st.integers(0, 10_000),
    st.floats(0.0, 1.0), st.floats(0.0, 1.0),
)
def test_steer_weights_lie_in_the_range_and_fall_with_omega(b, t, seed, a, c):
    lo, hi = min(a, c), max(a, c)
    logp, old, adv, ent, _ = batch(b=b, t=t, seed=seed)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[0, 0] = True
    w, _ = steer_token_weights(adv, logp, old, ent, mask, w_min=lo, w_max=hi)
    valid = w[mask]
    assert bool(((valid >= lo - 1e-12) & (valid <= hi + 1e-12)).all())
    assert float(w[~mask].abs().sum()) == 0.0
    pi = logp.detach().exp()
    omega = (adv[:, None] * (-old).exp() * pi * (1 - pi) * (logp.detach() + ent.detach())).abs()[mask]
    order = torch.argsort(omega)
    assert bool((valid[order].diff() <= 1e-12).all())  # larger Omega, smaller weight


def test_steer_weights_reference():
    logp, old, adv, ent, mask = batch()
    logp, ent = logp.detach(), ent.detach()
    w, _ = steer_token_weights(adv, logp, old, ent, mask, w_min=0.8, w_max=1.2)
    b, t = mask.shape
    omega = {}
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                pi = math.exp(float(logp[i, j]))
                omega[(i, j)] = abs(float(adv[i]) / math.exp(float(old[i, j])) * pi * (1 - pi)
                                    * (float(logp[i, j]) + float(ent[i, j])))
    lo, hi = min(omega.values()), max(omega.values())
    for (i, j), o in omega.items():
        assert float(w[i, j]) == pytest.approx(1.2 - 0.4 * (o - lo) / (hi - lo))
    assert float(w[~mask].abs().sum()) == 0.0 and not w.requires_grad
    big = max(omega, key=omega.get)
    assert float(w[big]) == pytest.approx(0.8)
    w_eq, _ = steer_token_weights(torch.ones(2), torch.full((2, 3), -1.0), torch.full((2, 3), -1.0),
                                  torch.full((2, 3), 0.5), torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(w_eq, torch.full((2, 3), 1.0))


# -- AEPO and the Monte-Carlo estimate ----------------------------------------------------------


def test_sampled_entropy_is_unbiased_on_policy_and_biased_off_policy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, dtype=F64, generator=g) * 2
    p = torch.softmax(logits, -1)
    h_true = float(-(p * p.log()).sum())
    n = 40000
    a = torch.multinomial(p, n, replacement=True, generator=g)
    est = float(sampled_entropy(p.log()[a].reshape(1, n), torch.ones(1, n, dtype=torch.bool)))
    se = float((p * p.log() ** 2).sum() - h_true**2) ** 0.5 / n**0.5
    assert abs(est - h_true) < 4 * se
    q = torch.softmax(logits / 2.0, -1)  # sampled at temperature 2: the estimate moves away from H(pi)
    b = torch.multinomial(q, n, replacement=True, generator=g)
    est_t = float(sampled_entropy(p.log()[b].reshape(1, n), torch.ones(1, n, dtype=torch.bool)))
    assert est_t - h_true > 20 * se


def test_aepo_selection_never_crashes_and_caps():
    idx, stats = aepo_select_positives(torch.tensor([-1.0, 0.0, 0.05]))
    assert idx.numel() == 0 and float(stats["num_selected"]) == 0
    adv = torch.tensor([0.5, -0.2, 0.06, math.nan, 1.0, 0.9])
    idx, stats = aepo_select_positives(adv, max_samples=np.int64(2))
    assert idx.tolist() == [0, 2] and float(stats["num_positive"]) == 4
    lp = torch.randn(0, 5, requires_grad=True)
    loss, _ = aepo_reinforce_loss(lp, torch.zeros(0, 5, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and lp.grad is not None
    logp, _, _, _, mask = batch()
    logp = logp.detach()
    loss, _ = aepo_reinforce_loss(logp, mask)
    cells = mask.nonzero().tolist()
    assert float(loss) == pytest.approx(-sum(float(logp[i, j]) for i, j in cells) / len(cells))


# -- bad inputs ---------------------------------------------------------------------------------


def _ok():
    logp, old, adv, ent, mask = batch()
    return logp.detach(), old, adv, ent.detach(), mask


def _nan_at_valid():
    logp, old, adv, ent, mask = _ok()
    logp = logp.clone()
    logp[1, 1] = math.nan
    return logp, old, adv, mask


BAD = [
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a, m[:, :-1]), InputError,
     r"old_logp must have the mask's shape|logp must have the mask's shape \[4, 5\]"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a[:3], m), InputError, r"advantages must have the mask's shape"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp.long(), o, a, m), TypeError, "logp must have a floating dtype"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a, m.double()), TypeError, "mask must be boolean"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp[:0], o[:0], a[:0], m[:0]), InputError, "the batch is empty"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a, m, clip_low=1.5), InputError, r"clip_low must lie in \[0, 1\]"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a, m, dual_clip=1.0), InputError, r"dual_clip must lie in \(1, inf\)"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp, o, a, m, mode="sum"), InputError, "mode must be one of"),
    (lambda lp, o, a, e, m: clipped_surrogate(lp.tolist(), o, a, m), TypeError, "logp must be a torch.Tensor"),
    (lambda lp, o, a, e, m: kl_cov_policy_loss(lp, o, a, m, ratio=0.0), InputError, r"ratio must lie in \(0, 1\]"),
    (lambda lp, o, a, e, m: kl_cov_policy_loss(lp, o, a, m, ratio=1.5), InputError, r"ratio must lie in \(0, 1\]"),
    (lambda lp, o, a, e, m: kl_cov_policy_loss(lp, o, a, m, preset="paper"), InputError,
     r"preset must be one of \['official', 'verl'\]"),
    (lambda lp, o, a, e, m: clip_cov_policy_loss(lp, o, a, m, generator=0), TypeError, "generator must be a torch.Generator"),
    (lambda lp, o, a, e, m: clip_cov_policy_loss(lp, o, a, m, bounds=(5.0, 1.0)), InputError, "lb < ub"),
    (lambda lp, o, a, e, m: entropy_bonus(e, m, -0.1), InputError, r"coef must lie in \[0, inf\)"),
    (lambda lp, o, a, e, m: entropy_bonus(e, m, torch.ones(7)), InputError, "coef must have the mask's shape"),
    (lambda lp, o, a, e, m: corridor_entropy_loss(e, m, 1.0, coef=0.1, alpha=1.0, kappa=(1.2, 0.8)), InputError,
     "kappa_l=1.2 exceeds kappa_r=0.8"),
    (lambda lp, o, a, e, m: steer_token_weights(a, lp, o, e, m, w_min=1.3), InputError, "w_min=1.3 exceeds w_max"),
    (lambda lp, o, a, e, m: aepo_select_positives(a, max_samples=np.float64(3)), TypeError,
     "max_samples must be an int, got float64"),
    (lambda lp, o, a, e, m: aepo_select_positives(a.long()), TypeError, "advantages must have a floating dtype"),
    (lambda lp, o, a, e, m: anchored_entropy_loss(e, m, anchor=math.inf), InputError, "anchor must lie in"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD)
def test_bad_inputs_raise_typed_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(*_ok())


@pytest.mark.parametrize(
    "call",
    [
        lambda lp, o, a, m: clipped_surrogate(lp, o, a, m),
        lambda lp, o, a, m: clip_cov_policy_loss(lp, o, a, m),
        lambda lp, o, a, m: kl_cov_policy_loss(lp, o, a, m),
        lambda lp, o, a, m: sampled_entropy(lp, m),
        lambda lp, o, a, m: entropy_bonus(lp.neg(), m, 0.1),
    ],
)
def test_nan_at_a_valid_token_is_refused_padding_is_not_read(call):
    with pytest.raises(InputError, match=r"contains NaN or inf at a valid \(mask=True\) token"):
        call(*_nan_at_valid())
    logp, old, adv, _, mask = _ok()
    logp = logp.clone()
    logp[0, 5] = math.nan  # a padded position (mask[0, 4:] is False)
    logp.requires_grad_()
    out = call(logp, old, adv, mask)
    loss = out[0] if isinstance(out, tuple) else out
    assert math.isfinite(float(loss.detach()))
    (g,) = torch.autograd.grad(loss, logp)
    assert bool(torch.isfinite(g).all()) and float(g[0, 5]) == 0.0  # no NaN leaks into the gradient


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_outputs_follow_the_device_and_generator(device):
    logp, old, adv, ent, mask = (t.detach().to(device) for t in batch())
    gen = torch.Generator(device=device).manual_seed(0)
    loss, stats = clip_cov_policy_loss(logp, old, adv, mask, ratio=0.2, bounds=(-10.0, 10.0), generator=gen)
    assert loss.device.type == device and all(v.device.type == device for v in stats.values())
    for fn in (clipped_surrogate, kl_cov_policy_loss):
        loss, stats = fn(logp, old, adv, mask)
        assert loss.device.type == device and loss.dtype == F64
    w, _ = steer_token_weights(adv, logp, old, ent, mask)
    assert w.device.type == device
