r"""Spread a batch of independent OT problems over the ranks of a ``torch.distributed`` group.

For a batch of :math:`B` problems and :math:`R` ranks, rank :math:`r` solves problems
:math:`[rB/R, (r+1)B/R)` with no communication while solving; the results are then
all-gathered so that every rank holds the results of the whole batch. (To shard *one*
large problem over ranks, use :class:`~entrokit.geometry.sharded.ShardedPointCloud`.)

Every rank calls the same functions with the same full batch (e.g. built from one seed or
read from disk):

.. code-block:: python

    out = solve_batch_distributed(x, y, eps=1e-2)  # x (B, n, d), y (B, m, d)
    out.f        # (B, n) on every rank
    out.local    # this rank's OTResult (with gradients, if any)
"""

from __future__ import annotations

from dataclasses import make_dataclass

import torch
import torch.distributed as dist

from entrokit._errors import InputError
from entrokit._result import PER_PROBLEM_FIELDS, OTResult
from entrokit.geometry.pointcloud import CostFn, CostName, PointCloud
from entrokit.geometry.sharded import all_gather, require_initialised

__all__ = ["rank_slice", "scatter_problems", "gather_problems", "solve_batch_distributed", "BatchResults"]


def rank_slice(batch_size: int, group=None) -> slice:
    """The problems of this rank: ``[r B / R, (r + 1) B / R)``.

    Raises:
        InputError: ``torch.distributed`` is not initialised, or the world size ``R``
            does not divide ``batch_size``.
    """
    require_initialised("spreading a batch over ranks")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if batch_size % world != 0:
        raise InputError(
            f"world size {world} does not divide the batch of {batch_size} problems; pad the batch "
            f"to a multiple of {world} (e.g. repeat the last problem and drop its result), or run "
            f"on a number of ranks that divides {batch_size}."
        )
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def scatter_problems(*tensors: torch.Tensor | None, group=None) -> tuple[torch.Tensor | None, ...]:
    """This rank's slice of the leading batch axis of every tensor (``None`` passes
    through). All tensors must share the batch size ``B``, which the world size must divide."""
    sizes = {t.shape[0] for t in tensors if t is not None}
    if len(sizes) != 1:
        raise InputError(
            f"scatter_problems needs tensors with one leading batch size; got sizes {sorted(sizes)}."
        )
    part = rank_slice(sizes.pop(), group)
    return tuple(None if t is None else t[part] for t in tensors)


def gather_problems(*tensors: torch.Tensor, group=None) -> tuple[torch.Tensor, ...]:
    """Concatenate every rank's tensors along the batch axis, in rank order (on every rank;
    no gradient). Boolean tensors are sent as ``uint8``."""
    out = []
    for t in tensors:
        wire = t.detach().to(torch.uint8) if t.dtype == torch.bool else t.detach()
        parts = all_gather(wire.contiguous(), group)
        out.append(torch.cat(parts, 0).to(t.dtype))
    return tuple(out)


BatchResults = make_dataclass(
    "BatchResults",
    [(name, torch.Tensor) for name in PER_PROBLEM_FIELDS] + [("local", OTResult)],
    frozen=True,
    eq=False,
    namespace={"__module__": __name__},
)
BatchResults.__doc__ = f"""Results of the whole batch on every rank (gathered, detached): the per-problem
fields of :class:`~entrokit.OTResult` ({", ".join(PER_PROBLEM_FIELDS)}), plus this rank's
:class:`~entrokit.OTResult` (``local``, with its gradients and plan)."""


def solve_batch_distributed(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    cost: CostName | CostFn = "sqeuclidean",
    chunk_size: int | None = None,
    group=None,
    **sinkhorn_kwargs,
) -> BatchResults:
    """Solve the batch ``x (B, n, d)``, ``y (B, m, d)`` (weights ``a (B, n)``, ``b (B, m)``
    or ``None`` for uniform) with :func:`entrokit.sinkhorn`, ``B / R`` problems per rank,
    and gather the results on every rank. ``sinkhorn_kwargs`` go to the solver."""
    from entrokit.solvers.sinkhorn import sinkhorn

    x_r, y_r, a_r, b_r = scatter_problems(x, y, a, b, group=group)
    local = sinkhorn(a_r, b_r, PointCloud(x_r, y_r, cost, chunk_size=chunk_size), eps, **sinkhorn_kwargs)
    gathered = gather_problems(*(getattr(local, k) for k in PER_PROBLEM_FIELDS), group=group)
    return BatchResults(**dict(zip(PER_PROBLEM_FIELDS, gathered)), local=local)
