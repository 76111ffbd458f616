"""Toy verifiable-reward tasks and a reference GRPO loop (``entrokit.rl.toy``).

:mod:`entrokit.rl.toy.tasks`: :class:`DigitSum` (optional noise-token padding),
:class:`Countdown`, :class:`Permutation`, :class:`MixedArithmetic` and the multi-turn
:class:`KeyDoorGrid`, each with its verifier. :mod:`entrokit.rl.toy.loop`: :class:`GRUPolicy`,
:func:`sample`, :func:`group_advantages`, :func:`train_grpo` and :func:`evaluate`. The
reproductions under ``examples/rl_*.py`` are built from these.
"""

from entrokit.rl.toy.loop import (
    Batch,
    GRUPolicy,
    Rollout,
    bonus_objective,
    evaluate,
    group_advantages,
    grpo_objective,
    pass_at_k,
    sample,
    token_logprobs,
    train_grpo,
)
from entrokit.rl.toy.tasks import (
    TASKS,
    Countdown,
    DigitSum,
    KeyDoorGrid,
    MixedArithmetic,
    Permutation,
)

__all__ = [
    "Batch", "GRUPolicy", "Rollout", "evaluate", "group_advantages", "grpo_objective", "bonus_objective", "pass_at_k", "sample",
    "token_logprobs", "train_grpo", "TASKS", "Countdown", "DigitSum", "KeyDoorGrid", "MixedArithmetic",
    "Permutation",
]
