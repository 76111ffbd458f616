"""Per-sample state shared by the index-keyed training losses (ELR, PS-KD).

Both losses keep one row of a ``[num_samples, num_classes]`` buffer per training
example, addressed by the example's dataset index. This module holds the pieces they
share: a dataset wrapper that yields indices, boundary checks for ``(logits, labels,
index)`` batches, and a distributed gather so every rank writes the same rows.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from entrokit._errors import InputError

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
# Boundary checks
# --------------------------------------------------------------------------------------


def check_unit_interval(value: Any, name: str, *, closed_right: bool, example: str) -> float:
    """Check a real number in [0, 1) (or [0, 1] when ``closed_right``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    v = float(value)
    ok = math.isfinite(v) and v >= 0 and (v <= 1 if closed_right else v < 1)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise InputError(f"{name} must lie in {interval}, got {value!r}; use e.g. {example}.")
    return v


def check_nonneg_real(value: Any, name: str, *, example: str) -> float:
    """Check a finite real number >= 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}; use e.g. {example}.")
    return v


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """Check an int >= ``minimum`` (used for buffer sizes)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value}.")
    return value


def check_logits(logits: Any, num_classes: int | None, name: str = "logits") -> torch.Tensor:
    """Check a floating ``[B, C]`` tensor with ``B >= 1`` (and ``C == num_classes`` if given)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [batch, num_classes], got "
            f"{type(logits).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype, got {logits.dtype}; pass the raw network "
            f"output (e.g. {name}.float())."
        )
    if num_classes is None:
        num_classes = logits.shape[-1] if logits.dim() == 2 else "num_classes"
    if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] == 0:
        raise InputError(
            f"{name} must have shape [batch, {num_classes}] (batch >= 1), got "
            f"{tuple(logits.shape)}; flatten extra axes or check num_classes."
        )
    return logits


def check_int_vector(
    t: Any, name: str, batch: int, upper: int, upper_name: str, device: torch.device, check_values: bool
) -> torch.Tensor:
    """Check an integer ``[batch]`` tensor with entries in ``[0, upper)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integers with shape [{batch}], got "
            f"{type(t).__name__}; convert it with torch.as_tensor({name})."
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {t.dtype}.")
    if t.dim() != 1 or t.shape[0] != batch:
        raise InputError(
            f"{name} must have shape [{batch}] (one entry per row of logits), got "
            f"{tuple(t.shape)}."
        )
    if t.device != device:
        raise InputError(
            f"device mismatch: logits are on {device} but {name} is on {t.device}; move it "
            f"with {name}.to(logits.device)."
        )
    if check_values:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"{name} out of range: got {bad}, expected 0 <= {name} < {upper_name}={upper}. "
                + (
                    "Return dataset indices with IndexedDataset(ds) and build the loss with "
                    "num_samples=len(ds)."
                    if name == "index"
                    else "Labels must be class ids 0..num_classes-1."
                )
            )
    return t.long()


def check_buffer_device(buf: torch.Tensor, logits: torch.Tensor, owner: str) -> None:
    """The per-sample buffer must live on the device of the logits."""
    if buf.device != logits.device:
        raise InputError(
            f"{owner} keeps its buffers on {buf.device} but logits are on {logits.device}; "
            f"move the loss with loss.to(logits.device)."
        )


# --------------------------------------------------------------------------------------
# Distributed gather
# --------------------------------------------------------------------------------------


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(
    index: torch.Tensor, rows: torch.Tensor, *, sync: bool | None = None
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

    Returns:
        ``(index_all, rows_all)`` with ``sum_r b_r`` rows, rank 0's rows first.
    """
    world = _distributed_world()
    if sync is None:
        sync = world > 1
    if not sync:
        return index, rows
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "sync=True needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first or pass sync=None."
        )
    b = torch.tensor([index.shape[0]], device=index.device, dtype=torch.long)
    sizes = [torch.zeros_like(b) for _ in range(world)]
    dist.all_gather(sizes, b)
    sizes_i = [int(s.item()) for s in sizes]
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
