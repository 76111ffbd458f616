"""Bad inputs to every public entry point of entrokit.rl (table-driven; tests/bad_inputs.py).

Every tensor argument gets NaN, +inf, -inf, empty, integer, meta, non-contiguous, wrong-rank
and 0-dim versions, and all floating tensors float16/bfloat16; integer options get NumPy
integers, and out-of-range values. The TRL trainer (entrokit.rl.integrations.trl) has its own
checks in tests/rl/integrations/test_trl.py.
"""

import math

import numpy as np
import torch

import entrokit.rl as R
from bad_inputs import (
    CALLER_DTYPE,
    FLOAT32,
    INT,
    PROPAGATES,
    SAME,
    half_rows,
    numpy_int,
    randn_with,
    table_test,
    tensor_rows,
)
from entrokit import InputError

g = torch.Generator().manual_seed(3)
_r = randn_with(g)
B, T, V = 2, 5, 7
MASK = torch.ones(B, T, dtype=torch.bool)
MASK[1, 3:] = False
LOGP = -_r(B, T).abs()
OLD = LOGP + 0.1 * _r(B, T)
ADV, ENT = _r(B, T), _r(B, T).abs()
LABELS = torch.randint(0, V, (B, T), generator=g)


def _rows_of_mask(shape_msg: str, meta: tuple, empty=None, float_mask=None) -> dict:
    """The rows of a boolean [B, T] mask argument."""
    return {
        "mask:float": ({"mask": MASK.float()}, float_mask or (TypeError, r"mask must be boolean")),
        "mask:0/1 int": ({"mask": MASK.long()}, SAME),
        "mask:meta": ({"mask": "meta"}, meta),
        "mask:noncontig": ({"mask": "noncontig"}, SAME),
        "mask:shape": ({"mask": "shape"}, (InputError, shape_msg)),
        "mask:scalar": ({"mask": "scalar"}, (InputError, shape_msg)),
        "mask:empty": ({"mask": "empty"}, empty or (InputError, shape_msg)),
        "mask:list": ({"mask": MASK.tolist()}, (TypeError, "mask must be a torch.Tensor")),
    }


# ------------------------------------------------------------------- the [B, T] policy losses
def _token_rows(names, per_sequence=()) -> dict:
    """Rows of the token tensors of a policy loss (rl/losses.py's shared boundary)."""

    def shape(n):
        also = r", \[2\] or \[2, 1\]" if n in per_sequence else ""
        return (InputError, rf"{n} must have the mask's shape \[2, 5\]{also}, got")

    finite = {n: (InputError, rf"{n} contains NaN or inf at a valid \(mask=True\) token") for n in names}
    return {
        **tensor_rows(
            names, nan=finite, inf=finite, neginf=finite, int=INT, noncontig=SAME,
            meta={n: (InputError, rf"{n} is on meta but mask is on cpu; move it with {n}.to\(mask.device\)") for n in names},
            empty={n: shape(n) for n in names}, shape={n: shape(n) for n in names},
            scalar={n: shape(n) for n in names},
        ),
        **{f"{n}:list": ({n: [[0.0] * T] * B}, (TypeError, rf"{n} must be a torch.Tensor \[B, T\]")) for n in names},
        **_rows_of_mask(r"mask must have shape \[B, T\] \(responses x positions\)",
                        meta=(InputError, "is on cpu but mask is on meta"),
                        empty=(InputError, r"the batch is empty \(mask shape \(0, 5\)\)")),
        "mode": ({"mode": "x"}, (InputError, "mode must be one of")),
        "normalizer=0": ({"normalizer": 0}, (InputError, "normalizer must be a finite number > 0")),
        "check_inputs=False, nan at padding": ({"check_inputs": False}, SAME),
    }


POLICY = dict(logp=LOGP, old_logp=OLD, advantages=ADV, mask=MASK)
_policy_rows = {**_token_rows(["logp", "old_logp", "advantages"], per_sequence=("advantages",)),
                **half_rows(CALLER_DTYPE)}
ENT_ARGS = dict(entropy=ENT, mask=MASK)
_entropy_rows = {**_token_rows(["entropy"]), **half_rows(CALLER_DTYPE)}


def _loss(fn):
    return lambda **k: fn(**k)[0]


