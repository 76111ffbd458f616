import math

import pytest
import torch

from entrokit._errors import InputError
from entrokit.regularizers import (
    EntropyBandRegularizer,
    LearnableSoftmaxTemperature,
    ScaledFFN,
    SpectralNormLinear,
    WeightNormLinear,
    attention_entropy,
    entropy_band_penalty,
    temperature_softmax,
)

EMAX = math.log(16)


def _ent(values, L=1, B=1, H=1):
    return torch.tensor(values, dtype=torch.float64).reshape(L, B, H, -1)


def test_penalty_zero_inside_band_and_quadratic_outside():
    theta = torch.tensor([[0.5]], dtype=torch.float64)
    tau, m = 0.5 * EMAX, 0.2 * EMAX
    inside = _ent([tau, tau + 0.99 * m, tau - 0.99 * m])
    assert entropy_band_penalty(inside, theta, EMAX, 0.2) == 0
    d1, d2 = 1.5 * m, -1.2 * m
    outside = _ent([tau + d1, tau + d2, tau])
    # hard gate: full squared deviation, summed over positions (code form)
    torch.testing.assert_close(entropy_band_penalty(outside, theta, EMAX, 0.2), torch.tensor(d1**2 + d2**2, dtype=torch.float64))
    smooth = entropy_band_penalty(outside, theta, EMAX, 0.2, gate="smooth")
    torch.testing.assert_close(smooth, torch.tensor((abs(d1) - m) ** 2 + (abs(d2) - m) ** 2, dtype=torch.float64))
    # per-head (Algorithm 1) uses the mean entropy: mean deviation (d1+d2)/3 is inside the band
    assert entropy_band_penalty(outside, theta, EMAX, 0.2, mode="per_head") == 0
    far = _ent([tau + 2 * m, tau + 3 * m])
    torch.testing.assert_close(entropy_band_penalty(far, theta, EMAX, 0.2, mode="per_head"), torch.tensor((2.5 * m) ** 2, dtype=torch.float64))


def test_penalty_averages_over_heads_and_layers():
    theta = torch.zeros(2, 3, dtype=torch.float64)
    e = torch.zeros(2, 1, 3, 1, dtype=torch.float64)
    e[1, 0, 2, 0] = 1.0  # one head of one layer at entropy 1, margin 0.1
    torch.testing.assert_close(entropy_band_penalty(e, theta, 1.0, 0.1), torch.tensor(1.0 / 6, dtype=torch.float64))
    e2 = [e[0], e[1]]  # list form
    torch.testing.assert_close(entropy_band_penalty(e2, theta, 1.0, 0.1), torch.tensor(1.0 / 6, dtype=torch.float64))


def test_thresholds_learnable_and_move_toward_entropies():
    g = torch.Generator().manual_seed(0)
    T = 16
    attn = [torch.full((2, 2, T, T), 1.0 / T, dtype=torch.float64) for _ in range(2)]  # entropy = log T
    reg = EntropyBandRegularizer(2, 2, lam=1.0, gamma=0.1, theta_init=0.3, dtype=torch.float64)
    loss = reg(attn)
    assert loss > 0
    loss.backward()
    # d/dθ (E - θE)^2 = -2E(E - θE) < 0 when E > θE: gradient descent raises θ toward E/E_max = 1
    assert (reg.theta.grad < 0).all()
    expected = -2 * EMAX * (EMAX - 0.3 * EMAX) * (2 * T) / (2 * 2)  # Σ over B·T, /H, /L
    torch.testing.assert_close(reg.theta.grad, torch.full((2, 2), expected, dtype=torch.float64))
    # gradient also reaches the attention logits
    logits = torch.randn(2, 2, T, T, generator=g, dtype=torch.float64, requires_grad=True)
    reg2 = EntropyBandRegularizer(1, 2, lam=1.0, gamma=0.0, theta_init=0.1, dtype=torch.float64)
    reg2([logits.softmax(-1)]).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_regularizer_lambda_scaling_and_errors():
    attn = [torch.softmax(torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)), -1)]
    r1 = EntropyBandRegularizer(1, 2, lam=1.0, theta_init=0.0)
    r2 = EntropyBandRegularizer(1, 2, lam=0.25, theta_init=0.0)
    torch.testing.assert_close(r2(attn), 0.25 * r1(attn))
    with pytest.raises(InputError, match="lam"):
        EntropyBandRegularizer(1, 2, lam=-1.0)
    with pytest.raises(InputError, match="gamma"):
        EntropyBandRegularizer(1, 2, gamma=-0.1)
    with pytest.raises(InputError, match="layers"):
        r1(attn + attn)
    with pytest.raises(InputError, match="theta must have shape"):
        entropy_band_penalty(torch.zeros(1, 1, 3, 2), torch.zeros(1, 2), 1.0)
    with pytest.raises(InputError, match="mode"):
        entropy_band_penalty(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2), 1.0, mode="mean")
    with pytest.raises(InputError, match="max_entropy"):
        entropy_band_penalty(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2), 0.0)


