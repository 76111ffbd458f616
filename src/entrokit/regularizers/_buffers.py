"""Per-sample state shared by the index-keyed training losses (ELR, PS-KD).

Both losses keep one row of a ``[num_samples, num_classes]`` buffer per training
example, addressed by the example's dataset index. This module holds the pieces they
share: a dataset wrapper that yields indices, the reduction of their per-sample losses, and
a distributed gather so every rank writes the same rows (used by
:meth:`entrokit._stateful.StatefulModule.update_state` for ``"gather"`` states).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from entrokit._stateful import all_gather_rows

__all__ = ["IndexedDataset", "all_gather_rows", "reduce_rows"]


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