# ------------------------------------------------------------------------------ the ops
LOGITS = dict(logits=_r(B, T, V), mask=MASK)
_logits_rows = {
    **tensor_rows({"logits": None},
                  nan=(InputError, r"logits contains NaN; expected finite values \(-inf is allowed"),
                  inf=(InputError, "logits contains an infinite value"),
                  empty=(InputError, r"logits is empty \(shape \(0, 5, 7\)\)"),
                  int=(TypeError, r"logits must have a floating dtype \(float32, float64, bfloat16 or float16\)"),
                  meta=(InputError, r"logits is a meta tensor \(shape only, no values\)"), noncontig=SAME,
                  shape=(InputError, r"mask has shape \(2, 5\) but the rows have shape \(1, 2, 5\)"),
                  scalar=(InputError, "logits must have at least one axis")),
    "logits:neginf": ({"logits": "neginf"}, FLOAT32),  # a zero-probability token: a finite entropy
    **_rows_of_mask(r"mask has shape .* but the rows have shape \(2, 5\)",
                    meta=(InputError, r"mask is a meta tensor \(no values\)")),
    **half_rows(FLOAT32),  # documented: entropies in float32 for half logits
    "temperature=0": ({"temperature": 0.0}, (InputError, "temperature")),
    "temperature=nan": ({"temperature": math.nan}, (InputError, "temperature")),
    "support": ({"support": "top5"}, (TypeError, "support must be None, 'full', TopK")),
    "TopK too large": ({"support": R.TopK(8)}, (InputError, r"TopK.k = 8 exceeds the vocabulary size V = 7")),
    **numpy_int(chunk_size=2),
    "chunk_size=0": ({"chunk_size": 0}, (InputError, "chunk_size must be an int >= 1, got 0")),
    "chunk_size=-1": ({"chunk_size": -1}, (InputError, "chunk_size must be an int >= 1, got -1")),
    "chunk_size=2.5": ({"chunk_size": 2.5}, (TypeError, "chunk_size must be an int, got float")),
}

LP = dict(hidden=_r(B, T, 4), weight=_r(V, 4), labels=LABELS, bias=_r(V))
_lp_nonfinite = {n: (InputError, rf"{n} contains (NaN|an infinite value); expected finite values")
                 for n in ("hidden", "weight", "bias")}
_lp_rows = {
    **tensor_rows({"hidden": None, "weight": None, "bias": None},
                  nan=_lp_nonfinite, inf=_lp_nonfinite, neginf=_lp_nonfinite,
                  empty={"hidden": (InputError, r"hidden is empty \(shape \(0, 5, 4\)\)"),
                         "weight": (InputError, r"weight is empty \(shape \(0, 4\)\)"),
                         "bias": (InputError, r"bias is empty \(shape \(0,\)\)")},
                  int={n: (TypeError, rf"{n} must have a floating dtype") for n in ("hidden", "weight", "bias")},
                  meta={n: (InputError, rf"{n} is a meta tensor") for n in ("hidden", "weight", "bias")},
                  noncontig=SAME,
                  shape={"hidden": (InputError, r"labels has shape \(2, 5\) but hidden's rows have shape \(1, 2, 5\)"),
                         "weight": (InputError, r"weight must have shape \(V, d\) with d = hidden.shape\[-1\] = 4"),
                         "bias": (InputError, r"bias must be a \(7,\) tensor like hidden")},
                  scalar={n: (InputError, rf"{n} must have at least one axis") for n in ("hidden", "weight", "bias")}),
    **tensor_rows({"labels": None}, noncontig=SAME,
                  empty=(InputError, r"labels has shape \(0, 5\) but hidden's rows have shape \(2, 5\)"),
                  meta=(InputError, "labels is on meta but hidden is on cpu"),
                  shape=(InputError, r"labels has shape \(1, 2, 5\)"), scalar=(InputError, r"labels has shape \(\)")),
    "labels:float": ({"labels": LABELS.float()}, (TypeError, "labels must hold integer token ids, got torch.float32")),
    "labels out of range": ({"labels": LABELS + V}, (InputError, "labels")),
    "hidden:float16 only": ({"hidden": "float16"}, (InputError, r"weight \(torch.float32, cpu\) must match hidden")),
    "weight:bfloat16 only": ({"weight": "bfloat16"}, (InputError, r"weight \(torch.bfloat16, cpu\) must match hidden")),
    **half_rows(FLOAT32),
    **numpy_int(chunk_size=3, row_chunk_size=2),
    "row_chunk_size=0": ({"row_chunk_size": 0}, (InputError, "row_chunk_size must be an int >= 1, got 0")),
}

