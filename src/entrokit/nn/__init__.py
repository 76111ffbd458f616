"""Neural-network layers and losses built on entrokit's solvers (modules store options and
delegate to the functions)."""

from entrokit.nn.attention import (
    SinkhornAttention,
    sinkhorn_attention,
    sinkhorn_attention_with_weights,
)
from entrokit.nn.divergence import SinkhornLoss
from entrokit.nn.matching import OTMatching, log_optimal_transport
from entrokit.nn.router import RouterOutput, SparseOTRouter, sparse_ot_route
from entrokit.nn.sinkd import SinkhornKDLoss, sinkhorn_kd_loss
from entrokit.nn.sliced import SlicedWassersteinLoss

__all__ = [
    "OTMatching",
    "RouterOutput",
    "SinkhornAttention",
    "SinkhornKDLoss",
    "SinkhornLoss",
    "SlicedWassersteinLoss",
    "SparseOTRouter",
    "log_optimal_transport",
    "sinkhorn_attention",
    "sinkhorn_attention_with_weights",
    "sinkhorn_kd_loss",
    "sparse_ot_route",
]
