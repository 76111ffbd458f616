"""Per-sample state shared by the index-keyed training losses (ELR, PS-KD).

Both losses keep one row of a ``[num_samples, num_classes]`` buffer per training
example, addressed by the example's dataset index. This module holds the pieces they
share: a dataset wrapper that yields indices, boundary checks for ``(logits, labels,
index)`` batches, and a distributed gather so every rank writes the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from entrokit._errors import InputError
from entrokit.regularizers._checks import (  # noqa: F401  (re-exported for the losses)
    check_buffer_device,
    check_count,
    check_int_vector,
    check_logits,
    check_nonneg_real,
    check_unit_interval,
    non_finite_message,
)

__all__ = ["IndexedDataset", "all_gather_rows"]


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


# --------------------------------------------------------------------------------------
# Distributed gather
# --------------------------------------------------------------------------------------


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(
    index: torch.Tensor,
    rows: torch.Tensor,
    *,
    sync: bool | None = None,
    local_ok: torch.Tensor | None = None,
    what: str = "rows",
    owner: str = "the loss",
    state: str = "per-sample buffer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(index, rows)`` from every rank, in rank order.

    Under ``torch.distributed`` each rank sees its own shard of the batch; to keep the
    per-sample buffers identical on every rank, all ranks must write all rows. Batches
    may have different sizes on different ranks (the last batch of an epoch); they are
    padded to the largest size for the collective and trimmed afterwards.

    Args:
        index: ``[b]`` integer indices seen on this rank.
        rows: ``[b, C]`` detached values to write for those indices.
        sync: ``True`` to gather (requires an initialised process group), ``False`` to
            return the inputs unchanged, ``None`` to gather iff a process group with more
            than one rank is initialised.
        local_ok: optional 0-dim bool tensor, this rank's verdict on its batch (e.g.
            ``torch.isfinite(logits).all()``). The verdicts travel with the batch sizes (no
            extra collective); if any rank says ``False``, every rank raises the same
            :class:`~entrokit.InputError` *before* the rows are gathered, so no rank writes
            its buffer and no rank is left waiting in a collective.
        what, owner, state: wording of that error.

    Returns:
        ``(index_all, rows_all)`` with ``sum_r b_r`` rows, rank 0's rows first.
    """
    world = _distributed_world()
    if sync is None:
        sync = world > 1
    if not sync:
        if local_ok is not None and not bool(local_ok):
            raise InputError(non_finite_message(what, owner, state))
        return index, rows
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "sync=True needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first or pass sync=None."
        )
    dev = index.device
    if local_ok is None:
        ok = torch.ones((), dtype=torch.long, device=dev)
    else:
        ok = local_ok.to(device=dev, dtype=torch.long).reshape(())
    b = torch.stack([torch.tensor(index.shape[0], device=dev, dtype=torch.long), ok])  # [size, ok]
    sizes = [torch.zeros_like(b) for _ in range(world)]
    dist.all_gather(sizes, b)
    bad = [r for r, s in enumerate(sizes) if int(s[1]) == 0]
    if bad:
        raise InputError(non_finite_message(what, owner, state, ranks=bad))
    sizes_i = [int(s[0].item()) for s in sizes]
    m = max(sizes_i)
    pad = m - index.shape[0]
    idx_p = torch.cat([index, index.new_zeros(pad)]) if pad else index
    rows_p = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows
    idx_list = [torch.empty_like(idx_p) for _ in range(world)]
    rows_list = [torch.empty_like(rows_p) for _ in range(world)]
    dist.all_gather(idx_list, idx_p.contiguous())
    dist.all_gather(rows_list, rows_p.contiguous())
    idx_all = torch.cat([t[:s] for t, s in zip(idx_list, sizes_i)])
    rows_all = torch.cat([t[:s] for t, s in zip(rows_list, sizes_i)])
    return idx_all, rows_all