def test_temperature_monotone_and_limits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) * 3
    ents = [attention_entropy(temperature_softmax(logits, torch.full((1, 4), t, dtype=torch.float64))).mean().item()
            for t in (0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 1000.0)]
    assert all(a < b for a, b in zip(ents, ents[1:]))
    assert ents[0] < 1e-3 and abs(ents[-1] - math.log(8)) < 1e-3
    mod = LearnableSoftmaxTemperature(1, 4, dtype=torch.float64)
    torch.testing.assert_close(mod(logits), logits.softmax(-1))  # t = 1 at init
    mod(logits).pow(2).sum().backward()
    assert mod.raw.grad.shape == (1, 4) and mod.raw.grad.abs().sum() > 0
    with pytest.raises(InputError, match="max_len"):
        mod(torch.zeros(1, 1, 5, 5, dtype=torch.float64))


def test_pi_friendly_layers():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    wn = WeightNormLinear(6, 4, dtype=torch.float64)
    torch.testing.assert_close(wn(x), x @ wn.weight.T + wn.bias)  # g = ‖v‖ at init
    with torch.no_grad():
        wn.g.fill_(2.0)
    torch.testing.assert_close(wn.normalized_weight().norm(dim=1), torch.full((4,), 2.0, dtype=torch.float64))
    sn = SpectralNormLinear(6, 4, dtype=torch.float64)
    W = sn.weight.detach().clone()
    y = sn(x)
    torch.testing.assert_close(y, x @ (W / torch.linalg.matrix_norm(W, ord=2)).T + sn.bias, rtol=1e-6, atol=1e-8)
    ffn = torch.nn.Linear(6, 6, dtype=torch.float64)
    sc = ScaledFFN(ffn, alpha_init=2.0, beta_init=0.5)
    torch.testing.assert_close(sc(x), 0.5 * x + ffn(x) / 2.0)
    with pytest.raises(InputError, match="alpha_init"):
        ScaledFFN(ffn, alpha_init=0.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "mean"}, InputError, r"mode must be one of 'per_position', 'per_head'; got 'mean'"),
        ({"gate": "soft"}, InputError, r"gate must be one of 'hard', 'smooth'; got 'soft'"),
        ({"theta_init": float("nan")}, InputError, r"theta_init must be a finite number, got nan"),
        ({"theta_init": 1.5}, InputError, r"theta_init must lie in \[0, 1\].*theta \* max_entropy"),
        ({"theta_init": "0.5"}, TypeError, r"theta_init must be a real number, got str"),
        ({"max_entropy": float("inf")}, InputError, r"max_entropy must be a finite number > 0, got inf"),
        ({"max_entropy": 0.0}, InputError, r"max_entropy must be a finite number > 0.*math.log\(T\)"),
        ({"max_entropy": -1.0}, InputError, r"max_entropy must be a finite number > 0"),
        ({"lam": float("nan")}, InputError, r"lam must be a finite number >= 0"),
        ({"eps": -1e-9}, InputError, r"eps must be a finite number >= 0"),
        ({"atol": 0.0}, InputError, r"atol must be a finite number > 0"),
        ({"dtype": torch.long}, TypeError, r"dtype must be a floating torch.dtype"),
    ],
)
def test_band_regularizer_validates_options_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EntropyBandRegularizer(2, 4, **kwargs)


