"""Entropy regularizers for training.

Attention entropy and its recorder, entropy-guided attention, σReparam and AEM (stateless
losses and layers), and the training objectives that keep per-sample or EMA state: ELR,
PS-KD and LegoGCD.
"""

from entrokit.regularizers._buffers import IndexedDataset, all_gather_rows
from entrokit.regularizers.aem import (
    AttentionEntropyMaximization,
    aem_loss,
    cosine_annealed_lambda,
    negative_attention_entropy,
)
from entrokit.regularizers.elr import ELRLoss, elr_penalty
from entrokit.regularizers.entropy import (
    AttentionEntropyRecorder,
    attention_entropy,
    classify_heads,
    head_entropy_stats,
    plot_heatmap,
    quartile_fractions,
)
from entrokit.regularizers.entropy_guided import (
    EntropyBandRegularizer,
    LearnableSoftmaxTemperature,
    ScaledFFN,
    SpectralNormLinear,
    WeightNormLinear,
    entropy_band_penalty,
    temperature_softmax,
)
from entrokit.regularizers.legogcd import (
    LocalEntropyRegularizer,
    dual_view_kl,
    local_entropy_loss,
    select_known,
)
from entrokit.regularizers.pskd import PSKDLoss, pskd_alpha, pskd_targets, soft_cross_entropy
from entrokit.regularizers.sigma_reparam import (
    SigmaReparam,
    SigmaReparamConv2d,
    SigmaReparamLinear,
    convert_to_sigma_reparam,
    spectral_norm_step,
)

__all__ = [
    "AttentionEntropyMaximization",
    "AttentionEntropyRecorder",
    "ELRLoss",
    "EntropyBandRegularizer",
    "IndexedDataset",
    "LearnableSoftmaxTemperature",
    "LocalEntropyRegularizer",
    "PSKDLoss",
    "ScaledFFN",
    "SigmaReparam",
    "SigmaReparamConv2d",
    "SigmaReparamLinear",
    "SpectralNormLinear",
    "WeightNormLinear",
    "aem_loss",
    "all_gather_rows",
    "attention_entropy",
    "classify_heads",
    "convert_to_sigma_reparam",
    "cosine_annealed_lambda",
    "dual_view_kl",
    "elr_penalty",
    "entropy_band_penalty",
    "head_entropy_stats",
    "local_entropy_loss",
    "negative_attention_entropy",
    "plot_heatmap",
    "pskd_alpha",
    "pskd_targets",
    "quartile_fractions",
    "select_known",
    "soft_cross_entropy",
    "spectral_norm_step",
    "temperature_softmax",
]
