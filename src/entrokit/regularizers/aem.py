r"""Attention Entropy Maximization (AEM) for multiple-instance learning (Zhang et al., arXiv 2406.15303).

For a bag with MIL attention scores :math:`s \in \mathbb R^N` (the pre-softmax outputs of the
attention network) and attention :math:`a = \mathrm{softmax}(s)` over its :math:`N` instances,

.. math::

    \mathcal L = \mathcal L_{\rm CE}(\hat y, y) + \lambda \sum_{n=1}^N a_n \log a_n
              = \mathcal L_{\rm CE} - \lambda\, H(a),

i.e. the attention entropy is *maximised*. Bags in a batch are averaged (``reduction="mean"``).

**Two input paths.** Pass either the attention weights ``attention=a`` or the scores
``scores=s``. From scores the negative entropy is computed with a log-softmax,

.. math::

    \log a_n = s_n - \operatorname{logsumexp}_m s_m, \qquad
    \sum_n a_n \log a_n = \sum_n e^{\log a_n}\,\log a_n ,

so no weight is rounded to zero before its logarithm is taken. This is how the reference code
(``main.py``) computes it, ``torch.sum(F.softmax(attn, -1) * F.log_softmax(attn, -1))`` with
``attn`` the scores, and it is the path to use for large bags (whole-slide images have
:math:`10^4`–:math:`10^5` patches) and in half precision: a uniform float16 attention over
:math:`10^5` instances is :math:`10^{-5}`, below float16's smallest normal number
(:math:`6.1\cdot10^{-5}`), and with a large score spread most weights flush to zero. Both paths
compute in float32 for float16/bfloat16 inputs, with autocast off, and return the caller's dtype
(the gradients too). In float32/float64 and where nothing underflows, the two paths agree to
rounding.

**Reduction over instances and rows.** As in the reference code, the negative entropy is
**summed** over instances (no division by :math:`N`, so the uniform-attention value is
:math:`-\log N`). With several attention rows per bag (``(B, R, N)``: heads, or one row per
class in DSMIL) it is summed over instances and **averaged over rows**. The reference divides
the sum by ``attn.shape[0]``: that is the number of rows ``C`` for DSMIL (our average), but the
batch size 1 for its multi-head model, whose attention is ``(1, heads, 1, N)``; there the code
sums over the heads, so a reference λ corresponds to ``R·λ`` here.

**λ.** The library default is λ = 0.1, the value of the AEM command in the reference README
(CAMELYON17 config). The reference ``main.py`` itself defaults to ``--lamda 0.0``, which is the
ABMIL baseline (λ = 0 recovers ABMIL), so there λ has to be passed explicitly. The paper tunes λ
per dataset (a third-party summary we could not check reports 0.001 / 0.1 / 0.2 for
CAMELYON16 / CAMELYON17 / LBC).

Optional top-k variant (code): keep the k largest weights of each row, renormalise them and take
their negative entropy (from scores: a log-softmax over the k largest scores, which is the same).
Optional cosine annealing of λ (paper v3, "Cosine Weight Annealing"; **the formula is not given in
the text we could read — unverified**):
:math:`\lambda_t = \lambda_{\rm end} + \tfrac12(\lambda_{\rm start}-\lambda_{\rm end})(1+\cos(\pi t/T))`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit._validation import (
    apply_reduction,
    check_int_vector,
    check_reduction,
    default_atol,
    no_autocast,
    reject_meta,
    working_dtype,
)

__all__ = [
    "negative_attention_entropy",
    "cosine_annealed_lambda",
    "aem_loss",
    "AttentionEntropyMaximization",
]

def _check_lam(lam: float, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, Real):
        raise TypeError(f"{name} must be a real number, got {type(lam).__name__}.")
    if not math.isfinite(lam) or lam < 0:
        raise InputError(
            f"{name} must be a finite number >= 0, got {lam!r}; AEM maximises entropy with "
            f"{name} > 0 (e.g. 0.1, the reference README's value), {name}=0 is the plain "
            "ABMIL/CE baseline."
        )
    return float(lam)


def _check_topk(topk: int | None) -> None:
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, Integral) or topk < 1):
        raise InputError(f"topk must be an int >= 1 or None, got {topk!r}; e.g. topk=8.")


def _pick_input(attention: torch.Tensor | None, scores: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, is_scores)``; exactly one of the two must be given."""
    if (attention is None) == (scores is None):
        raise InputError(
            "pass exactly one of attention= (softmax weights) or scores= (pre-softmax attention "
            "scores; preferred for large bags and half precision), got "
            + ("both." if attention is not None else "neither.")
        )
    is_scores = scores is not None
    t = scores if is_scores else attention
    name = "scores" if is_scores else "attention"
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        what = "pre-softmax MIL attention scores" if is_scores else "MIL attention weights"
        raise TypeError(f"{name} must be a floating torch.Tensor of {what}.")
    if t.ndim not in (2, 3):
        raise InputError(
            f"{name} must be (bags, instances) or (bags, rows, instances), got shape "
            f"{tuple(t.shape)}; for a single bag use {name}.unsqueeze(0)."
        )
    if t.numel() == 0:
        raise InputError(
            f"{name} is empty (shape {tuple(t.shape)}); expected at least one bag with one instance. "
            "Skip the regulariser for an empty batch."
        )
    return t, is_scores


