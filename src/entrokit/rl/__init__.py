"""Entropy control for reinforcement learning of language models (``entrokit.rl``).

Plain tensors in, plain tensors out; works in any PyTorch training loop.

Ops (:mod:`entrokit.rl.entropy`)
    :func:`token_entropy` (exact, chunked backward; ``support=`` :class:`TopK`, :class:`TopP`,
    :class:`Clamp`) and :func:`token_logprob_entropy` (from hidden states, logits never formed).
Masks and aggregation (:mod:`entrokit.rl.masks`)
    :func:`top_entropy_mask` (per batch: the 80/20 rule; per sequence: SIREN), with an exact
    global quantile under ``torch.distributed`` (:func:`distributed_quantile`), and
    :func:`aggregate` with verl's ``loss_agg_mode`` names.
Policy losses and interventions (:mod:`entrokit.rl.losses`)
    :func:`clipped_surrogate`, :func:`entropy_bonus`, :func:`anchored_entropy_loss` (SIREN),
    :func:`corridor_entropy_loss` (EPO), :func:`clip_cov_policy_loss` / :func:`kl_cov_policy_loss`
    (presets ``"official"`` and ``"verl"``), :func:`steer_token_weights` (STEER), AEPO's
    :func:`aepo_select_positives`, and the Monte-Carlo :func:`sampled_entropy`.
Controllers (:mod:`entrokit.rl.controllers`)
    Stateful, resumable coefficient controllers: :class:`FixedCoef`, :class:`SignController`
    (Skywork/TRL), :class:`DeadbandController` (AEnt), :class:`AnchoredTargetController` (AER,
    SIREN), :class:`DifficultyAwareCoef` (AER), :class:`PIController`, and AEPO's
    :class:`TemperatureScheduler`.
TRL (:mod:`entrokit.rl.integrations.trl`, extra ``trl``)
    :class:`~entrokit.rl.integrations.trl.EntropyControlGRPOTrainer`.

Names are imported lazily on first access, so ``import entrokit.rl`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # ops
    "Clamp": "entrokit.rl.entropy",
    "TopK": "entrokit.rl.entropy",
    "TopP": "entrokit.rl.entropy",
    "token_entropy": "entrokit.rl.entropy",
    "token_logprob_entropy": "entrokit.rl.entropy",
    # masks and aggregation
    "AGG_MODES": "entrokit.rl.masks",
    "aggregate": "entrokit.rl.masks",
    "distributed_quantile": "entrokit.rl.masks",
    "top_entropy_mask": "entrokit.rl.masks",
    # --- policy losses, interventions and controllers: their names go here ---
}

# policy losses, interventions and controllers
_EXPORTS.update({
    "COV_PRESETS": "entrokit.rl.losses",
    "EntropyHistory": "entrokit.rl.losses",
    "aepo_reinforce_loss": "entrokit.rl.losses",
    "aepo_select_positives": "entrokit.rl.losses",
    "anchored_entropy_loss": "entrokit.rl.losses",
    "clip_cov_policy_loss": "entrokit.rl.losses",
    "clipped_surrogate": "entrokit.rl.losses",
    "corridor_entropy_loss": "entrokit.rl.losses",
    "entropy_bonus": "entrokit.rl.losses",
    "kl_cov_policy_loss": "entrokit.rl.losses",
    "phase_weight": "entrokit.rl.losses",
    "sampled_entropy": "entrokit.rl.losses",
    "steer_token_weights": "entrokit.rl.losses",
    "AnchoredTargetController": "entrokit.rl.controllers",
    "Controller": "entrokit.rl.controllers",
    "DeadbandController": "entrokit.rl.controllers",
    "DifficultyAwareCoef": "entrokit.rl.controllers",
    "FixedCoef": "entrokit.rl.controllers",
    "PIController": "entrokit.rl.controllers",
    "SignController": "entrokit.rl.controllers",
    "TemperatureScheduler": "entrokit.rl.controllers",
})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'entrokit.rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