_mask_value_rows = {
    "empty": (InputError, r"is empty \(shape \(0, 5\)\); pass at least one token"),
    "int": (TypeError, "must be a floating tensor, got torch.int64"),
    "meta": (InputError, r"is a meta tensor \(no values\)"), "noncontig": SAME,
}
TOP = dict(entropy=ENT, mask=MASK, top_fraction=0.4)
_top_rows = {
    **tensor_rows({"entropy": None}, **_mask_value_rows,
                  nan=(InputError, r"entropy contains NaN at a valid \(mask=True\) token"),
                  shape=(InputError, r"mask has shape \(2, 5\) but entropy has shape \(1, 2, 5\)"),
                  scalar=(InputError, r"mask has shape \(2, 5\) but entropy has shape \(\)")),
    **_rows_of_mask(r"mask has shape .* but entropy has shape \(2, 5\)",
                    meta=(InputError, r"mask is a meta tensor \(no values\)"),
                    float_mask=(TypeError, "mask must be boolean here, got torch.float32")),
    "top_fraction=0": ({"top_fraction": 0.0}, (InputError, r"top_fraction must lie in \(0, 1\], got 0.0")),
    "top_fraction=nan": ({"top_fraction": math.nan}, (InputError, r"top_fraction must lie in \(0, 1\]")),
    "top_fraction=np.float64": ({"top_fraction": np.float64(0.4)}, SAME),
    "per": ({"per": "token"}, (InputError, "per must be 'batch' or 'sequence', got 'token'")),
    "group without torch.distributed": ({"group": "world"}, (InputError, "torch.distributed is not initialised")),
}
_top_seq_rows = {
    **{k: v for k, v in _top_rows.items() if not k.startswith(("group", "per"))},
    "entropy:1-D": ({"entropy": ENT[0], "mask": MASK[0]}, (InputError, r"per='sequence' needs a \(batch, time\) tensor")),
}
AGG = dict(x=ENT, mask=MASK, mode="seq-mean-token-sum-norm", horizon=5)
_agg_rows = {
    **tensor_rows({"x": None}, **_mask_value_rows, nan=PROPAGATES, inf=PROPAGATES, neginf=PROPAGATES,
                  shape=(InputError, r"mask has shape \(2, 5\) but x has shape \(1, 2, 5\)"),
                  scalar=(InputError, r"mask has shape \(2, 5\) but x has shape \(\)")),
    **_rows_of_mask(r"mask has shape .* but x has shape \(2, 5\)", meta=(InputError, r"mask is a meta tensor"),
                    float_mask=SAME),
    **half_rows(CALLER_DTYPE),
    "mode": ({"mode": "seq-sum"}, (InputError, "mode must be one of 'token-mean'")),
    "horizon=0": ({"horizon": 0}, (InputError, "horizon must be a finite")),
    "normalizer=nan": ({"normalizer": math.nan}, (InputError, "normalizer must be a finite number > 0")),
}
Q = dict(values=_r(10), q=0.3, group=None)
_q_rows = {
    **tensor_rows({"values": None}, nan=(InputError, r"values contains NaN \(on this or another rank\)"),
                  empty=(InputError, "values is empty on every rank"),
                  int=(InputError, "values must be a 1-D floating tensor"), meta=(InputError, "values is a meta tensor"),
                  noncontig=SAME, shape=(InputError, "values must be a 1-D floating tensor"),
                  scalar=(InputError, "values must be a 1-D floating tensor")),
    **half_rows(CALLER_DTYPE),
    "q=1.5": ({"q": 1.5}, (InputError, r"q must lie in \[0, 1\], got 1.5")),
    "q=nan": ({"q": math.nan}, (InputError, r"q must lie in \[0, 1\]")),
}
ACC = dict(accuracy=torch.rand(4, generator=g))
_acc_range = (InputError, r"accuracy must hold finite fractions in \[0, 1\]")
_acc_shape = (InputError, r"accuracy must have shape \[num_prompts\] with num_prompts >= 1")
_acc_rows = {
    **tensor_rows(ACC, nan=_acc_range, inf=_acc_range, neginf=_acc_range, empty=_acc_shape, shape=_acc_shape,
                  scalar=_acc_shape, int=(TypeError, "accuracy must have a floating dtype, got torch.int64"),
                  meta=(InputError, r"accuracy is a meta tensor \(shape only, no values\)"), noncontig=SAME),
    **half_rows(CALLER_DTYPE),
    "accuracy > 1": ({"accuracy": torch.full((4,), 1.5)}, _acc_range),
    "accuracy:list": ({"accuracy": [0.5]}, (TypeError, r"accuracy must be a torch.Tensor \[num_prompts\]")),
}

