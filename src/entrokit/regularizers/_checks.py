"""The regularizers' boundary checks live in :mod:`entrokit._validation` (one module for
both pillars); this module re-exports them under their former import path."""

from entrokit._validation import (  # noqa: F401  (re-exported)
    REDUCTIONS,
    check_buffer_device,
    check_choice,
    check_count,
    check_finite_real,
    check_int_vector,
    check_logits,
    check_nonneg_real,
    check_positive,
    check_probabilities,
    check_reduction,
    check_same_shape,
    check_sample_batch,
    check_unit_interval,
    default_atol,
)

__all__ = [
    "check_buffer_device",
    "check_choice",
    "check_count",
    "check_finite_real",
    "check_int_vector",
    "check_logits",
    "check_nonneg_real",
    "check_positive",
    "check_probabilities",
    "check_reduction",
    "check_same_shape",
    "check_sample_batch",
    "check_unit_interval",
    "default_atol",
]
