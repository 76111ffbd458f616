"""OT losses between measures: the Sinkhorn divergence and the Monge gap."""

from entrokit.losses.divergence import entropic_ot_value, sinkhorn_divergence
from entrokit.losses.monge_gap import monge_gap

__all__ = ["entropic_ot_value", "monge_gap", "sinkhorn_divergence"]
