r"""Early-Learning Regularization (ELR) for training with noisy labels.

Liu, Niles-Weed, Razavian & Fernandez-Granda, "Early-Learning Regularization Prevents
Memorization of Noisy Labels", NeurIPS 2020.

With :math:`p_i = \mathrm{softmax}(z_i)` and a per-sample target :math:`t_i` that is a
temporal ensemble of the network's own past predictions, the objective is (paper Eq. 6)

.. math::

    \mathcal L = \frac1B\sum_i \mathrm{CE}(y_i, p_i)
        + \frac{\lambda}{B}\sum_i \log\bigl(1 - \langle p_i, t_i\rangle\bigr).

The regulariser is negative; minimising it drives :math:`\langle p_i, t_i\rangle \to 1`.
Its gradient with respect to the logits (paper Lemma 2) is

.. math::

    \frac{\partial}{\partial z_{c}} \log(1 - \langle p, t\rangle)
        = \frac{p_c\,(\langle p, t\rangle - t_c)}{1 - \langle p, t\rangle},

so once cross-entropy has fitted a clean sample the ELR term keeps pushing toward the
target, and for a mislabelled sample it opposes the pull of the wrong label.

Targets (temporal ensembling, paper Eq. 5, as in the reference code): every time sample
:math:`i` is in a batch, *before* the loss is evaluated,

.. math::

    \hat p_i = \frac{\mathrm{clamp}(p_i, 10^{-4}, 1-10^{-4})}
                    {\sum_k \mathrm{clamp}(p_i, 10^{-4}, 1-10^{-4})_k},\qquad
    t_i \leftarrow \beta\, t_i + (1-\beta)\, \mathrm{sg}(\hat p_i),

with :math:`t_i = 0` at the start (so after the first visit :math:`t_i = (1-\beta)\hat p_i`
is not yet a probability vector; this follows the reference code). The regulariser uses
the clamped (not renormalised) :math:`p_i`, again as the reference code does; clamped
entries therefore receive no gradient from the ELR term.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F

from entrokit._stateful import Option
from entrokit._validation import check_nonneg_real, check_unit_interval, no_autocast, reject_meta
from entrokit.regularizers._buffers import IndexedDataset, PerSampleLoss, reduce_rows, row_loss

__all__ = ["ELRLoss", "IndexedDataset", "elr_penalty"]

_CLAMP = 1e-4  # reference code: torch.clamp(y_pred, 1e-4, 1 - 1e-4)

Reduction = Literal["mean", "sum", "none"]


def elr_penalty(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    r"""ELR penalty :math:`\log(1 - \langle \mathrm{clamp}(p), t\rangle)` per row (no λ).

    Args:
        logits: ``[B, C]`` network outputs :math:`z`.
        targets: ``[B, C]`` ensemble targets :math:`t` (nonnegative, row sums <= 1);
            treated as constants (detached).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (returns ``[B]``).

    Returns:
        The penalty, ``<= 0``, in the dtype of ``logits``. Float16/bfloat16 logits (what
        ``torch.autocast`` hands a loss) are computed in float32, autocast off, and the
        result is cast back; their gradient comes back in their own dtype.
    """
    return row_loss(_penalty_rows, logits, targets, reduction, name="targets",
                    hint="pass one ensemble target row per row of logits.")


def _penalty_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row ``log(1 - <clamp(softmax(z)), t>)`` (paper Eq. 6), unchecked, in ``logits.dtype``."""
    p = F.softmax(logits, dim=1).clamp(_CLAMP, 1.0 - _CLAMP)
    inner = (targets.detach().to(p.dtype) * p).sum(dim=1)
    return torch.log1p(-inner)


