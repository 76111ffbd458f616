"""Neural-network layers and losses built on entrokit's solvers (modules store options and
delegate to the functions)."""

from entrokit.nn.divergence import SinkhornLoss
from entrokit.nn.router import RouterOutput, SparseOTRouter, sparse_ot_route

__all__ = ["RouterOutput", "SinkhornLoss", "SparseOTRouter", "sparse_ot_route"]
