"""Bad inputs to every public entry point of entrokit.losses (table-driven; tests/bad_inputs.py)."""

import numpy as np
import torch

import entrokit.losses as L
from bad_inputs import CALLER_DTYPE, INT, META, SAME, numpy_int, randn_with, table_test, tensor_rows
from entrokit import InputError

_r = randn_with(torch.Generator().manual_seed(1))
# float16/bfloat16 are solved in float32 and returned in the caller's dtype
HALF_OT = HALF_SW = CALLER_DTYPE
EMPTY = (InputError, r"is empty \(shape \(0, 2\)\); expected at least one entry on every axis")
W = dict(a=torch.full((6,), 1 / 6), b=torch.full((5,), 0.2))
XY = dict(x=_r(6, 2), y=_r(5, 2), **W)
NONFINITE = {"x": (InputError, "contain"), "y": (InputError, "contain"),
             "a": (InputError, r"a contains (NaN|an infinite value)"), "b": (InputError, r"b contains (NaN|an infinite value)")}
_ot_rows = {
    **tensor_rows(XY, nan=NONFINITE, inf=NONFINITE, int=INT, meta=META, noncontig={"x": SAME, "y": SAME},
                  empty={"x": EMPTY, "y": EMPTY, "a": (InputError, r"a is empty \(shape \(0,\)\)"),
                         "b": (InputError, r"b is empty \(shape \(0,\)\)")},
                  shape={"x": (InputError, "must have shapes .* with the same batch axes"),
                         "y": (InputError, "must have shapes .* with the same batch axes")}),
    "a:negative": ({"a": -W["a"]}, (InputError, "a has negative entries")),
    "a:length": ({"a": W["a"][:3]}, (InputError, "shape mismatch: a has 3 entries")),
    "all:float16": ({"*": "float16"}, HALF_OT),
    "all:bfloat16": ({"*": "bfloat16"}, HALF_OT),
    **numpy_int(max_iter=300, chunk_size=2),
    "eps=0": ({"eps": 0.0}, (InputError, "eps must be a finite number > 0, got 0.0")),
    "eps=nan": ({"eps": float("nan")}, (InputError, "eps must be a finite number > 0, got nan")),
    "max_iter=0": ({"max_iter": 0}, (InputError, "max_iter must be an int >= 1, got 0")),
    "max_iter=1.5": ({"max_iter": 1.5}, (TypeError, "max_iter must be an int >= 1, got float")),
    "chunk_size=0": ({"chunk_size": 0}, (InputError, "chunk_size must be a positive int or None, got 0")),
    "tol=-1": ({"tol": -1.0}, (InputError, "tol must be a finite number > 0")),
}
_divergence_rows = {**_ot_rows,
                    "scaling_decay=1.5": ({"scaling_decay": 1.5}, (InputError, r"scaling_decay must lie in \(0, 1\), got 1.5"))}
GAP = dict(x=_r(6, 2), Tx=_r(6, 2), a=torch.full((6,), 1 / 6))
SW = dict(x=_r(6, 2), y=_r(5, 2), **W)

def _rp(**k):
    k.setdefault("generator", torch.Generator().manual_seed(0))
    return L.random_projections(**k)


ENTRIES = {
    "sinkhorn_divergence": (lambda **k: L.sinkhorn_divergence(**k), {**XY, "eps": 0.5, "tol": 1e-3, "max_iter": 300},
                            _divergence_rows),
    "entropic_ot_value": (lambda **k: L.entropic_ot_value(**k), {**XY, "eps": 0.5, "tol": 1e-3, "max_iter": 300},
                          _divergence_rows),
    "monge_gap": (lambda **k: L.monge_gap(**k), {**GAP, "eps": 0.5, "tol": 1e-3, "max_iter": 300}, {
        **tensor_rows(GAP, int=INT, meta=META, noncontig={"x": SAME, "Tx": SAME},
                      nan={"x": (InputError, "x contains NaN"), "Tx": (InputError, "Tx contains NaN"),
                           "a": (InputError, "a contains NaN")},
                      inf={"x": (InputError, "x contains"), "Tx": (InputError, "Tx contains"),
                           "a": (InputError, "a contains an infinite value")},
                      empty={"x": EMPTY, "Tx": (InputError, r"Tx is empty \(shape \(0, 2\)\)")},
                      shape={"x": (InputError, "x and Tx must have the same shape"),
                             "Tx": (InputError, "x and Tx must have the same shape")}),
        "all:float16": ({"*": "float16"}, HALF_OT),
        "all:bfloat16": ({"*": "bfloat16"}, HALF_OT),
        **numpy_int(max_iter=300),
        "eps=0": ({"eps": 0.0}, (InputError, "eps must be a finite number > 0")),
        "max_iter=0": ({"max_iter": 0}, (InputError, "max_iter must be an int >= 1, got 0")),
    }),
    "sliced_wasserstein": (
        lambda **k: L.sliced_wasserstein(**k, generator=torch.Generator().manual_seed(0)), {**SW, "n_projections": 10}, {
            **tensor_rows(SW, int=INT, meta=META, noncontig={"x": SAME, "y": SAME},
                          nan={"x": (InputError, "x contains NaN"), "y": (InputError, "y contains NaN"),
                               "a": (InputError, "a contains NaN"), "b": (InputError, "b contains NaN")},
                          inf={"x": (InputError, "x contains"), "y": (InputError, "y contains"),
                               "a": (InputError, "a contains"), "b": (InputError, "b contains")},
                          empty={"x": EMPTY, "y": EMPTY}),
            "x:1-D": ({"x": _r(6)}, (InputError, r"x must have shape \(n, d\) or \(batch, n, d\), got \(6,\)")),
            "y:other d": ({"y": _r(5, 3)}, (InputError, "x and y must live in the same dimension")),
            "all:float16": ({"*": "float16"}, HALF_SW),
            "all:bfloat16": ({"*": "bfloat16"}, HALF_SW),
            **numpy_int(n_projections=10),
            "n_projections=0": ({"n_projections": 0}, (InputError, "n_projections must be an int >= 1, got 0")),
            "p=0.5": ({"p": 0.5}, (InputError, r"p must be a finite real >= 1 .*got 0.5")),
            "control_variate": ({"control_variate": "x"}, (InputError, "control_variate must be one of None")),
            "projections d": ({"projections": _r(5, 3)}, (InputError, r"projections must have shape \(L, 2\)")),
        }),
    "random_projections": (_rp, {"n_projections": 4, "d": 3}, {
        **numpy_int(n_projections=4, d=3),
        "n_projections=0": ({"n_projections": 0}, (InputError, "n_projections must be an int >= 1, got 0")),
        "d=0": ({"d": 0}, (InputError, "d must be an int >= 1, got 0")),
        "d=3.0": ({"d": 3.0}, (TypeError, "d must be an int >= 1, got float")),
        "dtype=int64": ({"dtype": torch.int64}, (TypeError, "dtype must be a floating torch.dtype")),
        "generator": ({"generator": "x"}, (TypeError, "generator must be a torch.Generator or None, got str")),
    }),
}

test_bad_inputs = table_test(ENTRIES)


def test_numpy_scalars_are_plain_options():
    # a NumPy float for a float option is a float
    x, y = _r(6, 2), _r(5, 2)
    torch.testing.assert_close(L.sinkhorn_divergence(x, y, eps=np.float64(0.5), tol=1e-3),
                               L.sinkhorn_divergence(x, y, eps=0.5, tol=1e-3))