# ------------------------------------------------------------------------- controllers
MEASURED = dict(measured=torch.tensor(0.5))
_not_finite = (InputError, "the values passed as measured contain NaN or inf; expected finite values")
_measured_rows = {
    **tensor_rows(MEASURED, nan=_not_finite, inf=_not_finite, neginf=_not_finite,
                  meta=(InputError, r"measured is a meta tensor \(shape only, no values\)"),
                  empty=(InputError, r"measured must be one number .* got a tensor of shape \(0,\)"),
                  shape=SAME, scalar=SAME),
    "measured:float16": ({"measured": torch.tensor(0.5, dtype=torch.float16)}, SAME),
    "measured:bfloat16": ({"measured": torch.tensor(0.5, dtype=torch.bfloat16)}, SAME),
    "measured:two numbers": ({"measured": torch.ones(2)}, (InputError, r"measured must be one number")),
    "measured:bool": ({"measured": True}, (TypeError, "measured must be a real number or a 1-element tensor, got bool")),
    "measured:None": ({"measured": None}, (TypeError, "measured must be a real number or a 1-element tensor, got NoneType")),
    "measured:np.float64": ({"measured": np.float64(0.5)}, SAME),
    "measured:nan float": ({"measured": math.nan}, _not_finite),
}


def _step(make):
    return lambda measured: make().step(measured)


