"""Geometries: how a solver sees the ground cost (see :mod:`entrokit.geometry.base`)."""

from __future__ import annotations

import torch

from entrokit.geometry.base import Geometry, combine_lse, exp_floor, lse_to_softmin, plan_block
from entrokit.geometry.costs import Cost, Euclidean, PNorm, SqEuclidean
from entrokit.geometry.dense import DenseCost
from entrokit.geometry.keops import KeOpsPointCloud
from entrokit.geometry.logit import LogitCost
from entrokit.geometry.multiscale import GridClusters, TruncatedPointCloud, grid_cluster
from entrokit.geometry.pointcloud import PointCloud, memory_budget, set_memory_budget
from entrokit.geometry.sharded import CommCounter, ShardedPointCloud

__all__ = [
    "Geometry", "DenseCost", "Cost", "SqEuclidean", "Euclidean", "PNorm", "LogitCost", "PointCloud", "KeOpsPointCloud", "ShardedPointCloud", "CommCounter",
    "TruncatedPointCloud", "GridClusters", "grid_cluster", "as_geometry",
    "memory_budget", "set_memory_budget", "exp_floor", "combine_lse", "lse_to_softmin", "plan_block",
]


def as_geometry(cost) -> Geometry:
    """Wrap a tensor as :class:`DenseCost`; pass geometries through."""
    if isinstance(cost, Geometry):
        return cost
    if isinstance(cost, torch.Tensor):
        return DenseCost(cost)
    raise TypeError(
        f"cost must be a torch.Tensor or NumPy array of shape (n, m), or an entrokit geometry "
        f"(PointCloud, DenseCost), got {type(cost).__name__}."
    )