class ELRLoss(PerSampleLoss):
    r"""Cross-entropy plus the early-learning regulariser, with per-sample targets.

    The module owns the target buffer ``targets`` (``[num_samples, num_classes]``,
    float32, saved in ``state_dict``) and updates the rows of the batch on every call
    in training mode (``loss.train()``, the default); in eval mode the targets are read
    but not changed.

    Distributed data parallel: with an initialised process group of more than one rank
    (or ``sync=True``), the call all-gathers the indices and the detached normalised
    predictions of every rank and applies the update to all of them, so every rank holds
    the same targets after the step. The returned loss only involves this rank's rows,
    so DDP's gradient averaging gives the full-batch gradient. If one index occurs
    several times in the gathered batch, one of the writes wins (as in the reference).

    Args:
        num_samples: size ``n`` of the training set (indices lie in ``[0, n)``).
        num_classes: number of classes ``C``.
        lam: weight :math:`\lambda \ge 0` of the regulariser (CIFAR-10: 3, CIFAR-100: 7).
        beta: temporal-ensembling momentum :math:`\beta \in [0, 1)` (0.7 / 0.9).
        reduction: ``"mean"`` (default; the paper's objective), ``"sum"`` or ``"none"``
            (per-sample ``CE_i + λ·log(1 − ⟨p_i, t_i⟩)``, shape ``[B]``).
        sync: distributed gathering: ``None`` (auto), ``True`` or ``False``.
        check_inputs: value checks (force a device sync): labels and indices in range, and
            finite logits. A training batch whose logits contain NaN or inf then raises
            :class:`~entrokit.InputError` before any target is changed (under DDP on every
            rank at once, before the gather). With ``check_inputs=False`` nothing syncs and
            such a batch is skipped silently (a ``-inf`` logit too: its softmax is finite, the
            logits are not): the targets are still never overwritten with
            non-finite values.

    Mixed precision: float16/bfloat16 logits (a model under ``torch.autocast``) are computed
    in float32 with autocast off, for the targets' update too, and the loss is returned in
    the logits' dtype (their gradient as well); the targets stay float32.

    ``lam``, ``beta``, ``reduction``, ``sync`` and ``check_inputs`` are checked when they are
    set (at construction or later, e.g. ``loss_fn.beta = 0.9``), not on every call.

    Shape:
        - logits: ``[B, C]``; labels: ``[B]`` (int); index: ``[B]`` (int).
        - output: scalar, or ``[B]`` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> loss_fn = ELRLoss(num_samples=100, num_classes=3, lam=3.0, beta=0.7)
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> loss = loss_fn(logits, torch.tensor([0, 1, 2, 0]), torch.tensor([5, 17, 42, 99]))
        >>> loss.backward()
        >>> loss_fn.targets[5].sum().item() <= 1.0
        True
    """

    rows_state = state_name = "targets"  # t_i = 0 at the start (reference code)
    lam: float = Option(partial(check_nonneg_real, example="lam=3.0 (CIFAR-10) or 7.0 (CIFAR-100)"), default=3.0)
    beta: float = Option(
        partial(check_unit_interval, closed_right=False, example="beta=0.7 (CIFAR-10) or 0.9 (CIFAR-100)"), default=0.7
    )

    @torch.no_grad()
    def update_targets(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        r"""Apply :math:`t_i \leftarrow \beta t_i + (1-\beta)\hat p_i` for ``index`` (Eq. 5).

        ``probs`` (``[B, C]`` softmax outputs) are clamped and renormalised here; under DDP
        the rows of all ranks are gathered first (see the class docstring). A batch with a
        NaN or inf probability raises :class:`~entrokit.InputError` (``check_inputs=True``)
        or is skipped (``check_inputs=False``); the targets are left unchanged either way.
        """
        self._update_from_probs(probs, index)

    def _rows(self, probs: torch.Tensor) -> torch.Tensor:
        p = probs.clamp(_CLAMP, 1.0 - _CLAMP)  # \hat p_i of Eq. 5
        return p / p.sum(dim=1, keepdim=True)

    def _write(self, stats: dict[str, Any]) -> None:
        idx, p = stats["targets"]
        self.targets[idx] = self.beta * self.targets[idx] + (1.0 - self.beta) * p  # Eq. 5

    @reject_meta
    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Return ``CE + λ·log(1 − ⟨p, t⟩)`` for the batch, updating its targets first."""
        z, labels, index = self._check_batch(logits, index, labels)  # z: float32 for half logits
        with no_autocast():  # F.cross_entropy under autocast would return float32
            if self.training:
                self.update_state(z.detach(), index, from_logits=True, what="logits of this batch")
            ce = F.cross_entropy(z, labels, reduction="none")
            reg = _penalty_rows(z, self.targets[index])
            return reduce_rows(ce + self.lam * reg, self.reduction).to(logits.dtype)
