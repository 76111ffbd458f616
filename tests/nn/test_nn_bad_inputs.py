"""Bad inputs to every public entry point of entrokit.nn (table-driven; tests/bad_inputs.py)."""

import pytest
import torch

import entrokit.nn as N
from bad_inputs import (
    CALLER_DTYPE,
    INT,
    META,
    PROPAGATES,
    SAME,
    numpy_int,
    randn_with,
    table_test,
    tensor_rows,
)
from entrokit import InputError

_r = randn_with(torch.Generator().manual_seed(0))
QKV = dict(query=_r(2, 3, 4), key=_r(2, 5, 4), value=_r(2, 5, 6))
_attention_rows = {
    **tensor_rows(
        QKV, nan=PROPAGATES, inf=PROPAGATES, int=INT, noncontig=SAME,
        empty=(InputError, "query, key and value must share their batch axes; got"),
        meta=(InputError, "query, key and value must be on one device; got"),
        shape=(InputError, r"with the same rank >= 3 .*Add a batch axis"),
    ),
    "all:float16": ({"*": "float16"}, CALLER_DTYPE),
    "all:bfloat16": ({"*": "bfloat16"}, CALLER_DTYPE),
    "query:float16 only": ({"query": "float16"}, (InputError, "must share one dtype; got torch.float16, torch.float32")),
}
SCORES = dict(scores=_r(2, 3, 4))
_matching_rows = {
    **tensor_rows(SCORES, nan=PROPAGATES, inf=PROPAGATES, int=INT, meta=META, noncontig=SAME,
                  shape=(InputError, r"scores must have shape \(B, M, N\), got \(1, 2, 3, 4\); add a batch axis")),
    "all:float16": ({"*": "float16"}, CALLER_DTYPE),
    "all:bfloat16": ({"*": "bfloat16"}, CALLER_DTYPE),
}
# an empty batch gives an empty output, M = 0 the all-padding problem: tests/nn/test_matching.py
LOGITS = dict(logits=_r(8, 4))
_router_rows = {
    **tensor_rows(LOGITS, int=(TypeError, "logits must be floating, got torch.int64; use logits.float()"),
                  nan=(InputError, "logits contain NaN or inf; expected finite router logits"),
                  inf=(InputError, "logits contain NaN or inf"), meta=META, noncontig=SAME,
                  empty=(InputError, r"logits is empty \(shape \(0, 4\)\); expected at least one token")),
    "all:float16": ({"*": "float16"}, CALLER_DTYPE),
    "all:bfloat16": ({"*": "bfloat16"}, CALLER_DTYPE),
}
KD = dict(student_logits=_r(8, 4), teacher_logits=_r(8, 4))
_kd_rows = {
    **tensor_rows(KD, int=INT, meta=META, noncontig=SAME,
                  nan=(InputError, r"contain NaN or \+inf; expected finite logits \(or -inf for masked classes\)"),
                  inf=(InputError, r"contain NaN or \+inf; expected finite logits"),
                  empty={"student_logits": (InputError, r"with batch >= 1, got \(0, 4\)"),
                         "teacher_logits": (InputError, "must have the same shape")},
                  shape={"student_logits": (InputError, "must have the same shape"),
                         "teacher_logits": (InputError, "must have the same shape")}),
    "all:float16": ({"*": "float16"}, CALLER_DTYPE),
    "all:bfloat16": ({"*": "bfloat16"}, CALLER_DTYPE),
}
XY = dict(x=_r(6, 2), y=_r(5, 2))
HALF_OT = CALLER_DTYPE  # solved in float32, returned in the caller's dtype
_divergence_rows = {
    **tensor_rows(XY, nan=(InputError, "contain"), inf=(InputError, "contain"), int=INT, meta=META, noncontig=SAME,
                  empty=(InputError, r"is empty \(shape \(0, 2\)\); expected at least one entry"),
                  shape=(InputError, r"x and y must have shapes \(..., n, d\) and \(..., m, d\) with the same batch axes")),
    "all:float16": ({"*": "float16"}, HALF_OT),
    "all:bfloat16": ({"*": "bfloat16"}, HALF_OT),
}