def _broadcast_mask(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = real instance), got {got}.")
    if mask.device != t.device:
        raise InputError(
            f"device mismatch: attention is on {t.device} but mask is on {mask.device}; move "
            "it with mask.to(attention.device)."
        )
    m = mask if mask.ndim == t.ndim else mask.unsqueeze(-2)
    try:
        return torch.broadcast_to(m, t.shape)
    except RuntimeError:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to attention "
            f"{tuple(t.shape)}; pass one flag per instance, shape (bags, instances)."
        ) from None


def _from_scores(s: torch.Tensor, m: torch.Tensor | None, topk: int | None, check_inputs: bool) -> torch.Tensor:
    r"""Per-row :math:`\sum_n a_n\log a_n` from scores via log-softmax (masked entries excluded)."""
    if check_inputs:
        real = s if m is None else s[m]
        if torch.isnan(real).any() or torch.isposinf(real).any():
            raise InputError(
                "scores must not contain NaN or +inf (a score of -inf means zero attention); "
                "check the attention network's output."
            )
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    if topk is not None:
        s = s.topk(min(topk, s.shape[-1]), dim=-1).values
    real = s > float("-inf")  # masked instances and -inf scores carry zero attention
    if check_inputs and not real.any(-1).all():
        raise InputError(
            "every attention row needs at least one real instance with a finite score; a bag "
            "whose instances are all masked has no attention distribution."
        )
    log_a = torch.where(real, F.log_softmax(s, dim=-1), torch.zeros((), dtype=s.dtype, device=s.device))
    return (log_a.exp() * log_a).masked_fill(~real, 0.0).sum(-1)


def _from_weights(
    a: torch.Tensor, m: torch.Tensor | None, topk: int | None, check_inputs: bool, tol: float
) -> torch.Tensor:
    r"""Per-row :math:`\sum_n a_n\log a_n` from attention weights (``0 \log 0 = 0``)."""
    if m is not None:
        a = a.masked_fill(~m, 0.0)
    if check_inputs:
        if not torch.isfinite(a).all() or (a < 0).any():
            raise InputError(
                "attention must be finite and nonnegative; pass softmax weights, or pass the raw "
                "scores as scores=."
            )
        err = (a.sum(-1) - 1).abs().max().item()
        if err > tol:
            raise InputError(
                f"attention rows must sum to 1 over the instances (max error {err:.3g}); apply "
                "softmax over the last axis (after masking padded instances with -inf), or pass "
                "the raw scores as scores=."
            )
    if topk is not None:
        k = min(topk, a.shape[-1])
        a = a.topk(k, dim=-1).values
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    pos = a > 0
    xlogx = torch.where(pos, a * torch.log(torch.where(pos, a, torch.ones_like(a))), torch.zeros_like(a))
    return xlogx.sum(-1)


