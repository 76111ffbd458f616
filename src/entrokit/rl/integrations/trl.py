r"""entrokit's entropy op, a controller and an intervention inside TRL's ``GRPOTrainer``.

Install the extra: ``pip install 'entrokit[trl]'``. :class:`EntropyControlGRPOTrainer` is a
subclass of ``trl.GRPOTrainer`` (TRL 1.16) that changes three hooks and nothing else:

- ``_get_per_token_logps_and_entropies``: the log-probabilities and token entropies of the
  completion come from :func:`entrokit.rl.token_logprob_entropy` on the backbone's last
  hidden states and the LM head (online log-sum-exp over vocabulary chunks, exact gradients
  of both outputs, no (T, V) logits). The model gets one extra keyword on its forward,
  ``entrokit_head=True``, installed next to TRL's own fused head, so the call still goes
  through the (possibly DDP-wrapped) model. Models this path does not cover (vision inputs,
  MoE auxiliary losses, logit soft-capping or scaling) fall back to TRL's computation.
- ``_compute_loss``: TRL's loss (any ``loss_type``, KL, masks) plus the intervention
  :math:`\mathrm{term}(H, \text{mask}, c)` with the coefficient :math:`c` the controller
  decided at the end of the previous optimizer step, scaled for gradient accumulation like
  TRL's own entropy bonus. The controller is fed, once per optimizer step, the mean over
  the accumulation window and the processes of the *same* ``aggregate(H, mask, mode)`` the
  intervention reads (the mismatch flagged on TRL PR #6140 cannot happen).
- checkpointing: the controller's ``state_dict`` is written to
  ``checkpoint-N/entrokit_entropy_control.pt`` and read back by ``resume_from_checkpoint``.

TRL's own bonus must stay off (``entropy_coef=0``, ``use_adaptive_entropy=False``);
``top_entropy_quantile < 1`` still works and restricts the intervention to the same
high-entropy tokens as the policy gradient, as TRL does.

Example:
    .. code-block:: python

        from trl import GRPOConfig
        from entrokit.rl import PIController
        from entrokit.rl.integrations.trl import EntropyControl, EntropyControlGRPOTrainer

        control = EntropyControl(controller=PIController.tuned(0.6, gain=5.0, lam=0.5, sync=False))
        trainer = EntropyControlGRPOTrainer(
            model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
            processing_class=tokenizer, entropy_control=control,
        )
        trainer.train()
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._optional import require
from entrokit.rl.controllers import Controller, FixedCoef
from entrokit.rl.entropy import token_logprob_entropy
from entrokit.rl.losses import entropy_bonus
from entrokit.rl.masks import AGG_MODES, aggregate

__all__ = ["CONTROL_FILE", "EntropyControl", "EntropyControlGRPOTrainer"]  # noqa: F822 (built lazily)

CONTROL_FILE = "entrokit_entropy_control.pt"

Intervention = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class EntropyControl:
    """What :class:`EntropyControlGRPOTrainer` adds to TRL's loss.

    Args:
        controller: an :mod:`entrokit.rl.controllers` controller; its ``value`` is the
            coefficient. Use ``sync=False``: the trainer already averages the measurement
            over processes. Default: ``FixedCoef(0.0)`` (measure and log only).
        intervention: ``"bonus"`` (:func:`entrokit.rl.losses.entropy_bonus`) or a callable
            ``f(entropy, mask, coef, *, mode) -> (loss, stats)`` (e.g. a
            ``functools.partial`` of :func:`~entrokit.rl.losses.anchored_entropy_loss`).
        mode: the aggregation (``aggregate`` mode) of both the intervention and the
            controller's measurement.
    """

    controller: Controller = field(default_factory=lambda: FixedCoef(0.0, sync=False))
    intervention: str | Intervention = "bonus"
    mode: str = "token-mean"

    def __post_init__(self) -> None:
        if not isinstance(self.controller, Controller):
            raise TypeError(
                f"controller must be an entrokit.rl controller (FixedCoef, PIController, ...), got "
                f"{type(self.controller).__name__}."
            )
        if self.intervention == "bonus":
            self.intervention = entropy_bonus
        elif not callable(self.intervention):
            raise InputError(
                f"intervention must be 'bonus' or a callable f(entropy, mask, coef, *, mode), got "
                f"{self.intervention!r}."
            )
        if self.mode not in AGG_MODES:
            raise InputError(f"mode must be one of {', '.join(map(repr, AGG_MODES))}; got {self.mode!r}.")


def _head_supported(model: Any) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = any(
        getattr(cfg, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
    )
    return not scaled and cfg is model.config and model.get_output_embeddings() is not None


def _install_head(model: Any, temperature: float) -> None:
    """Give ``model.forward`` an ``entrokit_head=True`` mode returning (logp, entropy) per position."""
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(*args: Any, entrokit_head: bool = False, **kwargs: Any) -> Any:
        if not entrokit_head:
            return inner(*args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        head = model.get_output_embeddings()
        valid = labels != -100
        hidden = hidden.to(head.weight.dtype)
        if not bool(valid.any()):  # keep the graph connected for an all-masked micro-batch
            zero = hidden.sum() * 0.0
            return zero.expand(labels.shape).float(), zero.expand(labels.shape).float()
        logp, ent = token_logprob_entropy(
            hidden[valid], head.weight, labels[valid], bias=head.bias, temperature=temperature, check_inputs=False
        )
        full = torch.zeros(labels.shape, dtype=logp.dtype, device=logp.device)
        return full.masked_scatter(valid, logp), full.masked_scatter(valid, ent)

    model.forward = forward
    model._entrokit_head = True


class _EntropyControlHooks:
    """The three hooks of :class:`EntropyControlGRPOTrainer` (mixed in before ``GRPOTrainer``)."""

    def __init__(self, *args: Any, entropy_control: EntropyControl | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise InputError(
                "TRL's own entropy bonus is on (entropy_coef != 0 or use_adaptive_entropy=True); with "
                "EntropyControlGRPOTrainer set entropy_coef=0.0 and use_adaptive_entropy=False and pass "
                "the coefficient through entropy_control, or the bonus is applied twice."
            )
        if entropy_control is None:
            entropy_control = EntropyControl()
        if not isinstance(entropy_control, EntropyControl):
            raise TypeError(f"entropy_control must be an EntropyControl, got {type(entropy_control).__name__}.")
        self.entropy_control = entropy_control
        self._entrokit_window: list[torch.Tensor] = []
        self._entrokit_entropy: torch.Tensor | None = None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if _head_supported(base):
            _install_head(base, self.temperature)

    # -- entropy op ------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **extra,
    ):
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if compute_aux_loss or any(v is not None for v in extra.values()) or not getattr(base, "_entrokit_head", False):
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extra,
            )
            self._entrokit_entropy = out[1]
            return out
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            am = attention_mask[start : start + batch_size]
            labels = ids.masked_fill(am == 0, -100)
            labels[:, :-logits_to_keep] = -100  # only the completion is scored
            with self.accelerator.autocast():
                lp, en = model(input_ids=ids, attention_mask=am, labels=labels, entrokit_head=True)
            logps.append(lp[:, -logits_to_keep:])
            ents.append(en[:, -logits_to_keep:])
        entropies = torch.cat(ents, dim=0) if compute_entropy else None
        self._entrokit_entropy = entropies
        return torch.cat(logps, dim=0), entropies, None

    # -- intervention and controller ---------------------------------------------------------

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        entropies = self._entrokit_entropy
        self._entrokit_entropy = None
        ctl = self.entropy_control
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.bool()
        if self.top_entropy_quantile < 1.0:
            mask = mask & self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
        mode = "train" if self.model.training else "eval"
        coef = ctl.controller.value
        term, _ = ctl.intervention(entropies, mask, coef, mode=ctl.mode)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + term / accumulation
        measured = aggregate(entropies.detach().float(), mask, ctl.mode)
        if mode == "train":
            self._entrokit_window.append(measured)
            if self.accelerator.sync_gradients:
                window = torch.stack(self._entrokit_window).mean()
                window = self.accelerator.reduce(window, reduction="mean")
                self._entrokit_window = []
                ctl.controller.step(window)
                self._metrics[mode]["entrokit/coef"].append(ctl.controller.value)
        self._metrics[mode]["entrokit/entropy"].append(float(measured))
        return loss

    # -- resume ------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            prefix = require("transformers.trainer_utils", "EntropyControlGRPOTrainer", extra="trl").PREFIX_CHECKPOINT_DIR
            folder = f"{prefix}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, CONTROL_FILE)
            torch.save(self.entropy_control.controller.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, CONTROL_FILE)
            if os.path.exists(path):
                self.entropy_control.controller.load_state_dict(torch.load(path, weights_only=True))


_DOC = """``trl.GRPOTrainer`` with entrokit's entropy op, a controller and an intervention.

Takes every argument of ``GRPOTrainer`` plus ``entropy_control`` (:class:`EntropyControl`); see
the module docstring for what changes. Metrics logged per step: ``entrokit/coef`` and
``entrokit/entropy`` (the controller's measurement). Built on first access, so this module
imports without TRL; accessing the class without the ``trl`` extra raises an ``ImportError``
that names the extra.
"""


def __getattr__(name: str) -> Any:
    if name != "EntropyControlGRPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    trl = require("trl", "entrokit.rl.integrations.trl.EntropyControlGRPOTrainer", extra="trl")
    cls = type(name, (_EntropyControlHooks, trl.GRPOTrainer), {"__module__": __name__, "__doc__": _DOC})
    globals()[name] = cls
    return cls
