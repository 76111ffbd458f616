"""OT losses between measures: the Sinkhorn divergence, sliced Wasserstein and the Monge gap."""

from entrokit.losses.divergence import entropic_ot_value, sinkhorn_divergence
from entrokit.losses.monge_gap import monge_gap
from entrokit.losses.sliced import random_projections, sliced_wasserstein

__all__ = ["entropic_ot_value", "monge_gap", "random_projections", "sinkhorn_divergence", "sliced_wasserstein"]
