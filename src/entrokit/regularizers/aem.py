r"""Attention Entropy Maximization (AEM) for multiple-instance learning (Zhang et al., arXiv 2406.15303).

For a bag with MIL attention :math:`a = \mathrm{softmax}(s)` over its :math:`N` instances,

.. math::

    \mathcal L = \mathcal L_{\rm CE}(\hat y, y) + \lambda \sum_{n=1}^N a_n \log a_n
              = \mathcal L_{\rm CE} - \lambda\, H(a),

i.e. the attention entropy is *maximised*. As in the reference code (``main.py``), the negative
entropy is **summed** over instances (no division by N); with several attention rows per bag
(multi-head / DSMIL) it is summed over instances and averaged over rows. λ = 0.1 is the code
default (λ = 0 recovers ABMIL). Bags in a batch are averaged.

Optional top-k variant (code): renormalise the k largest weights and use their negative
entropy. Optional cosine annealing of λ (paper v3, "Cosine Weight Annealing"; **the formula is
not given in the text we could read — unverified**):
:math:`\lambda_t = \lambda_{\rm end} + \tfrac12(\lambda_{\rm start}-\lambda_{\rm end})(1+\cos(\pi t/T))`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit._validation import apply_reduction
from entrokit.regularizers._checks import check_reduction

__all__ = [
    "negative_attention_entropy",
    "cosine_annealed_lambda",
    "aem_loss",
    "AttentionEntropyMaximization",
]


def _check_lam(lam: float, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(lam).__name__}.")
    if not math.isfinite(lam) or lam < 0:
        raise InputError(
            f"{name} must be a finite number >= 0, got {lam!r}; AEM maximises entropy with "
            f"{name} > 0 (code default 0.1), {name}=0 is the plain CE baseline."
        )
    return float(lam)


def _check_topk(topk: int | None) -> None:
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise InputError(f"topk must be an int >= 1 or None, got {topk!r}; e.g. topk=8.")


def negative_attention_entropy(
    attention: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    topk: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Per-bag :math:`\sum_n a_n \log a_n` (≤ 0; equals :math:`-\log N` for uniform attention).

    Args:
        attention: MIL attention ``(B, N)`` or ``(B, R, N)`` (R attention rows, e.g. heads),
            normalised over the instance axis (last).
        mask: bool ``(B, N)`` (or broadcastable), True = real instance; padded instances must
            have zero attention and are ignored.
        topk: if set, renormalise the ``topk`` largest weights of each row first (code variant).
        check_inputs: check nonnegativity and that rows sum to 1.

    Returns:
        ``(B,)`` tensor: summed over instances, averaged over rows if ``R`` is present.
    """
    if not isinstance(attention, torch.Tensor) or not attention.is_floating_point():
        raise TypeError("attention must be a floating torch.Tensor of MIL attention weights.")
    if attention.ndim not in (2, 3):
        raise InputError(
            f"attention must be (bags, instances) or (bags, rows, instances), got shape "
            f"{tuple(attention.shape)}; for a single bag use attention.unsqueeze(0)."
        )
    a = attention
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = real instance), got {got}.")
        if mask.device != a.device:
            raise InputError(
                f"device mismatch: attention is on {a.device} but mask is on {mask.device}; move "
                "it with mask.to(attention.device)."
            )
        m = mask if mask.ndim == a.ndim else mask.unsqueeze(-2)
        try:
            m = torch.broadcast_to(m, a.shape)
        except RuntimeError:
            raise InputError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to attention "
                f"{tuple(a.shape)}; pass one flag per instance, shape (bags, instances)."
            ) from None
        a = a.masked_fill(~m, 0.0)
    if check_inputs:
        if not torch.isfinite(attention).all() or (attention < 0).any():
            raise InputError("attention must be finite and nonnegative; pass softmax weights, not scores.")
        tol = 1e-4 if a.dtype != torch.float64 else 1e-8
        err = (a.sum(-1) - 1).abs().max().item()
        if err > tol:
            raise InputError(
                f"attention rows must sum to 1 over the instances (max error {err:.3g}); apply "
                "softmax over the last axis (after masking padded instances with -inf)."
            )
    _check_topk(topk)
    if topk is not None:
        k = min(topk, a.shape[-1])
        a = a.topk(k, dim=-1).values
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    pos = a > 0
    xlogx = torch.where(pos, a * torch.log(torch.where(pos, a, torch.ones_like(a))), torch.zeros_like(a))
    s = xlogx.sum(-1)  # Σ_n a_n log a_n (code: summed, not averaged)
    return s.mean(-1) if s.ndim == 2 else s


