import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit.regularizers import (
    AttentionEntropyRecorder,
    attention_entropy,
    classify_heads,
    plot_heatmap,
    quartile_fractions,
)


def _rand_attn(g, shape, dtype=torch.float64):
    return torch.softmax(torch.randn(shape, generator=g, dtype=dtype) * 2, -1)


def test_uniform_gives_log_n_and_one_normalized():
    for n in (2, 7, 16):
        a = torch.full((2, 3, 4, n), 1.0 / n, dtype=torch.float64)
        torch.testing.assert_close(attention_entropy(a), torch.full((2, 3, 4), math.log(n), dtype=torch.float64))
        torch.testing.assert_close(attention_entropy(a, normalize=True), torch.ones(2, 3, 4, dtype=torch.float64))


def test_one_hot_is_zero_with_finite_gradient():
    a = F.one_hot(torch.tensor([[[0, 3, 1]]]), 5).double().requires_grad_(True)
    h = attention_entropy(a)
    assert torch.equal(h, torch.zeros(1, 1, 3, dtype=torch.float64))
    h.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    a = _rand_attn(g, (2, 3, 5, 6))
    ref = -(a.numpy() * np.log(a.numpy())).sum(-1)
    np.testing.assert_allclose(attention_entropy(a).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(attention_entropy(a, normalize=True).numpy(), ref / np.log(6), rtol=1e-12)


def test_eps_mode_matches_reference_code_form():
    g = torch.Generator().manual_seed(1)
    a = _rand_attn(g, (1, 2, 3, 4))
    ref = -(a * torch.log(a + 1e-9)).sum(-1)
    torch.testing.assert_close(attention_entropy(a, eps=1e-9), ref)
    assert (attention_entropy(a, eps=1e-9) <= attention_entropy(a)).all()


def test_causal_mask_counts_valid_keys():
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # uniform over the i+1 visible keys
    a = causal.double() / causal.sum(-1, keepdim=True)
    a = a[None, None]
    h = attention_entropy(a, mask=causal)
    torch.testing.assert_close(h[0, 0], torch.log(torch.arange(1, T + 1, dtype=torch.float64)))
    hn = attention_entropy(a, mask=causal, normalize=True)
    expected = torch.ones(T, dtype=torch.float64)
    expected[0] = 0.0  # one valid key: normalised entropy defined as 0
    torch.testing.assert_close(hn[0, 0], expected)


def test_key_padding_mask_and_fully_masked_rows():
    g = torch.Generator().manual_seed(2)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logits = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    mask = valid[:, None, None, :]
    a = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
    h = attention_entropy(a, mask=mask, normalize=True)
    sub = a[1, 0, :, :2]
    torch.testing.assert_close(h[1, 0], -(sub * sub.log()).sum(-1) / math.log(2))
    # a fully masked query row contributes 0 and passes the row-sum check
    a2 = a.clone()
    a2[0, 0, 0] = 0.0
    m2 = mask.expand(2, 1, 3, 4).clone()
    m2[0, 0, 0] = False
    assert attention_entropy(a2, m2)[0, 0, 0] == 0


def test_bad_inputs():
    a = torch.full((2, 3, 4), 0.25)
    with pytest.raises(InputError, match="4 dims"):
        attention_entropy(a)
    with pytest.raises(InputError, match="sum to 1"):
        attention_entropy(torch.full((1, 1, 2, 4), 0.3))
    with pytest.raises(InputError, match="negative"):
        attention_entropy(torch.tensor([[[[1.5, -0.5]]]]))
    with pytest.raises(TypeError, match="floating"):
        attention_entropy(torch.ones(1, 1, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        attention_entropy(torch.full((1, 1, 2, 2), 0.5), mask=torch.zeros(2, 2))
    with pytest.raises(InputError, match="masked keys"):
        attention_entropy(torch.full((1, 1, 2, 2), 0.5), mask=torch.tensor([True, False]))
    with pytest.raises(InputError, match="broadcast"):
        attention_entropy(torch.full((1, 1, 2, 2), 0.5), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="eps"):
        attention_entropy(torch.full((1, 1, 2, 2), 0.5), eps=-1.0)
    # unchecked mode skips the value checks
    attention_entropy(torch.full((1, 1, 2, 4), 0.3), check_inputs=False)


def _manual_mha_entropy(mha, x, key_padding_mask=None):
    _, w = mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=True, average_attn_weights=False)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return attention_entropy(w, mask).mean((0, 2)), w


def test_recorder_on_mha_matches_manual_and_keeps_outputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    ref, w_ref = _manual_mha_entropy(mha, x, kpm)
    out_plain, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    with AttentionEntropyRecorder(mha) as rec:
        out, w = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
        out2, w2 = mha(x, x, x, key_padding_mask=kpm)  # default: head-averaged weights
    assert w is None
    torch.testing.assert_close(out, out_plain)
    torch.testing.assert_close(w2, w_ref.mean(1))
    torch.testing.assert_close(rec.entropy[0], ref)  # two identical calls: same mean
    # normalised entropy divides by log(valid keys): 3 keys for bag 1, 5 otherwise
    hn = attention_entropy(w_ref, ~kpm[:, None, None, :], normalize=True).mean((0, 2))
    torch.testing.assert_close(rec.normalized_entropy[0], hn)


class _SDPABlock(nn.Module):
    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, causal=True):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, D)

    def probs(self, x, causal=True):
        B, T, D = x.shape
        q, k, _ = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // self.h)
        m = torch.ones(T, T, dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~m, -math.inf), -1), m


