"""Bad inputs to every public entry point of entrokit.regularizers (table-driven;
tests/bad_inputs.py). AttentionEntropyRecorder, plot_heatmap, convert_to_sigma_reparam,
IndexedDataset and all_gather_rows take modules, datasets or process groups: their
checks are in their own test files."""

import math

import torch
import torch.nn.functional as F

import entrokit.regularizers as R
from bad_inputs import (
    CALLER_DTYPE,
    META,
    PROPAGATES,
    SAME,
    half_rows,
    numpy_int,
    randn_with,
    table_test,
    tensor_rows,
)
from entrokit import InputError

g = torch.Generator().manual_seed(2)
_r = randn_with(g)
ATTN = dict(attn=torch.softmax(_r(2, 2, 5, 5), -1))
LABELS, INDEX, MASK8 = torch.randint(0, 4, (8,), generator=g), torch.arange(8), torch.arange(8) < 4
LOGITS = dict(logits=_r(8, 4))
BATCH_LOGITS = dict(
    nan=(InputError, "logits of this batch contain NaN or inf; expected finite values"),
    inf=(InputError, "logits of this batch contain NaN or inf"),
    empty=(InputError, r"logits must have shape \[batch, 4\] \(batch >= 1\), got \(0, 4\)"),
    int=(TypeError, "logits must have a floating dtype, got torch.int64"),
    meta=META, noncontig=SAME,
    shape=(InputError, r"logits must have shape \[batch, 4\] \(batch >= 1\), got \(1, 8, 4\)"),
)
FN_LOGITS = {**BATCH_LOGITS, "nan": PROPAGATES, "inf": PROPAGATES,
             "shape": (InputError, r"logits must have shape \[batch, num_classes\] \(batch >= 1\), got \(1, 8, 4\)")}
HALF_ROWS = half_rows(CALLER_DTYPE)
HALF_LAYER = half_rows((TypeError, r"has torch.float32 weights but the input is torch.(b?float16)"))
AEM_BASE = dict(logits=_r(3, 2), scores=_r(3, 7), target=torch.tensor([0, 1, 1]))
_aem_rows = {
    **tensor_rows({k: AEM_BASE[k] for k in ("logits", "scores")},
                  nan={"scores": (InputError, r"scores must not contain NaN or \+inf"), "logits": PROPAGATES},
                  inf={"scores": (InputError, r"scores must not contain NaN or \+inf"), "logits": PROPAGATES},
                  empty={"logits": (InputError, r"logits \(0, 2\) and target \(3,\) must have one row per bag"),
                         "scores": (InputError, r"scores is empty \(shape \(0, 7\)\); expected at least one bag")},
                  int={"logits": (TypeError, "logits must have a floating dtype, got torch.int64"),
                       "scores": (TypeError, "scores must be a floating torch.Tensor")},
                  meta=META, noncontig=SAME,
                  shape={"logits": (InputError, "must have one row per bag"),
                         "scores": (InputError, "scores has 1 bags but logits has 3")}),
    "target out of range": ({"target": torch.tensor([0, 5, 1])}, (InputError, "target out of range: got 5")),
    "target float shape": ({"target": torch.ones(3)}, (InputError, r"cannot match target \(3,\)")),
    # computed in float32 and returned in the caller's dtype for half inputs (module docstring)
    **HALF_ROWS,
}
TEMP = dict(logits=_r(1, 2, 5, 5))
_temp_rows = tensor_rows(TEMP, nan=PROPAGATES, noncontig=SAME, meta=META,
                         int=(TypeError, r"logits must be a floating torch.Tensor \(B, H, T, S\), got torch.int64"),
                         shape=(InputError, r"logits must be \(batch, heads, queries, keys\), got shape \(1, 1, 2, 5, 5\)"))
