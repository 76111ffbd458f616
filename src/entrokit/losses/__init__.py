"""OT losses between measures: the Sinkhorn divergence and related estimators."""

from entrokit.losses.divergence import entropic_ot_value, sinkhorn_divergence

__all__ = ["entropic_ot_value", "sinkhorn_divergence"]