def test_recorder_on_sdpa_matches_manual():
    torch.manual_seed(0)
    model = nn.Sequential(_SDPABlock(), _SDPABlock()).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    orig = F.scaled_dot_product_attention
    with torch.no_grad():
        y_plain = model(x)
        with AttentionEntropyRecorder(model) as rec:
            y = model(x)
        assert F.scaled_dot_product_attention is orig  # restored
        torch.testing.assert_close(y, y_plain)
        p0, m = model[0].probs(x)
        p1, _ = model[1].probs(model[0](x))
    assert rec.names == ["0", "1"]
    torch.testing.assert_close(rec.entropy[0], attention_entropy(p0, m).mean((0, 2)))
    torch.testing.assert_close(rec.entropy[1], attention_entropy(p1, m).mean((0, 2)))
    torch.testing.assert_close(rec.normalized_entropy[1], attention_entropy(p1, m, normalize=True).mean((0, 2)))


class _ExposingAttention(nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.fixed = probs

    def forward(self, x):
        self.attention_probs = self.fixed
        return x


def test_recorder_custom_sites_and_detection():
    # constructed attention: head 0 one-hot (collapse), head 1 uniform (overload), head 2 in between
    T = 8
    onehot = F.one_hot(torch.zeros(T, dtype=torch.long), T).double()
    uniform = torch.full((T, T), 1.0 / T, dtype=torch.float64)
    mid = torch.zeros(T, T, dtype=torch.float64)
    mid[:, :3] = 1.0 / 3  # entropy log 3 = 0.528 log 8
    probs = torch.stack([onehot, uniform, mid])[None]
    mod = _ExposingAttention(probs)
    other = nn.Identity()
    rec = AttentionEntropyRecorder(nn.Sequential(mod, other))
    rec.register(mod, name="exposed")
    rec.register(other, lambda m, i, o: probs.flip(1), name="extracted")
    with rec:
        rec.model(torch.zeros(1))
    torch.testing.assert_close(rec.entropy[0], torch.tensor([0.0, math.log(T), math.log(3)], dtype=torch.float64))
    torch.testing.assert_close(rec.entropy[1], torch.tensor([math.log(3), math.log(T), 0.0], dtype=torch.float64))
    found = rec.detect()
    assert found["collapse"] == [("exposed", 0), ("extracted", 2)]
    assert found["overload"] == [("exposed", 1), ("extracted", 1)]
    found_n = rec.detect(reference="log_n")
    assert found_n == found
    col, ovl = classify_heads(rec.entropy)
    assert col.sum() == 2 and ovl.sum() == 2
    torch.testing.assert_close(quartile_fractions(rec.entropy), torch.tensor([2, 0, 2, 2], dtype=torch.float64) / 6)
    fig = rec.plot_heatmap()
    assert fig.axes and fig.axes[0].get_xlabel() == "head"
    fig2 = plot_heatmap(rec.entropy, rec.names)
    assert len(fig2.axes[0].images) == 1


def test_recorder_errors():
    rec = AttentionEntropyRecorder(nn.Linear(2, 2))
    with pytest.raises(InputError, match="nothing recorded"):
        _ = rec.entropy
    with pytest.raises(TypeError, match="nn.Module"):
        AttentionEntropyRecorder("model")
    mod = nn.Identity()
    rec2 = AttentionEntropyRecorder(nn.Sequential(mod)).register(mod)
    with pytest.raises(InputError, match="attention_probs"), rec2:
        rec2.model(torch.zeros(1))
    with pytest.raises(InputError, match="collapse_below"):
        classify_heads(torch.ones(2, 2), collapse_below=0.8, overload_above=0.5)


def test_recorder_mha_causal_attn_mask_uses_valid_key_count():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(4, 1, batch_first=True).double()
    T = 5
    x = torch.randn(2, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # MHA convention: True = not allowed
    with AttentionEntropyRecorder(mha) as rec:
        _, w = mha(x, x, x, attn_mask=future, average_attn_weights=False)
    hn = attention_entropy(w, ~future, normalize=True).mean((0, 2))
    torch.testing.assert_close(rec.normalized_entropy[0], hn)
    # dividing row i by log(i + 1) instead of log T gives larger normalised entropies
    assert rec.normalized_entropy[0, 0] > attention_entropy(w, normalize=True).mean()


def test_classify_heads_validates_types_and_shapes():
    with pytest.raises(TypeError, match=r"entropy must be a floating torch.Tensor \(layers, heads\)"):
        classify_heads([[0.1, 0.2]])
    with pytest.raises(InputError, match=r"normalized must have the shape of entropy \(1, 2\)"):
        classify_heads(torch.ones(1, 2), torch.ones(2, 2), reference="log_n")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_attention_is_summed_in_float32_and_returned_in_its_dtype(dtype):
    from mixed_precision import assert_half_in_half_out

    # 3,000 keys: an entropy summed in half precision is units in the last place off
    g = torch.Generator().manual_seed(34)
    a = torch.softmax(2 * torch.randn(2, 2, 8, 3000, generator=g), -1)
    # the weights rounded to `dtype` sum to 1 only to its precision: no row-sum check
    assert_half_in_half_out(lambda t: attention_entropy(t, check_inputs=False), a, dtype=dtype)
    assert_half_in_half_out(lambda t: attention_entropy(t, normalize=True, check_inputs=False), a, dtype=dtype)
