r"""Progressive Self-Knowledge Distillation (PS-KD).

Kim, Ji, Yoon & Hwang, "Self-Knowledge Distillation with Progressive Refinement of
Targets", ICCV 2021.

The model distils from its own predictions of the previous epoch. For sample :math:`i`
with label :math:`y_i` and stored prediction :math:`P_i^{(t-1)}` (the softmax the model
produced the last time it saw the sample), the soft target at epoch :math:`t` is
(paper Eq. 5)

.. math::

    \tilde y_i^{(t)} = (1-\alpha_t)\,\mathrm{onehot}(y_i) + \alpha_t\,P_i^{(t-1)},
    \qquad \alpha_t = \alpha_T\,\frac{t}{T},

and the loss is the soft-target cross-entropy
:math:`\frac1B\sum_i -\sum_k \tilde y_{ik}\log\mathrm{softmax}(z_i)_k` (no temperature).
With :math:`\alpha_t = 0` this is exactly cross-entropy. The logit gradient is
:math:`\mathrm{softmax}(z_i) - \tilde y_i`, so for the true class it is
:math:`(p_{gt}-1) + \alpha_t(1-P_{i,gt})`: samples that were hard last epoch (low
:math:`P_{i,gt}`) get a smaller push, i.e. the targets rescale gradients by difficulty.

Epoch convention (reference code): epochs are numbered ``0 .. T-1`` and
:math:`\alpha = \alpha_T (e+1)/T`, so :math:`\alpha` reaches :math:`\alpha_T` in the
last epoch. A sample that has never been seen uses its one-hot label as the stored
prediction (the reference fills the buffer with one-hot labels during epoch 0).
"""

from __future__ import annotations

from functools import partial
from numbers import Integral
from typing import Any, Literal

import torch
import torch.nn.functional as F

from entrokit._errors import InputError
from entrokit._stateful import Option, integer
from entrokit._validation import (
    check_count,
    check_int_vector,
    check_logits,
    check_probabilities,
    check_unit_interval,
    no_autocast,
    reject_meta,
)
from entrokit.regularizers._buffers import PerSampleLoss, reduce_rows, row_loss

__all__ = ["PSKDLoss", "pskd_alpha", "pskd_targets", "soft_cross_entropy"]

Reduction = Literal["mean", "sum", "none"]


def pskd_alpha(epoch: int, total_epochs: int, alpha_T: float = 0.8) -> float:
    r"""Linear schedule :math:`\alpha = \alpha_T (e+1)/T` for 0-based epoch ``e``.

    Args:
        epoch: current epoch, ``0 <= epoch < total_epochs``.
        total_epochs: number of training epochs ``T``.
        alpha_T: final weight of the self-teacher, in ``[0, 1]``.

    Returns:
        :math:`\alpha` for this epoch.
    """
    total_epochs = check_count(total_epochs, "total_epochs")
    if isinstance(epoch, bool) or not isinstance(epoch, Integral):
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__}.")
    if not 0 <= epoch < total_epochs:
        raise InputError(
            f"epoch must satisfy 0 <= epoch < total_epochs={total_epochs}, got {epoch}; epochs "
            "are numbered from 0 (pass the loop variable of range(total_epochs))."
        )
    a = check_unit_interval(alpha_T, "alpha_T", closed_right=True, example="alpha_T=0.8")
    return a * (epoch + 1) / total_epochs


@reject_meta
def pskd_targets(
    labels: torch.Tensor, prev_probs: torch.Tensor, alpha: float, *, check_inputs: bool = True
) -> torch.Tensor:
    r"""Soft targets :math:`(1-\alpha)\,\mathrm{onehot}(y) + \alpha P` (Eq. 5).

    Args:
        labels: ``[B]`` integer labels in ``[0, C)``.
        prev_probs: ``[B, C]`` stored predictions (rows are distributions).
        alpha: mixing weight in ``[0, 1]``.
        check_inputs: value checks (force a device sync): labels in range, and rows of
            ``prev_probs`` are finite, nonnegative and sum to 1.

    Returns:
        ``[B, C]`` targets in ``prev_probs.dtype``; each row sums to 1.

    Examples:
        >>> import torch
        >>> pskd_targets(torch.tensor([1]), torch.tensor([[0.5, 0.5]]), alpha=0.5)
        tensor([[0.2500, 0.7500]])
    """
    alpha = check_unit_interval(alpha, "alpha", closed_right=True, example="alpha=0.5")
    prev_probs = check_logits(prev_probs, None, name="prev_probs")
    labels = check_int_vector(
        labels, "labels", prev_probs.shape[0], prev_probs.shape[1], "num_classes",
        prev_probs.device, check_inputs,
    )
    if check_inputs:
        check_probabilities(prev_probs, "prev_probs")
    return _mix(labels, prev_probs, alpha)


def _mix(labels: torch.Tensor, prev_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) onehot(y) + alpha P`` (Eq. 5), unchecked."""
    onehot = F.one_hot(labels, prev_probs.shape[1]).to(prev_probs.dtype)
    return (1.0 - alpha) * onehot + alpha * prev_probs


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    r"""Cross-entropy with soft targets, :math:`-\sum_k \tilde y_k \log\mathrm{softmax}(z)_k`.

    Args:
        logits: ``[B, C]``.
        target: ``[B, C]`` target distributions (treated as constants).
        reduction: ``"mean"`` over the batch (default), ``"sum"`` or ``"none"``.

    Returns:
        The loss in the dtype of ``logits``; float16/bfloat16 logits are computed in float32.

    Examples:
        >>> import torch
        >>> z = torch.zeros(1, 4)
        >>> round(float(soft_cross_entropy(z, torch.full((1, 4), 0.25))), 4)  # log 4
        1.3863
    """
    return row_loss(_soft_ce_rows, logits, target, reduction, name="target",
                    hint="pass one target distribution per row of logits (for class ids use F.cross_entropy).")


def _soft_ce_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row ``-sum_k y_k log softmax(z)_k``, unchecked."""
    return -(target.detach().to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1)