def cosine_annealed_lambda(step: int, total_steps: int, lam_start: float, lam_end: float = 0.0) -> float:
    r""":math:`\lambda_t = \lambda_{\rm end} + \frac12(\lambda_{\rm start}-\lambda_{\rm end})(1+\cos(\pi\,\min(t,T)/T))` (unverified form)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise InputError(f"total_steps must be an int >= 1, got {total_steps!r}.")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step must be an int >= 0, got {step!r}.")
    _check_lam(lam_start, "lam_start")
    _check_lam(lam_end, "lam_end")
    t = min(step, total_steps) / total_steps
    return lam_end + 0.5 * (lam_start - lam_end) * (1 + math.cos(math.pi * t))


def _task_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    if target.is_floating_point() and target.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
    if target.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        if logits.ndim < 2:
            raise InputError(
                f"integer targets need class logits (bags, classes), got logits shape {tuple(logits.shape)}; "
                "for a single-logit binary head pass float targets of the same shape."
            )
        return F.cross_entropy(logits, target.long(), reduction=reduction)
    raise InputError(
        f"cannot match target {tuple(target.shape)} ({target.dtype}) to logits {tuple(logits.shape)}: "
        "pass integer class indices (bags,) with logits (bags, classes), or float 0/1 targets with "
        "the same shape as the logits (binary)."
    )


def aem_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    attention: torch.Tensor,
    lam: float = 0.1,
    *,
    mask: torch.Tensor | None = None,
    topk: int | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""AEM objective :math:`\mathrm{CE}(\hat y, y) + \lambda\sum_n a_n\log a_n` per bag.

    Args:
        logits: bag logits ``(B, C)`` with integer targets ``(B,)`` (cross-entropy), or any
            shape with float 0/1 targets of the same shape (binary cross-entropy with logits).
        target: bag labels.
        attention: MIL attention ``(B, N)`` or ``(B, R, N)``; see :func:`negative_attention_entropy`.
        lam: λ ≥ 0 (code default 0.1).
        mask: bool ``(B, N)``, True = real instance.
        topk: top-k variant.
        reduction: ``"mean"`` | ``"sum"`` over bags, or ``"none"`` for ``(B,)``.
    """
    lam = _check_lam(lam)
    check_reduction(reduction)
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"logits and target must be torch.Tensors, got {type(logits).__name__} and "
            f"{type(target).__name__}; convert them with torch.as_tensor(...)."
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}; use logits.float().")
    if logits.ndim == 0 or target.shape[:1] != logits.shape[:1]:
        raise InputError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one row per "
            "bag (same first dimension); for a single bag add a batch axis with unsqueeze(0)."
        )
    ne = negative_attention_entropy(attention, mask, topk=topk, check_inputs=check_inputs)
    if ne.shape[0] != logits.shape[0]:
        raise InputError(
            f"attention has {ne.shape[0]} bags but logits has {logits.shape[0]}; pass the "
            "attention of the same bags, in the same order."
        )
    ce = _task_loss(logits, target, "none")
    if ce.ndim > 1:
        ce = ce.flatten(1).mean(1)
    per_bag = ce + lam * ne
    return apply_reduction(per_bag, reduction)


class AttentionEntropyMaximization(nn.Module):
    r"""Module form of :func:`aem_loss`, with optional cosine annealing of λ.

    Args:
        lam: λ (or λ_start when annealing); code default 0.1.
        anneal: ``None`` or ``"cosine"`` (unverified formula, see module docstring).
        lam_end: final λ for annealing.
        total_steps: annealing length (in calls to :meth:`step`, e.g. epochs).
        topk, reduction: see :func:`aem_loss`.

    State:
        ``step_count`` buffer (saved in ``state_dict``); call :meth:`step` once per epoch.

    Shape:
        logits ``(B, C)`` / target ``(B,)`` or binary ``(B,)``/``(B,)``; attention ``(B, N)`` or
        ``(B, R, N)``; output scalar (or ``(B,)`` with ``reduction="none"``).

    Examples:
        >>> crit = AttentionEntropyMaximization(lam=0.1)
        >>> att = torch.softmax(torch.randn(2, 5), -1)
        >>> crit(torch.randn(2, 3), torch.tensor([0, 2]), att).ndim
        0
    """

    def __init__(
        self,
        lam: float = 0.1,
        *,
        anneal: Literal["cosine"] | None = None,
        lam_end: float = 0.0,
        total_steps: int | None = None,
        topk: int | None = None,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__()
        self.lam = _check_lam(lam)
        self.lam_end = _check_lam(lam_end, "lam_end")
        if anneal not in (None, "cosine"):
            raise InputError(f"anneal must be None or 'cosine', got {anneal!r}; e.g. anneal='cosine'.")
        if anneal == "cosine" and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise InputError(
                f"anneal='cosine' needs total_steps (an int >= 1, e.g. the number of epochs), got "
                f"{total_steps!r}."
            )
        _check_topk(topk)
        check_reduction(reduction)
        self.anneal = anneal
        self.total_steps = total_steps
        self.topk = topk
        self.reduction = reduction
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    @property
    def current_lam(self) -> float:
        """λ at the current step."""
        if self.anneal is None:
            return self.lam
        return cosine_annealed_lambda(int(self.step_count), self.total_steps, self.lam, self.lam_end)

    def step(self) -> None:
        """Advance the annealing counter (call once per epoch)."""
        self.step_count += 1

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        attention: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return aem_loss(
            logits, target, attention, self.current_lam, mask=mask, topk=self.topk, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"lam={self.lam}, anneal={self.anneal!r}"
