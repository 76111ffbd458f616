"""Attention entropy recorder and entropy band regulariser on a Hugging Face GPT-2.

The model is built from a tiny config with random weights (nothing is downloaded) and the
eager attention, the only implementation that forms the attention probabilities.
"""

import inspect
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from entrokit._errors import InputError  # noqa: E402
from entrokit.regularizers import (  # noqa: E402
    AttentionEntropyRecorder,
    EntropyBandRegularizer,
    attention_entropy,
)

L, H, VOCAB = 2, 2, 64


def _gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("attn_implementation", "eager")
    cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _ids(B, T, seed=1):
    return torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_recorder_layer_head_map_of_tiny_gpt2():
    model = _gpt2().eval()
    ids = _ids(3, 10)
    with torch.no_grad():
        model(ids, output_attentions=True)  # transformers installs its own capturing hooks here
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    with AttentionEntropyRecorder(model).register_hf() as rec, torch.no_grad():
        out = model(ids, output_attentions=True)
    assert rec.names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert rec.entropy.shape == (L, H) and torch.isfinite(rec.entropy).all()
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    ref = torch.stack([attention_entropy(a, causal).mean((0, 2)) for a in out.attentions])
    ref_n = torch.stack([attention_entropy(a, causal, normalize=True).mean((0, 2)) for a in out.attentions])
    torch.testing.assert_close(rec.entropy, ref)
    torch.testing.assert_close(rec.normalized_entropy, ref_n)  # log(#visible keys) per row
    assert (rec.entropy > 0).all() and (rec.entropy <= math.log(10)).all()
    fig = rec.plot_heatmap()  # the layer x head map
    assert len(fig.axes) == 2
    # the recorder leaves the model's outputs unchanged and detaches cleanly
    torch.testing.assert_close(model(ids).logits, out.logits)
    assert hooks == {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def test_recorder_drops_padded_queries():
    model = _gpt2().eval()
    ids = _ids(2, 10)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0  # right padding: the second sequence has 6 tokens
    with AttentionEntropyRecorder(model).register_hf() as rec, torch.no_grad():
        model(ids, attention_mask=am)
    with AttentionEntropyRecorder(model).register_hf() as ref, torch.no_grad():
        model(ids[:1])  # the same sequences one by one, without padding
        model(ids[1:, :6])
    torch.testing.assert_close(rec.entropy, ref.entropy)
    torch.testing.assert_close(rec.normalized_entropy, ref.normalized_entropy)
    # left padding: fully padded query rows (uniform over garbage in eager attention) are dropped
    am_left = torch.ones(2, 10, dtype=torch.long)
    am_left[1, :4] = 0
    with AttentionEntropyRecorder(model).register_hf() as rec, torch.no_grad():
        out = model(ids, attention_mask=am_left, output_attentions=True)
    valid = torch.ones(10, 10, dtype=torch.bool).tril() & am_left.bool()[:, None, None, :]
    rows = am_left.bool()[:, None, :].double()  # (B, 1, T)
    ref = torch.stack([(attention_entropy(a, valid, check_inputs=False) * rows).sum((0, 2)) / rows.sum((0, 2)) for a in out.attentions])
    torch.testing.assert_close(rec.entropy, ref.to(rec.entropy.dtype))


def test_recorder_with_kv_cache_matches_full_sequence():
    model = _gpt2().eval()
    ids = _ids(2, 9)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with AttentionEntropyRecorder(model).register_hf() as full, torch.no_grad():
        model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))
    with AttentionEntropyRecorder(model).register_hf() as inc, torch.no_grad():
        out = model(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), use_cache=True)
        for n in range(4, 9):  # decode one token at a time; the mask covers cache + new token
            out = model(ids[:, n : n + 1], attention_mask=torch.ones(2, n + 1, dtype=torch.long), use_cache=True,
                        **{cache_kw: out.past_key_values})
    torch.testing.assert_close(inc.entropy, full.entropy)
    torch.testing.assert_close(inc.normalized_entropy, full.normalized_entropy)


def test_band_regularizer_trains_tiny_gpt2_with_padding():
    model = _gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).train()  # attention dropout would break the row sums
    reg = EntropyBandRegularizer(L, H, lam=1e-2, gamma=0.05, theta_init=0.2, max_entropy=math.log(64))
    model.entropy_reg = reg  # a submodule: DDP all-reduces theta with the model
    ids = _ids(2, 10)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0
    out = model(ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100), output_attentions=True)
    pen = reg.penalty(out.attentions, query_mask=am.bool())
    # padded rows change nothing: the per-position sum equals that of the unpadded sequences
    with torch.no_grad():
        a1 = model(ids[:1], output_attentions=True).attentions
        a2 = model(ids[1:, :6], output_attentions=True).attentions
    torch.testing.assert_close(pen.detach(), reg.penalty(a1).detach() + reg.penalty(a2).detach())
    assert pen > 0
    loss = out.loss + reg(out.attentions, query_mask=am.bool())
    loss.backward()
    assert reg.theta.grad is not None and reg.theta.grad.abs().sum() > 0
    wq = model.transformer.h[0].attn.c_attn.weight.grad
    assert wq is not None and torch.isfinite(wq).all()
    # a few steps move the penalty down
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        out = model(ids, attention_mask=am, output_attentions=True)
        p = reg.penalty(out.attentions, query_mask=am.bool())
        first = p.item() if first is None else first
        opt.zero_grad()
        p.backward()
        opt.step()
    assert p.item() < first


def test_hf_errors():
    with pytest.raises(InputError, match=r"attn_implementation='sdpa'.*attn_implementation='eager'"):
        AttentionEntropyRecorder(_gpt2(attn_implementation="sdpa")).register_hf()
    with pytest.raises(InputError, match=r"no attention module .* register_hf\(modules=\[...\]\)"):
        AttentionEntropyRecorder(torch.nn.Linear(2, 2)).register_hf()
    with pytest.raises(TypeError, match=r"modules must be a list of nn.Module"):
        AttentionEntropyRecorder(torch.nn.Linear(2, 2)).register_hf(modules=torch.nn.Linear(2, 2))
    # an explicitly listed module that returns no weights
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match=r"returned no attention weights.*attn_implementation='eager'"):
        with AttentionEntropyRecorder(lin).register_hf(modules=[lin[0]]):
            lin(torch.zeros(1, 2))
    # a model-level padding mask that does not match the attention batch
    model = _gpt2().eval()
    rec = AttentionEntropyRecorder(model).register_hf()
    with pytest.raises(InputError, match=r"padding mask"), rec, torch.no_grad():
        rec._hf_query_mask = torch.ones(5, 3, dtype=torch.bool)
        model.transformer.h[0].attn(torch.zeros(2, 4, 32))
    # attention dropout in training mode: the returned weights are not probabilities
    model = _gpt2(attn_pdrop=0.5).train()
    out = model(_ids(2, 10), output_attentions=True)
    with pytest.raises(InputError, match=r"rows must sum to 1"):
        EntropyBandRegularizer(L, H)(out.attentions)
