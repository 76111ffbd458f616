"""Per-sample state shared by the index-keyed training losses (ELR, PS-KD).

Both losses keep one row of a ``[num_samples, num_classes]`` buffer per training
example, addressed by the example's dataset index. This module holds the pieces they
share: a dataset wrapper that yields indices, their base :class:`PerSampleLoss` (the buffer
as a ``"gather"`` state of :class:`~entrokit._stateful.StatefulModule`, the batch checks and
the measured rows) and the reduction of their per-sample losses.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from entrokit._stateful import Option, StatefulModule, all_gather_rows, choice, integer
from entrokit._validation import (
    REDUCTIONS,
    apply_reduction,
    check_logits,
    check_reduction,
    check_same_shape,
    check_sample_batch,
    no_autocast,
    working_dtype,
)

__all__ = ["IndexedDataset", "PerSampleLoss", "all_gather_rows", "reduce_rows", "row_loss"]


class PerSampleLoss(StatefulModule):
    """Base of the index-keyed losses: a ``[num_samples, num_classes]`` buffer, one row per example.

    The buffer (named by ``rows_state``, float32 even under AMP, zeros at the start) is a
    ``"gather"`` state: under DDP the ``(index, rows)`` of every rank are gathered, so all
    ranks write all rows. A subclass gives ``_rows`` (what is stored for the detached
    probabilities of a batch) and ``_write``. The verdict of the finite-batch guard is on
    what the caller passed (the logits: the softmax of a ``-inf`` logit is finite).
    """

    rows_state: ClassVar[str]
    skip_without_sync = True
    num_samples: int = Option(integer(minimum=1, example="num_samples=len(train_set)"), fixed=True)
    num_classes: int = Option(integer(minimum=2, example="num_classes=10"), fixed=True)
    reduction: str = Option(choice(REDUCTIONS), default="mean", kw_only=True)

    def _setup(self) -> None:
        self.add_state(self.rows_state, torch.zeros(self.num_samples, self.num_classes), sync="gather")

    def _check_batch(
        self, rows: Any, index: Any, labels: Any = None, name: str = "logits"
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        buf = getattr(self, self.rows_state)
        return check_sample_batch(self, rows, index, buf, type(self).__name__, labels=labels, name=name)

    def _update_from_probs(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        probs, _, index = self._check_batch(probs, index, name="probs")
        self.update_state(probs, index, what="probs of this batch")

    def _measure(self, rows: torch.Tensor, index: torch.Tensor, *, from_logits: bool = False) -> dict[str, Any]:
        p = F.softmax(rows, dim=1) if from_logits else rows
        stored = self._rows(p).to(getattr(self, self.rows_state).dtype)
        return {self.rows_state: (index, stored), self.INPUTS_FINITE: torch.isfinite(rows).all()}

    def _rows(self, probs: torch.Tensor) -> torch.Tensor:
        """What is stored for the detached probabilities of a batch (override)."""
        return probs


def row_loss(rows: Any, logits: Any, targets: Any, reduction: str, *, name: str, hint: str) -> torch.Tensor:
    """The functional form of a per-sample loss: ``rows(z, targets)`` (one value per row) of
    the checked ``[B, C]`` logits and the ``targets`` of their shape (``name``; ``hint`` says
    what to pass), computed in the working dtype with autocast off (float16/bfloat16 logits
    in float32), reduced, and cast back to the logits' dtype."""
    logits = check_logits(logits, None)
    check_same_shape(targets, logits, name, "logits", hint)
    check_reduction(reduction)
    with no_autocast():
        per = rows(logits.to(working_dtype(logits.dtype)), targets)
        return apply_reduction(per, reduction).to(logits.dtype)


def reduce_rows(per: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-sample losses by an option checked when it was set (no check here)."""
    if reduction == "mean":
        return per.mean()
    return per.sum() if reduction == "sum" else per


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item also carries its index.

    ``IndexedDataset(ds)[i]`` returns ``(*ds[i], i)`` when ``ds[i]`` is a tuple (so
    ``(x, y)`` becomes ``(x, y, i)``) and ``(ds[i], i)`` otherwise. The default
    collate function turns the indices into a ``LongTensor``, which is what
    :class:`~entrokit.regularizers.elr.ELRLoss` and
    :class:`~entrokit.regularizers.pskd.PSKDLoss` expect as ``index``.

    Args:
        dataset: any object with ``__len__`` and ``__getitem__``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(4, 2), torch.arange(4)))
        >>> x, y, i = ds[2]
        >>> int(y), i
        (2, 2)
    """

    def __init__(self, dataset: Any) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"dataset must be a map-style dataset with __len__ and __getitem__, got "
                f"{type(dataset).__name__}; iterable datasets have no stable index, wrap a "
                "map-style dataset instead."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)