def test_band_regularizer_rejects_non_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    reg = EntropyBandRegularizer(1, 4)
    with pytest.raises(InputError, match=r"attentions\[0\] has negative entries.*not logits"):
        reg([logits])
    with pytest.raises(InputError, match=r"attentions\[0\] rows must sum to 1 over valid keys \(atol=0.0001\)"):
        reg([logits.abs()])
    with pytest.raises(InputError, match=r"attentions\[1\] contains NaN or inf"):
        EntropyBandRegularizer(2, 4)([logits.softmax(-1), torch.full((2, 4, 6, 6), float("nan"))])
    # tolerance follows the dtype: float32 rounding passes, half gets 1e-2
    p = logits.softmax(-1)
    assert torch.isfinite(reg([p]))
    reg_h = EntropyBandRegularizer(1, 4, dtype=torch.float16)
    assert torch.isfinite(reg_h([(p * (1 + 5e-3)).half()]))
    with pytest.raises(InputError, match=r"atol=1e-06"):
        EntropyBandRegularizer(1, 4, dtype=torch.float64)([(p.double() * (1 + 1e-5))])
    # check_inputs=False skips the value checks (no device sync)
    quiet = EntropyBandRegularizer(1, 4, check_inputs=False)
    quiet([logits.abs()])
    # metadata checks always run
    with pytest.raises(InputError, match=r"attentions have 4 heads but theta has 3"):
        EntropyBandRegularizer(1, 3, check_inputs=False)([p])
    with pytest.raises(InputError, match=r"1 key\(s\).*pass max_entropy"):
        reg([torch.ones(2, 4, 6, 1)])
    with pytest.raises(TypeError, match=r"attentions must be a list"):
        reg(42)


def test_band_penalty_validates_inputs():
    e = torch.zeros(1, 2, 2, 3)
    theta = torch.zeros(1, 2)
    with pytest.raises(InputError, match=r"max_entropy must be a finite number > 0, got inf"):
        entropy_band_penalty(e, theta, float("inf"))
    with pytest.raises(InputError, match=r"gate must be one of 'hard', 'smooth'"):
        entropy_band_penalty(e, theta, 1.0, gate="soft")
    with pytest.raises(TypeError, match=r"query_mask must be a bool tensor"):
        entropy_band_penalty(e, theta, 1.0, query_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match=r"query_mask must have shape \(batch, queries\) = \(2, 3\)"):
        entropy_band_penalty(e, theta, 1.0, query_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"entropies\[0\] must be a floating torch.Tensor"):
        entropy_band_penalty([torch.zeros(2, 2, 3, dtype=torch.long)], theta, 1.0)
    with pytest.raises(TypeError, match=r"entropies must be a floating tensor"):
        entropy_band_penalty(e.long(), theta, 1.0)