@reject_meta
def negative_attention_entropy(
    attention: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    topk: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Per-bag :math:`\sum_n a_n \log a_n` (≤ 0; equals :math:`-\log N` for uniform attention).

    Give exactly one of ``attention`` (weights :math:`a`) or ``scores`` (pre-softmax
    :math:`s`, :math:`a = \mathrm{softmax}(s)` over the last axis). The score path uses
    :math:`\log a = \mathrm{log\_softmax}(s)`, so it does not underflow for large bags or in half
    precision; prefer it whenever the scores are at hand.

    Args:
        attention: MIL attention ``(B, N)`` or ``(B, R, N)`` (R attention rows, e.g. heads),
            normalised over the instance axis (last).
        mask: bool ``(B, N)`` (or broadcastable), True = real instance. With ``attention``,
            padded instances must have zero attention; with ``scores``, their scores are ignored
            (the softmax runs over the real instances only).
        scores: pre-softmax attention scores, same shapes as ``attention``. A score of
            :math:`-\infty` means zero attention.
        topk: if set, renormalise the ``topk`` largest weights of each row first (code variant).
            A ``topk`` at least the bag size keeps every instance (the plain entropy).
        check_inputs: value checks (force a device sync): weights nonnegative with rows summing
            to 1 (tolerance 1e-2 in half precision, 1e-4 in float32, 1e-8 in float64), or
            scores free of NaN/+inf with at least one real instance per row.

    Returns:
        ``(B,)`` tensor: summed over instances, averaged over rows if ``R`` is present, in the
        dtype of the input (float16/bfloat16 inputs are computed in float32, autocast off, and
        the result is cast back).

    Examples:
        >>> import torch
        >>> s = torch.zeros(1, 4)
        >>> negative_attention_entropy(scores=s)  # -log 4
        tensor([-1.3863])
        >>> negative_attention_entropy(s.softmax(-1))
        tensor([-1.3863])
    """
    t, is_scores = _pick_input(attention, scores)
    with no_autocast():
        return _negative_entropy(t, is_scores, mask, topk, check_inputs).to(t.dtype)


def _negative_entropy(
    t: torch.Tensor, is_scores: bool, mask: torch.Tensor | None, topk: int | None, check_inputs: bool
) -> torch.Tensor:
    """Per-bag negative entropy in the working dtype (float32 for half inputs)."""
    m = None if mask is None else _broadcast_mask(mask, t)
    _check_topk(topk)
    # row-sum tolerance of the weights: 1e-2 half, 1e-4 float32, 1e-8 float64
    tol = 1e-8 if t.dtype == torch.float64 else default_atol(t.dtype)
    t = t.to(working_dtype(t.dtype))
    if is_scores:
        s = _from_scores(t, m, topk, check_inputs)
    else:
        s = _from_weights(t, m, topk, check_inputs, tol)
    return s.mean(-1) if s.ndim == 2 else s


def cosine_annealed_lambda(step: int, total_steps: int, lam_start: float, lam_end: float = 0.0) -> float:
    r""":math:`\lambda_t = \lambda_{\rm end} + \frac12(\lambda_{\rm start}-\lambda_{\rm end})(1+\cos(\pi\,\min(t,T)/T))` (unverified form)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, Integral) or total_steps < 1:
        raise InputError(f"total_steps must be an int >= 1, got {total_steps!r}.")
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise InputError(f"step must be an int >= 0, got {step!r}.")
    _check_lam(lam_start, "lam_start")
    _check_lam(lam_end, "lam_end")
    t = min(step, total_steps) / total_steps
    return lam_end + 0.5 * (lam_start - lam_end) * (1 + math.cos(math.pi * t))


def _task_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str, check_inputs: bool = True) -> torch.Tensor:
    if target.is_floating_point() and target.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction=reduction)
    if target.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        if logits.ndim < 2:
            raise InputError(
                f"integer targets need class logits (bags, classes), got logits shape {tuple(logits.shape)}; "
                "for a single-logit binary head pass float targets of the same shape."
            )
        # class ids in [0, C), as ELRLoss and PSKDLoss check their labels
        target = check_int_vector(target, "target", logits.shape[0], logits.shape[1], "num_classes",
                                  logits.device, check_inputs)
        return F.cross_entropy(logits, target, reduction=reduction)
    raise InputError(
        f"cannot match target {tuple(target.shape)} ({target.dtype}) to logits {tuple(logits.shape)}: "
        "pass integer class indices (bags,) with logits (bags, classes), or float 0/1 targets with "
        "the same shape as the logits (binary)."
    )