class PSKDLoss(PerSampleLoss):
    r"""Progressive self-knowledge distillation loss with a per-sample prediction buffer.

    Buffers (all in ``state_dict``): ``predictions`` ``[num_samples, num_classes]``
    (float32, the last softmax per sample), ``seen`` ``[num_samples]`` (bool; unseen rows
    use the one-hot label) and ``epoch`` (the current 0-based epoch, set with
    :meth:`set_epoch`).

    On every call in training mode the batch's rows of ``predictions`` are overwritten
    with the detached softmax of ``logits`` *after* the targets were built, so the next
    epoch sees this epoch's prediction. Under DDP (an initialised process group with more
    than one rank, or ``sync=True``) indices and predictions are all-gathered first, so
    all ranks hold the same buffer, as in the reference code.

    Args:
        num_samples: training-set size ``n``.
        num_classes: number of classes ``C``.
        total_epochs: number of epochs ``T`` of the schedule.
        alpha_T: final self-teacher weight :math:`\alpha_T` (paper and code: 0.8).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        sync: distributed gathering: ``None`` (auto), ``True`` or ``False``.
        check_inputs: value checks (force a device sync): labels and indices in range, and
            finite logits. A training batch whose logits contain NaN or inf then raises
            :class:`~entrokit.InputError` before ``predictions`` or ``seen`` change (under DDP
            on every rank at once, before the gather). With ``check_inputs=False`` nothing
            syncs and such a batch is skipped silently (a ``-inf`` logit too: its softmax is finite, the
            logits are not): the stored predictions are still never
            overwritten with non-finite values.

    Mixed precision: float16/bfloat16 logits (a model under ``torch.autocast``) are computed
    in float32 with autocast off, the stored predictions too, and the loss is returned in the
    logits' dtype (their gradient as well).

    ``alpha_T``, ``reduction``, ``sync`` and ``check_inputs`` are checked when they are set
    (at construction or later), not on every call.

    Shape:
        - logits ``[B, C]``, labels ``[B]``, index ``[B]``; output scalar (``[B]`` for
          ``reduction="none"``).

    Examples:
        >>> import torch
        >>> loss_fn = PSKDLoss(num_samples=10, num_classes=3, total_epochs=4)
        >>> loss_fn.set_epoch(1)
        >>> round(loss_fn.alpha, 2)
        0.4
        >>> z = torch.randn(2, 3, requires_grad=True)
        >>> loss_fn(z, torch.tensor([0, 2]), torch.tensor([3, 7])).backward()
    """

    rows_state, state_name = "predictions", "stored predictions"
    total_epochs: int = Option(integer(minimum=1, example="total_epochs=200"))
    alpha_T: float = Option(partial(check_unit_interval, closed_right=True, example="alpha_T=0.8"), default=0.8)

    def _setup(self) -> None:
        super()._setup()
        self.add_state("seen", torch.zeros(self.num_samples, dtype=torch.bool))  # written with predictions
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))  # set by set_epoch, not by batches

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch that drives :math:`\\alpha` (call once per epoch)."""
        pskd_alpha(epoch, self.total_epochs, self.alpha_T)  # validates
        self.epoch.fill_(epoch)

    @property
    def alpha(self) -> float:
        r""":math:`\alpha_T (e+1)/T` for the current epoch ``e``."""
        return self.alpha_T * (int(self.epoch) + 1) / self.total_epochs

    def soft_targets(self, labels: torch.Tensor, index: torch.Tensor, alpha: float) -> torch.Tensor:
        """Targets of Eq. 5 for the given rows (unseen rows use the one-hot label)."""
        onehot = F.one_hot(labels, self.num_classes).to(self.predictions.dtype)
        prev = torch.where(self.seen[index].unsqueeze(1), self.predictions[index], onehot)
        return _mix(labels, prev, alpha)

    @torch.no_grad()
    def update_predictions(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """Overwrite the stored predictions of ``index`` (gathered across ranks under DDP).

        A batch with a NaN or inf probability raises :class:`~entrokit.InputError`
        (``check_inputs=True``) or is skipped (``check_inputs=False``); the buffers are left
        unchanged either way.
        """
        self._update_from_probs(probs, index)

    def _write(self, stats: dict[str, Any]) -> None:
        idx, p = stats["predictions"]
        self.predictions[idx] = p
        self.seen[idx] = True

    @reject_meta
    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor,
        alpha: float | None = None,
    ) -> torch.Tensor:
        """Soft-target cross-entropy against Eq. 5 targets; ``alpha`` overrides the schedule."""
        z, labels, index = self._check_batch(logits, index, labels)  # z: float32 for half logits
        a = self.alpha if alpha is None else check_unit_interval(alpha, "alpha", closed_right=True, example="alpha=0.5")
        target = self.soft_targets(labels, index, a)
        with no_autocast():  # computed in the working dtype, returned in the logits' dtype
            loss = reduce_rows(_soft_ce_rows(z, target), self.reduction)
            if self.training:
                self.update_state(z.detach(), index, from_logits=True, what="logits of this batch")
        return loss.to(logits.dtype)