ENT = dict(entropy=_r(2, 3).abs())
_ent_rows = {
    **tensor_rows(ENT, meta=(InputError, "entropy is a meta tensor"), noncontig=SAME,
                  empty=(InputError, r"entropy is empty \(shape \(0, 3\)\)"),
                  int=(TypeError, "entropy must be a floating torch.Tensor")),
    "reference": ({"reference": "x"}, (InputError, "reference must be 'max_observed' or 'log_n', got 'x'")),
}
ATTN_ROWS = dict(nan=(InputError, "attn contains NaN or inf"), inf=(InputError, "attn contains NaN or inf"),
                 empty=(InputError, r"attn is empty \(shape \(0, 2, 5, 5\)\)"),
                 int=(TypeError, "attn must be a floating tensor, got torch.int64"), meta=META, noncontig=SAME,
                 shape=(InputError, r"attn must have 4 dims \(batch, heads, queries, keys\)"))
TWO = dict(logits=_r(8, 4), targets=torch.full((8, 4), 0.25))
KL = dict(logits_view1=_r(4, 3), logits_view2=_r(4, 3))
LIN = dict(input=_r(4, 6))
LAYER_ROWS = dict(nan=PROPAGATES, noncontig=SAME, meta=META, int=(TypeError, "needs a floating input, got torch.int64"),
                  shape=None)
LAYER_ROWS_SHAPE = {"input:features": ({"input": _r(4, 5)}, (InputError, r"expects 6 features on axis -1 of its input, got shape \(4, 5\)"))}


def _elr(**k):
    return R.ELRLoss(8, 4)(**k)


def _pskd(**k):
    return R.PSKDLoss(8, 4, 10)(**k)


