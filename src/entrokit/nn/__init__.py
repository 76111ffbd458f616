"""Neural-network layers and losses built on entrokit's solvers (modules store options and
delegate to the functions)."""

from entrokit.nn.divergence import SinkhornLoss
from entrokit.nn.router import RouterOutput, SparseOTRouter, sparse_ot_route
from entrokit.nn.sinkd import SinkhornKDLoss, sinkhorn_kd_loss
from entrokit.nn.sliced import SlicedWassersteinLoss

__all__ = ["RouterOutput", "SinkhornKDLoss", "SinkhornLoss", "SlicedWassersteinLoss", "SparseOTRouter", "sinkhorn_kd_loss", "sparse_ot_route"]
