"""Neural-network layers built on entrokit's solvers."""

from entrokit.nn.router import RouterOutput, SparseOTRouter, sparse_ot_route

__all__ = ["RouterOutput", "SparseOTRouter", "sparse_ot_route"]