ENTRIES = {
    "aem_loss": (lambda **k: R.aem_loss(**k), {**AEM_BASE, "lam": 0.1, "topk": 3}, {
        **_aem_rows, **numpy_int(topk=3),
        "lam=-1": ({"lam": -1.0}, (InputError, "lam must be a finite number >= 0, got -1.0")),
        "lam=nan": ({"lam": math.nan}, (InputError, "lam must be a finite number >= 0, got nan")),
        "topk=0": ({"topk": 0}, (InputError, "topk must be an int >= 1 or None, got 0")),
        "reduction": ({"reduction": "x"}, (InputError, "reduction must be one of 'mean', 'sum', 'none'")),
    }),
    "AttentionEntropyMaximization": (lambda **k: R.AttentionEntropyMaximization()(**k), AEM_BASE, _aem_rows),
    "negative_attention_entropy": (
        lambda **k: R.negative_attention_entropy(**k), {"attention": torch.softmax(_r(3, 7), -1), "topk": 3}, {
            **tensor_rows({"attention": None}, nan=(InputError, "attention must be finite and nonnegative"),
                          inf=(InputError, "attention must be finite and nonnegative"),
                          empty=(InputError, r"attention is empty \(shape \(0, 7\)\)"),
                          int=(TypeError, "attention must be a floating torch.Tensor"), meta=META, noncontig=SAME,
                          ),
            "attention:1-D": ({"attention": torch.full((7,), 1 / 7)},
                              (InputError, r"attention must be \(bags, instances\) or \(bags, rows, instances\)")),
            **numpy_int(topk=3), **HALF_ROWS,
            "topk=0": ({"topk": 0}, (InputError, "topk must be an int >= 1 or None, got 0")),
            "both": ({"scores": _r(3, 7)}, (InputError, "pass exactly one of attention= .* got both")),
        }),
    "attention_entropy": (lambda **k: R.attention_entropy(**k), ATTN, {
        **tensor_rows(ATTN, **ATTN_ROWS), **HALF_ROWS,
        "eps=-1": ({"eps": -1.0}, (InputError, "eps must be a finite float >= 0, got -1.0")),
        "atol=-1": ({"atol": -1.0}, (InputError, "atol must be a number >= 0 or None")),
        "mask int": ({"mask": torch.ones(2, 5, dtype=torch.long)}, (TypeError, "mask must be a bool tensor")),
    }),
    "head_entropy_stats": (lambda **k: R.head_entropy_stats(**k)[0], ATTN, tensor_rows(ATTN, **ATTN_ROWS)),
    "classify_heads": (lambda **k: R.classify_heads(**k)[0], ENT, {
        **_ent_rows,
        "collapse_below=2": ({"collapse_below": 2.0}, (InputError, "need 0 <= collapse_below < overload_above <= 1")),
    }),
    "quartile_fractions": (lambda **k: R.quartile_fractions(**k), ENT, _ent_rows),
    "entropy_band_penalty": (lambda **k: R.entropy_band_penalty(**k),
                             {"entropies": _r(1, 2, 2, 5).abs(), "theta": torch.full((1, 2), 0.5), "max_entropy": 1.6}, {
        **tensor_rows({"entropies": None}, meta=META, noncontig=SAME,
                      int=(TypeError, "entropies must be a floating tensor, got torch.int64"),
                      shape=(InputError, r"entropies must be \(layers, batch, heads, queries\)")),
        "max_entropy=0": ({"max_entropy": 0.0}, (InputError, "max_entropy must be a finite number > 0")),
        "gamma=-1": ({"gamma": -1.0}, (InputError, "gamma must be")),
        "mode": ({"mode": "x"}, (InputError, "mode must be one of 'per_position', 'per_head'; got 'x'")),
    }),
    "EntropyBandRegularizer": (lambda attn: R.EntropyBandRegularizer(1, 2)([attn]), ATTN, {
        **tensor_rows(ATTN, nan=(InputError, r"attentions\[0\] contains NaN or inf"),
                      inf=(InputError, r"attentions\[0\] contains NaN or inf"),
                      empty=(InputError, r"attentions\[0\] is empty"), int=(TypeError, r"attentions\[0\] must be a floating"),
                      meta=META, noncontig=SAME, shape=(InputError, r"attentions\[0\] must have 4 dims")),
        **HALF_ROWS,
    }),
    "temperature_softmax": (lambda **k: R.temperature_softmax(**k), {**TEMP, "temperature": torch.tensor(0.5)}, {
        **_temp_rows, **HALF_ROWS,
        "temperature:meta": ({"temperature": torch.tensor(0.5, device="meta")}, META),
    }),
    "LearnableSoftmaxTemperature": (lambda **k: R.LearnableSoftmaxTemperature(2, 8)(**k), TEMP, {
        **_temp_rows, **numpy_int(offset=1), **HALF_ROWS,
        "offset=-1": ({"offset": -1}, (InputError, r"offset must be >= 0 \(the number of cached positions\), got -1")),
    }),
    "ELRLoss": (_elr, {**LOGITS, "labels": LABELS, "index": INDEX}, {
        **tensor_rows(LOGITS, **BATCH_LOGITS),
        "labels out of range": ({"labels": LABELS + 4}, (InputError, "labels out of range: got 7, expected 0 <= labels < num_classes=4")),
        "index out of range": ({"index": INDEX + 8}, (InputError, "index out of range: got 15")),
        "labels float": ({"labels": LABELS.float()}, (TypeError, "labels must have an integer dtype")),
    }),
    "elr_penalty": (lambda **k: R.elr_penalty(**k), TWO, {
        **tensor_rows({"logits": None}, **{**FN_LOGITS, "meta": (InputError, "device mismatch: logits is on meta but targets is on cpu")}),
        **tensor_rows({"targets": None}, empty=(InputError, r"targets must have the shape of logits \(8, 4\), got \(0, 4\)"),
                      int=(TypeError, "targets must have a floating dtype"),
                      meta=(InputError, "device mismatch: logits is on cpu but targets is on meta"),
                      shape=(InputError, r"targets must have the shape of logits \(8, 4\), got \(1, 8, 4\)")),
        **HALF_ROWS,
        "reduction": ({"reduction": "x"}, (InputError, "reduction must be one of")),
    }),
    "PSKDLoss": (_pskd, {**LOGITS, "labels": LABELS, "index": INDEX}, {
        **tensor_rows(LOGITS, **{**BATCH_LOGITS, "nan": (InputError, "logits of this batch contain NaN or inf; expected finite values. PSKDLoss")}),
        "alpha=1.5": ({"alpha": 1.5}, (InputError, r"alpha must lie in \[0, 1\], got 1.5")),
        "labels out of range": ({"labels": LABELS - 5}, (InputError, "labels out of range: got -")),
    }),
    "pskd_targets": (lambda **k: R.pskd_targets(**k), {"prev_probs": torch.full((8, 4), 0.25), "labels": LABELS, "alpha": 0.5}, {
        **tensor_rows({"prev_probs": None}, nan=(InputError, "prev_probs contains NaN or inf"),
                      inf=(InputError, "prev_probs contains NaN or inf"), meta=META, noncontig=SAME,
                      empty=(InputError, r"prev_probs must have shape \[batch, 4\] \(batch >= 1\), got \(0, 4\)"),
                      int=(TypeError, "prev_probs must have a floating dtype")),
        "alpha=1.5": ({"alpha": 1.5}, (InputError, r"alpha must lie in \[0, 1\], got 1.5")),
    }),
    "soft_cross_entropy": (lambda **k: R.soft_cross_entropy(**k), {"logits": _r(8, 4), "target": torch.full((8, 4), 0.25)}, {
        **tensor_rows({"logits": None}, **{**FN_LOGITS, "meta": (InputError, "device mismatch: logits is on meta but target is on cpu")}),
        **tensor_rows({"target": None}, empty=(InputError, r"target must have the shape of logits \(8, 4\), got \(0, 4\)"),
                      int=(TypeError, "target must have a floating dtype")),
        **HALF_ROWS,
        "reduction": ({"reduction": "x"}, (InputError, "reduction must be one of")),
    }),
    "pskd_alpha": (lambda **k: R.pskd_alpha(**k), {"epoch": 1, "total_epochs": 10}, {
        **numpy_int(epoch=1, total_epochs=10),
        "epoch=10": ({"epoch": 10}, (InputError, "epoch must satisfy 0 <= epoch < total_epochs=10, got 10")),
        "epoch=1.0": ({"epoch": 1.0}, (TypeError, "epoch must be an int, got float")),
        "alpha_T=1.5": ({"alpha_T": 1.5}, (InputError, r"alpha_T must lie in \[0, 1\], got 1.5")),
    }),
    "cosine_annealed_lambda": (lambda **k: R.cosine_annealed_lambda(**k), {"step": 1, "total_steps": 10, "lam_start": 0.1}, {
        **numpy_int(step=1, total_steps=10),
        "step=-1": ({"step": -1}, (InputError, "step must be an int >= 0, got -1")),
        "total_steps=0": ({"total_steps": 0}, (InputError, "total_steps must be an int >= 1, got 0")),
        "lam_start=-1": ({"lam_start": -1.0}, (InputError, "lam_start must be a finite number >= 0")),
    }),
    "LocalEntropyRegularizer": (lambda **k: R.LocalEntropyRegularizer(4, 2)(**k), {**LOGITS, "labeled_mask": MASK8}, {
        **tensor_rows(LOGITS, **{**BATCH_LOGITS, "nan": (InputError, "logits contain NaN or inf; expected finite values"),
                                 "inf": (InputError, "logits contain NaN or inf")}),
        **HALF_ROWS,
        "mask int": ({"labeled_mask": MASK8.long()}, (TypeError, "labeled_mask must have dtype torch.bool, got torch.int64")),
    }),
    "local_entropy_loss": (lambda **k: R.local_entropy_loss(**k), {**LOGITS, "mask": MASK8}, {
        **tensor_rows(LOGITS, **{**FN_LOGITS, "meta": (InputError, "device mismatch: logits are on meta but mask is on cpu")}),
        **HALF_ROWS,
        "tau_o=0": ({"tau_o": 0.0}, (InputError, "tau_o must be a finite number > 0, got 0.0")),
        "reduction": ({"reduction": "x"}, (InputError, "reduction must be one of")),
    }),
    "dual_view_kl": (lambda **k: R.dual_view_kl(**k), KL, {
        **tensor_rows({"logits_view1": None},
                      empty=(InputError, r"logits_view1 must have shape \[batch, 3\] \(batch >= 1\), got \(0, 3\)"),
                      int=(TypeError, "logits_view1 must have a floating dtype"),
                      meta=(InputError, "device mismatch: logits_view1 is on meta but logits_view2 is on cpu"),
                      noncontig=SAME, nan=PROPAGATES),
        **tensor_rows({"logits_view2": None},
                      empty=(InputError, r"logits_view2 must have the shape of logits_view1 \(4, 3\), got \(0, 3\)"),
                      int=(TypeError, "logits_view2 must have a floating dtype, got torch.int64"),
                      meta=(InputError, "device mismatch: logits_view1 is on cpu but logits_view2 is on meta")),
        "logits_view2:float64": ({"logits_view2": _r(4, 3).double()},
                                 (InputError, "logits_view2 is torch.float64 but logits_view1 is torch.float32")),
        **HALF_ROWS,
        "temperature=0": ({"temperature": 0.0}, (InputError, "temperature must be a finite number > 0, got 0.0")),
        "form": ({"form": "x"}, (InputError, "form must be one of 'paper', 'reference'; got 'x'")),
    }),
    "select_known": (lambda **k: R.select_known(**k), {**LOGITS, "labeled_mask": MASK8, "num_known": 2}, {
        **tensor_rows(LOGITS, **{**FN_LOGITS, "nan": None, "inf": None,
                                 "meta": (InputError, "device mismatch: logits are on meta but labeled_mask is on cpu")}),
        **numpy_int(num_known=2),
        "num_known=0": ({"num_known": 0}, (InputError, "num_known must be an int >= 1, got 0")),
        "threshold=1.5": ({"threshold": 1.5}, (InputError, r"threshold must lie in \[0, 1\], got 1.5")),
    }),
    "SigmaReparamLinear": (lambda **k: _seeded(R.SigmaReparamLinear, 6, 3)(**k), LIN, {**tensor_rows(LIN, **LAYER_ROWS), **LAYER_ROWS_SHAPE, **HALF_LAYER}),
    "SigmaReparamConv2d": (lambda **k: _seeded(R.SigmaReparamConv2d, 2, 3, 3)(**k), {"input": _r(1, 2, 6, 6)}, {
        **tensor_rows({"input": None}, **{**LAYER_ROWS, "shape": (InputError, "takes inputs with 3 or 4 dimensions")}),
        "channels": ({"input": _r(1, 3, 6, 6)}, (InputError, "expects 2 features on axis -3")),
        **HALF_LAYER}),
    "SpectralNormLinear": (lambda **k: _seeded(R.SpectralNormLinear, 6, 3)(**k), LIN, {**tensor_rows(LIN, **LAYER_ROWS), **LAYER_ROWS_SHAPE, **HALF_LAYER}),
    "WeightNormLinear": (lambda **k: _seeded(R.WeightNormLinear, 6, 3)(**k), LIN, {**tensor_rows(LIN, **LAYER_ROWS), **LAYER_ROWS_SHAPE, **HALF_LAYER}),
    "ScaledFFN": (lambda **k: R.ScaledFFN(_seeded(torch.nn.Linear, 6, 6))(**k), {"x": _r(4, 6)}, {
        **tensor_rows({"x": None}, **{**LAYER_ROWS, "shape": None}), **HALF_LAYER}),
    "spectral_norm_step": (lambda **k: R.spectral_norm_step(**k)[0], {"weight": _r(3, 6), "u": F.normalize(_r(6), dim=0)}, {
        **tensor_rows({"weight": None, "u": None}, meta=(InputError, "weight and u must hold values"),
                      empty={"weight": (InputError, r"weight is empty \(shape \(0, 6\)\)"),
                             "u": (InputError, r"u must have shape \(6,\)")},
                      shape={"weight": (InputError, r"u must have shape \(18,\)"), "u": (InputError, r"u must have shape \(6,\)")}),
    }),
}


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args)


test_bad_inputs = table_test(ENTRIES)