def test_temperature_and_ffn_options():
    with pytest.raises(InputError, match=r"init must be a finite number > 0, got inf"):
        LearnableSoftmaxTemperature(2, 4, init=float("inf"))
    with pytest.raises(InputError, match=r"parametrization must be one of 'log', 'direct'"):
        LearnableSoftmaxTemperature(2, 4, parametrization="exp")
    with pytest.raises(InputError, match=r"max_len must be an int >= 1"):
        LearnableSoftmaxTemperature(2, 0)
    with pytest.raises(InputError, match=r"temperature of shape \(3,\) does not broadcast"):
        temperature_softmax(torch.zeros(1, 2, 4, 4), torch.ones(3))
    with pytest.raises(TypeError, match=r"temperature must be a torch.Tensor"):
        temperature_softmax(torch.zeros(1, 2, 4, 4), 1.0)
    ffn = torch.nn.Linear(3, 3)
    with pytest.raises(InputError, match=r"alpha_init.*must be a finite number > 0, got inf"):
        ScaledFFN(ffn, alpha_init=float("inf"))
    with pytest.raises(InputError, match=r"beta_init must be a finite number, got nan"):
        ScaledFFN(ffn, beta_init=float("nan"))


# -- query padding mask -----------------------------------------------------------------------
def _attn_logits(L=2, B=3, H=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True) for _ in range(L)]


def _causal_softmax(s):
    T = s.shape[-1]
    return torch.softmax(s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf), -1)


@pytest.mark.parametrize("mode", ["per_position", "per_head"])
def test_query_mask_changes_penalty_only_on_padded_rows(mode):
    L, B, H, T = 2, 3, 2, 5
    qm = torch.ones(B, T, dtype=torch.bool)
    qm[0, -2:] = False  # right padding
    qm[2, :1] = False  # left padding
    reg = EntropyBandRegularizer(L, H, lam=1.0, gamma=0.05, theta_init=0.2, mode=mode, dtype=torch.float64)
    logits = _attn_logits(L, B, H, T)
    pen = reg.penalty([_causal_softmax(s) for s in logits], query_mask=qm)
    # reference: the penalty of the real rows only, computed by hand
    ents = torch.stack([attention_entropy(_causal_softmax(s)) for s in logits])  # (L, B, H, T)
    tau, m = 0.2 * math.log(T), 0.05 * math.log(T)
    w = qm[None, :, None, :].double()
    if mode == "per_position":
        d = ents - tau
        ref = (torch.where(d.abs() > m, d.square(), torch.zeros_like(d)) * w).sum((1, 3)).mean()
    else:
        d = (ents * w).sum((1, 3)) / w.sum((1, 3)) - tau
        ref = torch.where(d.abs() > m, d.square(), torch.zeros_like(d)).mean()
    torch.testing.assert_close(pen, ref)
    assert pen != reg.penalty([_causal_softmax(s) for s in logits])  # the mask matters here
    # an all-True mask is no mask
    torch.testing.assert_close(reg.penalty([_causal_softmax(s) for s in logits], query_mask=torch.ones(B, T, dtype=torch.bool)),
                               reg.penalty([_causal_softmax(s) for s in logits]))
    # whatever sits in the padded rows changes nothing, and they get no gradient
    pen.backward()
    grads = [s.grad.clone() for s in logits]
    noisy = [s.detach().clone() for s in logits]
    g = torch.Generator().manual_seed(5)
    for s in noisy:
        s[~qm[:, None, :, None].expand_as(s)] = 10 * torch.randn(int((~qm).sum()) * H * T, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reg.penalty([_causal_softmax(s) for s in noisy], query_mask=qm), pen)
    pad = ~qm[:, None, :, None].expand(B, H, T, T)
    for gr in grads:
        assert gr[pad].abs().max() == 0 and gr[~pad].abs().max() > 0
    if mode == "per_position":
        # per row, the code-form penalty is separable: the real rows' gradients equal the unmasked ones
        for s in logits:
            s.grad = None
        reg.penalty([_causal_softmax(s) for s in logits]).backward()
        for s, gr in zip(logits, grads):
            torch.testing.assert_close(gr[~pad], s.grad[~pad])
    # (B, H, T) masks work too, and forward applies lambda
    reg.lam = 0.5
    torch.testing.assert_close(reg([_causal_softmax(s) for s in logits], query_mask=qm[:, None, :].expand(B, H, T)), 0.5 * pen.detach(),
                               check_dtype=False)