ENTRIES = {
    "sinkhorn_attention": (lambda **k: N.sinkhorn_attention(**k), {**QKV, "n_iter": 3}, {
        **_attention_rows, **numpy_int(n_iter=3),
        "n_iter=0": ({"n_iter": 0}, (InputError, "n_iter must be an int >= 1, got 0")),
        "eps=-1": ({"eps": -1.0}, (InputError, "eps must be a finite number > 0, got -1.0")),
        "eps=nan": ({"eps": float("nan")}, (InputError, "eps must be a finite number > 0, got nan")),
        "dropout_p=1.5": ({"dropout_p": 1.5}, (InputError, r"dropout_p must be a number in \[0, 1\), got 1.5")),
        "scale=inf": ({"scale": float("inf")}, (InputError, "scale must be a finite number or None")),
    }),
    "SinkhornAttention": (lambda **k: N.SinkhornAttention(n_iter=3)(**k), QKV, _attention_rows),
    "log_optimal_transport": (lambda **k: N.log_optimal_transport(**k), {**SCORES, "bin_score": 1.0, "n_iter": 20}, {
        **_matching_rows, **numpy_int(n_iter=20),
        "bin_score=nan": ({"bin_score": float("nan")}, (InputError, "bin_score must be finite, got nan")),
        "bin_score=-inf": ({"bin_score": torch.tensor(float("-inf"))}, (InputError, "bin_score must be finite, got -inf")),
        "bin_score:meta": ({"bin_score": torch.tensor(1.0, device="meta")}, (InputError, "bin_score is a meta tensor")),
        "n_iter=0": ({"n_iter": 0}, (InputError, "n_iter must be an int >= 1, got 0")),
        "tol=-1": ({"tol": -1.0}, (InputError, "tol must be")),
        "valid0 int": ({"valid0": torch.ones(2, 3, dtype=torch.long)}, (TypeError, "valid0 must be bool")),
    }),
    "OTMatching": (lambda **k: N.OTMatching(n_iter=20)(**k), SCORES, _matching_rows),
    "sparse_ot_route": (lambda **k: N.sparse_ot_route(**k), {**LOGITS, "capacity": 2, "n_steps": 5}, {
        **_router_rows, **numpy_int(capacity=2, n_steps=5),
        "capacity=0": ({"capacity": 0}, (InputError, "capacity must be an int >= 1, got 0")),
        "capacity=2.0": ({"capacity": 2.0}, (TypeError, "capacity must be an int >= 1, got float")),
        "gamma=-1": ({"gamma": -1.0}, (InputError, "gamma must be a finite number > 0")),
        "lr=0": ({"lr": 0.0}, (InputError, "lr must be a finite number > 0")),
        "mode": ({"mode": "x"}, (InputError, "mode must be one of 'experts_choose', 'tokens_choose'")),
    }),
    "SparseOTRouter": (lambda **k: N.SparseOTRouter(4, 2, n_steps=5)(**k), LOGITS, {
        **_router_rows,
        "experts axis": ({"logits": _r(8, 5)}, (InputError, "logits have 5 experts on the last axis but the router")),
    }),
    "sinkhorn_kd_loss": (lambda **k: N.sinkhorn_kd_loss(**k), {**KD, "n_iter": 200}, {
        **_kd_rows, **numpy_int(n_iter=200),
        "temperature=0": ({"temperature": 0.0}, (InputError, "temperature must be")),
        "eps=-1": ({"eps": -1.0}, (InputError, "eps must be")),
        "n_iter=0": ({"n_iter": 0}, (InputError, "n_iter must be an int >= 1")),
        "reduction": ({"reduction": "x"}, (InputError, "reduction must be one of")),
    }),
    "SinkhornKDLoss": (lambda **k: N.SinkhornKDLoss(n_iter=200)(**k), KD, _kd_rows),
    "SinkhornLoss": (lambda x, y: N.SinkhornLoss(tol=1e-3)(x, y), XY, _divergence_rows),
    "SlicedWassersteinLoss": (
        lambda **k: N.SlicedWassersteinLoss(n_projections=10, generator=torch.Generator().manual_seed(0))(**k), XY, {
            **tensor_rows(XY, nan=(InputError, "contain"), inf=(InputError, "contain"), int=INT, meta=META,
                          noncontig=SAME, empty=(InputError, r"is empty \(shape \(0, 2\)\)")),
            "x:1-D": ({"x": _r(6)}, (InputError, r"x must have shape \(n, d\) or \(batch, n, d\), got \(6,\)")),
            "y:other d": ({"y": _r(5, 3)}, (InputError, "x and y must live in the same dimension: x has d=2")),
            "all:float16": ({"*": "float16"}, CALLER_DTYPE),
            "all:bfloat16": ({"*": "bfloat16"}, CALLER_DTYPE),
        }),
}

test_bad_inputs = table_test(ENTRIES)


@pytest.mark.parametrize("make, exc, fragment", [
    (lambda: N.SparseOTRouter(0, 2), InputError, "num_experts must be an int >= 1, got 0"),
    (lambda: N.SparseOTRouter(4, 2, mode="x"), InputError, "mode must be one of"),
    (lambda: N.OTMatching(n_iter=0), InputError, "n_iter must be"),
    (lambda: N.OTMatching(bin_score_init=float("nan")), InputError, "bin_score_init must be a finite number"),
    (lambda: N.SinkhornAttention(eps=0.0), InputError, "eps must be a finite number > 0"),
    (lambda: N.SinkhornLoss(p=3), InputError, "p must be 1 or 2"),
    (lambda: N.SinkhornLoss(blur=-1.0), InputError, "blur must be a finite number > 0"),
    (lambda: N.SlicedWassersteinLoss(n_projections=0), InputError, "n_projections must be an int >= 1"),
    (lambda: N.SinkhornKDLoss(temperature=-1.0), InputError, "temperature must be"),
])
def test_bad_module_options(make, exc, fragment):
    with pytest.raises(exc, match=fragment):
        make()
