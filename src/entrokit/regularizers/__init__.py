"""Entropy regularizers for training (attention entropy, entropy-guided attention, σReparam, AEM, ...)."""

from entrokit.regularizers.aem import (
    AttentionEntropyMaximization,
    aem_loss,
    cosine_annealed_lambda,
    negative_attention_entropy,
)
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
from entrokit.regularizers.sigma_reparam import (
    SigmaReparam,
    SigmaReparamLinear,
    convert_to_sigma_reparam,
    spectral_norm_step,
)

__all__ = [
    "AttentionEntropyMaximization",
    "AttentionEntropyRecorder",
    "EntropyBandRegularizer",
    "LearnableSoftmaxTemperature",
    "ScaledFFN",
    "SigmaReparam",
    "SigmaReparamLinear",
    "SpectralNormLinear",
    "WeightNormLinear",
    "aem_loss",
    "attention_entropy",
    "classify_heads",
    "convert_to_sigma_reparam",
    "cosine_annealed_lambda",
    "entropy_band_penalty",
    "head_entropy_stats",
    "negative_attention_entropy",
    "plot_heatmap",
    "quartile_fractions",
    "spectral_norm_step",
    "temperature_softmax",
    # part B: training objectives with per-sample state
    "ELRLoss",
    "IndexedDataset",
    "LocalEntropyRegularizer",
    "PSKDLoss",
    "all_gather_rows",
    "dual_view_kl",
    "elr_penalty",
    "local_entropy_loss",
    "pskd_alpha",
    "pskd_targets",
    "select_known",
    "soft_cross_entropy",
]

from entrokit.regularizers._buffers import IndexedDataset, all_gather_rows  # noqa: E402
from entrokit.regularizers.elr import ELRLoss, elr_penalty  # noqa: E402
from entrokit.regularizers.legogcd import (  # noqa: E402
    LocalEntropyRegularizer,
    dual_view_kl,
    local_entropy_loss,
    select_known,
)
from entrokit.regularizers.pskd import PSKDLoss, pskd_alpha, pskd_targets, soft_cross_entropy  # noqa: E402