def test_query_mask_bad_inputs():
    reg = EntropyBandRegularizer(1, 2)
    p = [torch.softmax(torch.randn(3, 2, 4, 4), -1)]
    with pytest.raises(TypeError, match=r"query_mask must be a bool tensor .* query_mask.bool\(\)"):
        reg(p, query_mask=torch.ones(3, 4))
    with pytest.raises(InputError, match=r"query_mask must have shape \(batch, queries\) = \(3, 4\).*attention_mask\[:, -T:\]"):
        reg(p, query_mask=torch.ones(3, 6, dtype=torch.bool))


# -- learnable temperature with a KV cache -----------------------------------------------------
def _attend(temp, q, k, v, offset):
    """Causal attention of queries at positions offset.. over all keys 0..S-1 (a KV cache)."""
    Tq, S = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(Tq)[:, None] + (offset if isinstance(offset, int) else 0)
    causal = torch.arange(S)[None, :] <= i
    return temp(s, causal, offset=offset) @ v


@pytest.mark.parametrize("per_position", [True, False])
def test_temperature_with_kv_cache_matches_full_sequence(per_position):
    g = torch.Generator().manual_seed(3)
    B, H, T, dh = 2, 3, 9, 4
    temp = LearnableSoftmaxTemperature(H, 12, per_position=per_position, dtype=torch.float64)
    with torch.no_grad():
        temp.raw.copy_(torch.randn(temp.raw.shape, generator=g, dtype=torch.float64))  # distinct t per position
    q, k, v = (torch.randn(B, H, T, dh, generator=g, dtype=torch.float64) for _ in range(3))
    full = _attend(temp, q, k, v, 0)
    # prefill 4 tokens, then decode one token at a time against the growing cache
    steps = [_attend(temp, q[:, :, :4], k[:, :, :4], v[:, :, :4], 0)]
    for n in range(4, T):
        steps.append(_attend(temp, q[:, :, n : n + 1], k[:, :, : n + 1], v[:, :, : n + 1], n))
    torch.testing.assert_close(torch.cat(steps, 2), full, rtol=1e-12, atol=1e-12)
    # a chunk of 3 new queries after 5 cached ones
    torch.testing.assert_close(_attend(temp, q[:, :, 5:8], k[:, :, :8], v[:, :, :8], 5), full[:, :, 5:8], rtol=1e-12, atol=1e-12)
    if per_position:  # without the offset, the decoded rows use the wrong temperatures
        s = q[:, :, -1:] @ k.transpose(-1, -2) / 2.0
        assert not torch.allclose(temp(s) @ v, full[:, :, -1:])
    # a per-row offset tensor (rows with different cache lengths) equals per-row int offsets
    s = torch.randn(B, H, 2, T, generator=g, dtype=torch.float64)
    off = torch.tensor([3, 6])
    out = temp(s, offset=off)
    for b in range(B):
        torch.testing.assert_close(out[b : b + 1], temp(s[b : b + 1], offset=int(off[b])))


def test_temperature_offset_bad_inputs():
    temp = LearnableSoftmaxTemperature(2, 6)
    s = torch.zeros(2, 2, 2, 6)
    with pytest.raises(InputError, match=r"offset must be >= 0"):
        temp(s, offset=-1)
    with pytest.raises(InputError, match=r"query positions reach 6 \(offset 5 \+ 2 queries\) but max_len=6"):
        temp(s, offset=5)
    with pytest.raises(InputError, match=r"query positions reach 7"):
        temp(s, offset=torch.tensor([0, 6]))
    with pytest.raises(TypeError, match=r"offset must be an int .* got float"):
        temp(s, offset=1.0)
    with pytest.raises(TypeError, match=r"offset must be an int or an integer tensor .* torch.float32"):
        temp(s, offset=torch.zeros(2))
    with pytest.raises(InputError, match=r"an offset tensor must have shape \(batch,\) = \(2,\)"):
        temp(s, offset=torch.zeros(3, dtype=torch.long))


