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
]
# part B exports below
