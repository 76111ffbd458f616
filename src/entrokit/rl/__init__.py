"""Entropy control for reinforcement learning of language models (``entrokit.rl``).

Plain tensors in, plain tensors out; works in any PyTorch training loop.

Ops (:mod:`entrokit.rl.entropy`)
    :func:`token_entropy` (exact, chunked backward; ``support=`` :class:`TopK`, :class:`TopP`,
    :class:`Clamp`) and :func:`token_logprob_entropy` (from hidden states, logits never formed).
Masks and aggregation (:mod:`entrokit.rl.masks`)
    :func:`top_entropy_mask` (per batch: the 80/20 rule; per sequence: SIREN), with an exact
    global quantile under ``torch.distributed`` (:func:`distributed_quantile`), and
    :func:`aggregate` with verl's ``loss_agg_mode`` names.

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