@reject_meta
def aem_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    attention: torch.Tensor | None = None,
    lam: float = 0.1,
    *,
    scores: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    topk: int | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""AEM objective :math:`\mathrm{CE}(\hat y, y) + \lambda\sum_n a_n\log a_n` per bag.

    Args:
        logits: bag logits ``(B, C)`` with integer targets ``(B,)`` (cross-entropy), or any
            shape with float 0/1 targets of the same shape (binary cross-entropy with logits).
        target: bag labels: class ids in ``[0, C)`` (checked unless ``check_inputs=False``)
            or float 0/1 targets.
        attention: MIL attention weights ``(B, N)`` or ``(B, R, N)``; see
            :func:`negative_attention_entropy`. Give this or ``scores``.
        lam: λ ≥ 0. Default 0.1 (the reference README's AEM command; the reference
            ``main.py`` defaults to 0.0, i.e. ABMIL).
        scores: pre-softmax attention scores instead of ``attention`` (log-softmax path, the
            reference code's form; no underflow for large bags).
        mask: bool ``(B, N)``, True = real instance.
        topk: top-k variant (:func:`negative_attention_entropy`; at least the bag size: the
            whole bag).
        reduction: ``"mean"`` | ``"sum"`` over bags, or ``"none"`` for ``(B,)``.
        check_inputs: value checks on the attention / scores and the target range (see
            :func:`negative_attention_entropy`).

    Returns:
        The loss, in the dtype of ``logits`` and the attention / scores (their promoted dtype:
        bfloat16 for bfloat16 inputs). Float16/bfloat16 inputs are computed in float32 with
        autocast off; the gradients come back in each input's own dtype.

    Examples:
        >>> import torch
        >>> s = torch.randn(2, 100)
        >>> y = torch.tensor([0, 1])
        >>> torch.allclose(aem_loss(torch.zeros(2, 2), y, scores=s),
        ...                aem_loss(torch.zeros(2, 2), y, s.softmax(-1)))
        True
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
    t, is_scores = _pick_input(attention, scores)
    with no_autocast():
        ne = _negative_entropy(t, is_scores, mask, topk, check_inputs)
        if ne.shape[0] != logits.shape[0]:
            what = "scores" if is_scores else "attention"
            raise InputError(
                f"{what} has {ne.shape[0]} bags but logits has {logits.shape[0]}; pass the "
                f"{what} of the same bags, in the same order."
            )
        ce = _task_loss(logits.to(working_dtype(logits.dtype)), target, "none", check_inputs)
        if ce.ndim > 1:
            ce = ce.flatten(1).mean(1)
        per_bag = ce + lam * ne
        return apply_reduction(per_bag, reduction).to(torch.promote_types(logits.dtype, t.dtype))


class AttentionEntropyMaximization(nn.Module):
    r"""Module form of :func:`aem_loss`, with optional cosine annealing of λ.

    Args:
        lam: λ (or λ_start when annealing); default 0.1 (the reference README's AEM command;
            the reference ``main.py`` defaults to 0.0 = ABMIL).
        anneal: ``None`` or ``"cosine"`` (unverified formula, see module docstring).
        lam_end: final λ for annealing.
        total_steps: annealing length (in calls to :meth:`step`, e.g. epochs).
        topk, reduction: see :func:`aem_loss`.

    State:
        ``step_count`` buffer (saved in ``state_dict``); call :meth:`step` once per epoch.

    Shape:
        logits ``(B, C)`` / target ``(B,)`` or binary ``(B,)``/``(B,)``; attention or scores
        ``(B, N)`` or ``(B, R, N)``; output scalar (or ``(B,)`` with ``reduction="none"``).

    Examples:
        >>> crit = AttentionEntropyMaximization(lam=0.1)
        >>> att = torch.softmax(torch.randn(2, 5), -1)
        >>> crit(torch.randn(2, 3), torch.tensor([0, 2]), att).ndim
        0
        >>> crit(torch.randn(2, 3), torch.tensor([0, 2]), scores=torch.randn(2, 5)).ndim
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
            isinstance(total_steps, bool) or not isinstance(total_steps, Integral) or total_steps < 1
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
        attention: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AEM loss of the batch; give ``attention`` (weights) or ``scores`` (pre-softmax)."""
        return aem_loss(
            logits, target, attention, self.current_lam, scores=scores, mask=mask, topk=self.topk,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"lam={self.lam}, anneal={self.anneal!r}"