ENTRIES = {
    "token_entropy": (lambda **k: R.token_entropy(**k), {**LOGITS, "chunk_size": 2}, _logits_rows),
    "token_logprob_entropy": (lambda **k: R.token_logprob_entropy(**k)[1], LP, _lp_rows),
    "top_entropy_mask": (lambda **k: R.top_entropy_mask(**k), TOP, _top_rows),
    "top_entropy_mask per=sequence": (lambda **k: R.top_entropy_mask(**k, per="sequence"), TOP, _top_seq_rows),
    "aggregate": (lambda **k: R.aggregate(**k), AGG, _agg_rows),
    "distributed_quantile": (lambda **k: R.distributed_quantile(**k), Q, _q_rows),
    "clipped_surrogate": (_loss(R.clipped_surrogate), POLICY, {
        **_policy_rows,
        "clip_low=-0.1": ({"clip_low": -0.1}, (InputError, "clip_low")),
        "dual_clip=0.5": ({"dual_clip": 0.5}, (InputError, "dual_clip")),
        "token_weights shape": ({"token_weights": torch.ones(3)}, (InputError, "token_weights must have the mask's shape")),
    }),
    "clip_cov_policy_loss": (_loss(R.clip_cov_policy_loss), {**POLICY, "ratio": 0.3,
                                                            "generator": torch.Generator().manual_seed(0)}, {
        **_policy_rows,
        "preset": ({"preset": "x"}, (InputError, r"preset must be one of \['official', 'verl'\]")),
        "ratio=0": ({"ratio": 0.0}, (InputError, "ratio")),
        "bounds reversed": ({"bounds": (5.0, 1.0)}, (InputError, "bounds")),
        "generator": ({"generator": 0}, (TypeError, "generator")),
    }),
    "kl_cov_policy_loss": (_loss(R.kl_cov_policy_loss), {**POLICY, "ratio": 0.3}, {
        **_policy_rows,
        "ratio=2": ({"ratio": 2.0}, (InputError, "ratio")),
        "kl_coef=-1": ({"kl_coef": -1.0}, (InputError, "kl_coef")),
    }),
    "steer_token_weights": (_loss(R.steer_token_weights), {**POLICY, "entropy": ENT}, {
        **{k: v for k, v in _token_rows(["advantages", "logp", "old_logp", "entropy"], per_sequence=("advantages",)).items()
           if not k.startswith(("mode", "normalizer"))},
        **half_rows(CALLER_DTYPE),
        "w_min > w_max": ({"w_min": 1.5}, (InputError, "w_min")),
    }),
    "entropy_bonus": (_loss(R.entropy_bonus), {**ENT_ARGS, "coef": 0.01}, {
        **_entropy_rows, "coef=nan": ({"coef": math.nan}, (InputError, "coef"))}),
    "anchored_entropy_loss": (_loss(R.anchored_entropy_loss), {**ENT_ARGS, "anchor": 1.0}, {
        **_entropy_rows, "anchor=nan": ({"anchor": math.nan}, (InputError, "anchor"))}),
    "corridor_entropy_loss": (_loss(R.corridor_entropy_loss),
                              {**ENT_ARGS, "history_mean": 1.0, "coef": 0.01, "alpha": 0.5, "kappa": (0.5, 2.0)}, {
        **_entropy_rows,
        "kappa reversed": ({"kappa": (2.0, 0.5)}, (InputError, "kappa")),
        "history_mean=inf": ({"history_mean": math.inf}, (InputError, "history_mean")),
    }),
    "sampled_entropy": (lambda **k: R.sampled_entropy(**k), {"logp": LOGP, "mask": MASK}, {
        **_token_rows(["logp"]), **half_rows(CALLER_DTYPE)}),
    "aepo_reinforce_loss": (_loss(R.aepo_reinforce_loss), {"logp": LOGP, "mask": MASK}, {
        **{k: v for k, v in _token_rows(["logp"]).items() if k != "mask:empty"},
        **half_rows(CALLER_DTYPE),
        # an empty selection is a zero loss, but only for logp of the same (empty) shape
        "mask:empty": ({"mask": "empty"}, (InputError, r"logp must have the mask's shape \(0, 5\), got \(2, 5\)")),
    }),
    "aepo_select_positives": (_loss(R.aepo_select_positives), {"advantages": _r(8), "max_samples": 3}, {
        **tensor_rows({"advantages": None}, int=(TypeError, "advantages must have a floating dtype"),
                      meta=(InputError, "advantages is a meta tensor"), noncontig=SAME,
                      shape=(InputError, r"advantages must have shape \[N\] \(one per sample\), got \(1, 8\)"),
                      scalar=(InputError, r"advantages must have shape \[N\] \(one per sample\), got \(\)")),
        **numpy_int(max_samples=3),
        "max_samples=-1": ({"max_samples": -1}, (InputError, "max_samples")),
        "threshold=nan": ({"threshold": math.nan}, (InputError, "threshold")),
    }),
    "phase_weight": (lambda **k: R.phase_weight(**k), {"step": 3, "total_steps": 10}, {
        **numpy_int(step=3, total_steps=10),
        "total_steps=0": ({"total_steps": 0}, (InputError, "total_steps")),
        "step=-1": ({"step": -1}, (InputError, "step")),
    }),
    "DifficultyAwareCoef": (lambda **k: R.DifficultyAwareCoef(R.FixedCoef(0.1))(**k), ACC, _acc_rows),
    "FixedCoef.step": (_step(lambda: R.FixedCoef(0.01)), MEASURED, _measured_rows),
    "SignController.step": (_step(lambda: R.SignController(target=1.0)), MEASURED, _measured_rows),
    "DeadbandController.step": (_step(lambda: R.DeadbandController()), MEASURED, _measured_rows),
    "AnchoredTargetController.step": (_step(lambda: R.AnchoredTargetController()), MEASURED, _measured_rows),
    "PIController.step": (_step(lambda: R.PIController(1.0, 0.1, 0.01)), MEASURED, _measured_rows),
    "TemperatureScheduler.step": (_step(lambda: R.TemperatureScheduler()), MEASURED, _measured_rows),
    "EntropyHistory.update": (lambda measured: R.EntropyHistory().update(measured), MEASURED, _measured_rows),
}

test_bad_inputs = table_test(ENTRIES)


def test_numpy_integers_in_the_supports():
    z = _r(3, 9)
    torch.testing.assert_close(R.token_entropy(z, support=R.TopK(np.int64(4))), R.token_entropy(z, support=R.TopK(4)))
    assert type(R.TopK(np.int64(4)).k) is int