def test_query_mask_ignores_whatever_fills_padded_rows():
    # fully masked (padded) rows come out as zeros (SDPA-style), uniform rows or NaN depending
    # on the kernel; with query_mask they pass the input checks and change nothing
    L, B, H, T = 1, 2, 2, 4
    qm = torch.tensor([[True, True, True, False], [False, True, True, True]])
    p = _causal_softmax(_attn_logits(L, B, H, T, seed=3)[0].detach())
    reg = EntropyBandRegularizer(L, H, lam=1.0, gamma=0.0, theta_init=0.1, dtype=torch.float64)
    ref = reg([p], query_mask=qm)
    pad = ~qm[:, None, :].expand(B, H, T)
    keys = torch.ones(T, T, dtype=torch.bool).tril() & qm[:, None, None, :]  # causal + key padding
    pk = torch.softmax(_attn_logits(L, B, H, T, seed=3)[0].detach().masked_fill(~keys, -math.inf), -1)
    ref_k = reg([pk.nan_to_num()], keys, query_mask=qm)
    for fill in (0.0, float("nan"), 3.0):
        bad = p.clone()
        bad[pad] = fill
        with pytest.raises(InputError, match=r"rows must sum to 1|NaN"):
            reg([bad])
        torch.testing.assert_close(reg([bad], query_mask=qm), ref)
        bad_k = pk.clone()  # with a key mask as well
        bad_k[pad] = fill
        torch.testing.assert_close(reg([bad_k], keys, query_mask=qm), ref_k)
    logits = _attn_logits(L, B, H, T, seed=3)[0]
    a = _causal_softmax(logits)
    a = torch.where(pad[..., None], torch.full_like(a, float("nan")), a)
    reg([a], query_mask=qm).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[pad] == 0).all()


def test_bfloat16_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(24)
    torch.manual_seed(0)
    lst = LearnableSoftmaxTemperature(2, 8)
    out, ref = under_autocast(lst, torch.randn(1, 2, 5, 5, generator=g))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    reg = EntropyBandRegularizer(1, 2, max_entropy=math.log(5), lam=1.0)
    attn = torch.softmax(torch.randn(2, 2, 5, 5, generator=g) * 3, -1)
    pen, pen_ref = under_autocast(lambda a: reg([a / a.sum(-1, keepdim=True)]), attn)
    torch.testing.assert_close(pen.float(), pen_ref, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    from mixed_precision import assert_half_in_half_out

    g = torch.Generator().manual_seed(35)
    # the band penalty sums over 2 x 4,000 queries: units in the last place off in half precision
    ents = 3 * torch.rand(2, 2, 2, 4000, generator=g)
    theta = torch.rand(2, 2, generator=g)
    assert_half_in_half_out(
        lambda e: entropy_band_penalty(e, theta, math.log(3000), gate="smooth"), ents, dtype=dtype)
    reg = EntropyBandRegularizer(1, 2, lam=1.0, gate="smooth", check_inputs=False)
    attn = torch.softmax(2 * torch.randn(2, 2, 8, 3000, generator=g), -1)
    assert_half_in_half_out(lambda a: reg([a]), attn, dtype=dtype)
    # a float32 temperature (a parameter under autocast) is not rounded to half precision
    logits = 0.2 * torch.randn(2, 2, 6, 40, generator=g)  # no weight below float16's normal range
    t = 0.3 + torch.rand(2, 6, generator=g)
    assert_half_in_half_out(lambda z: temperature_softmax(z, t), logits, dtype=dtype)
    lst = LearnableSoftmaxTemperature(2, 6, init=0.37)
    assert_half_in_half_out(lst, logits, dtype=dtype)
    assert lst.temperature.dtype == torch.float32
