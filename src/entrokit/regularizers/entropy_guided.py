r"""Entropy-guided attention for softmax-only transformers (Jha & Reagen, 2025, arXiv 2501.03489).

**Entropy band regulariser** (paper Algorithm 1, reference code ``entropy_regularization.py``).
With learnable threshold weights :math:`\theta\in\mathbb R^{L\times H}`, tolerance
:math:`\gamma` and :math:`E_{\max}=\log T`,

.. math::

    \tau_{lh} = \theta_{lh} E_{\max}, \quad m = \gamma E_{\max}, \quad
    \delta = E - \tau_{lh}, \quad
    \mathrm{pen}(\delta) = \delta^2\, \mathbf 1[|\delta| > m],

.. math::

    \mathcal L_{\rm ent} = \frac1L \sum_l \frac1H \sum_h P_{lh}, \qquad
    \mathcal L = \mathcal L_{\rm CE} + \lambda\, \mathcal L_{\rm ent}.

Paper and code differ in :math:`P_{lh}` (both supported, ``mode=``):

* ``"per_position"`` (default; the reference code and the paper's appendix code):
  :math:`P_{lh} = \sum_{b,i} \mathrm{pen}(E_{bhi} - \tau_{lh})`, one entropy per batch element
  and query, **summed**. :math:`\lambda = 10^{-5}` (CodeParrot) is calibrated to this sum: a
  mean-reduced λ equals λ × (B·T).
* ``"per_head"`` (Algorithm 1 as written): :math:`P_{lh} = \mathrm{pen}(\bar E_{lh} - \tau_{lh})`
  with :math:`\bar E_{lh}` the mean over batch and queries. Because θ is trained by the same
  loss it can cancel this single deviation, which can make the penalty inert.

``gate="smooth"`` replaces the hard gate (a jump from 0 to :math:`m^2` at :math:`|\delta|=m`)
with :math:`(|\delta| - m)_+^2`. The paper's inline formula gates one-sidedly
(:math:`\delta > m`); Algorithm 1 and the code use :math:`|\delta|` (default here). The
repository's Hugging-Face example re-uses the *first* block's θ for every layer; here θ is
per (layer, head) as in the paper. θ initialisation is not stated by the authors; the default
0.5 is our choice (learned values end in 0.2–0.5, paper Fig. 6).

**Learnable temperature** (paper, Appendix A):
:math:`a_{ij} = \mathrm{softmax}_j\big(s_{ij} / t_{h,i}\big)` with one temperature per head and
query position; :math:`t>1` raises, :math:`t<1` lowers the entropy.

**PI-friendly normalisation** (paper): weight normalisation, spectral normalisation
and learnable FFN scaling :math:`X_{\rm out} = \beta_l X_{\rm SA} + \alpha_l^{-1}\,\mathrm{FFN}(X_{\rm SA})`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit._validation import (
    _check_float_ndim,
    check_choice,
    check_count,
    check_finite_real,
    check_layer_input,
    check_nonneg_real,
    check_positive,
    no_autocast,
    reject_meta,
    working_dtype,
)
from entrokit.regularizers.entropy import _attention_entropy
from entrokit.regularizers.sigma_reparam import _svd_init, spectral_norm_step

__all__ = [
    "entropy_band_penalty",
    "EntropyBandRegularizer",
    "temperature_softmax",
    "LearnableSoftmaxTemperature",
    "WeightNormLinear",
    "SpectralNormLinear",
    "ScaledFFN",
]


MODES = ("per_position", "per_head")
GATES = ("hard", "smooth")


def _check_nonneg(x: float, name: str, example: str) -> float:
    return check_nonneg_real(x, name, example=f"{name}={example}")


def _check_max_entropy(max_entropy: float) -> float:
    return check_positive(max_entropy, "max_entropy", example="max_entropy=math.log(T)")


def _stack_entropies(entropies: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(entropies, torch.Tensor):
        e = entropies
    else:
        if len(entropies) == 0:
            raise InputError("entropies is an empty list; pass one (batch, heads, queries) tensor per layer.")
        shapes = {tuple(t.shape) for t in entropies}
        if len(shapes) != 1:
            raise InputError(f"all layers must have the same entropy shape, got {sorted(shapes)}.")
        for i, t in enumerate(entropies):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(
                    f"entropies[{i}] must be a floating torch.Tensor (batch, heads, queries), got "
                    f"{got}; compute it with attention_entropy(attn)."
                )
        e = torch.stack(list(entropies))
    _check_float_ndim(e, "entropies", 4, layout="be (layers, batch, heads, queries) or a list of (batch, heads, queries)",
                      hint="compute them with attention_entropy(attn) per layer.")
    return e


def _check_query_mask(query_mask: object, B: int, H: int, T: int, device: torch.device) -> torch.Tensor:
    """Validate a query padding mask; returns it as ``(B, 1 or H, T)``."""
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        got = query_mask.dtype if isinstance(query_mask, torch.Tensor) else type(query_mask).__name__
        raise TypeError(
            f"query_mask must be a bool tensor (True = real query) or None, got {got}; for "
            "a 0/1 mask pass query_mask.bool()."
        )
    if query_mask.shape not in ((B, T), (B, H, T)) or query_mask.device != device:
        raise InputError(
            f"query_mask must have shape (batch, queries) = {(B, T)} or (batch, heads, "
            f"queries) = {(B, H, T)} on {device}, got {tuple(query_mask.shape)} on "
            f"{query_mask.device}; with a KV cache keep the last T columns of the padding "
            "mask (attention_mask[:, -T:])."
        )
    return query_mask if query_mask.ndim == 3 else query_mask[:, None, :]


@reject_meta
def entropy_band_penalty(
    entropies: torch.Tensor | Sequence[torch.Tensor],
    theta: torch.Tensor,
    max_entropy: float,
    gamma: float = 0.2,
    *,
    mode: Literal["per_position", "per_head"] = "per_position",
    gate: Literal["hard", "smooth"] = "hard",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Banded squared penalty :math:`\mathcal L_{\rm ent}` (without the λ factor).

    Args:
        entropies: ``(L, B, H, T)`` tensor or a list of ``L`` tensors ``(B, H, T)`` of
            per-query attention entropies (nats), e.g. from :func:`attention_entropy`.
        theta: threshold weights ``(L, H)``; the threshold is ``theta * max_entropy``.
        max_entropy: :math:`E_{\max}`, usually ``log T``.
        gamma: tolerance fraction; the band half-width is ``gamma * max_entropy``.
        mode: ``"per_position"`` (code, summed over batch and queries) or ``"per_head"``
            (Algorithm 1, one mean entropy per head).
        gate: ``"hard"`` = :math:`\delta^2 1[|\delta|>m]` (paper/code), ``"smooth"`` =
            :math:`(|\delta|-m)_+^2`.
        query_mask: optional bool ``(B, T)`` or ``(B, H, T)``; False drops a query (padding).

    Returns:
        Scalar tensor :math:`\frac1L\sum_l\frac1H\sum_h P_{lh}` in the dtype of the
        entropies; float16/bfloat16 entropies are computed in float32 (autocast off), with
        ``theta`` in that dtype too.
    """
    e = _stack_entropies(entropies)
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be a torch.Tensor (layers, heads), got {type(theta).__name__}.")
    L, B, H, T = e.shape
    if theta.shape != (L, H):
        raise InputError(
            f"theta must have shape (layers, heads) = {(L, H)}, got {tuple(theta.shape)}; one "
            "threshold weight per attention head of every layer."
        )
    if theta.device != e.device:
        raise InputError(
            f"device mismatch: entropies are on {e.device} but theta is on {theta.device}; move "
            "theta with theta.to(entropies.device)."
        )
    max_entropy = _check_max_entropy(max_entropy)
    gamma = _check_nonneg(gamma, "gamma", "0.2")
    check_choice(mode, "mode", MODES)
    check_choice(gate, "gate", GATES)
    qm = None if query_mask is None else _check_query_mask(query_mask, B, H, T, e.device)
    with no_autocast():
        return _band_penalty(e, theta, max_entropy, gamma, mode, gate, qm).to(e.dtype)


def _band_penalty(e: torch.Tensor, theta: torch.Tensor, max_entropy: float, gamma: float, mode: str,
                  gate: str, qm: torch.Tensor | None) -> torch.Tensor:
    """The penalty of :func:`entropy_band_penalty`, unchecked, in float32 for half entropies."""
    wd = working_dtype(e.dtype)
    e, theta = e.to(wd), theta.to(wd)
    L, B, H, T = e.shape
    w = torch.ones_like(e)
    if qm is not None:
        w = torch.broadcast_to(qm.to(e.dtype), (B, H, T)).expand(L, B, H, T)
    if mode == "per_head":
        e = ((e * w).sum((1, 3)) / w.sum((1, 3)).clamp_min(1)).unsqueeze(1).unsqueeze(-1)  # (L,1,H,1)
        w = torch.ones_like(e)
    tau = (theta * max_entropy)[:, None, :, None]  # Alg. 1 line 11
    m = gamma * max_entropy  # Alg. 1 line 3
    delta = e - tau
    if gate == "hard":
        pen = torch.where(delta.abs() > m, delta.square(), torch.zeros_like(delta))
    else:
        pen = (delta.abs() - m).clamp_min(0).square()
    return (pen * w).sum((1, 3)).mean()  # Σ_{b,i}, then 1/H Σ_h and 1/L Σ_l


class EntropyBandRegularizer(nn.Module):
    r"""λ · entropy band penalty with learnable per-(layer, head) thresholds θ.

    ``forward(attentions)`` takes the per-layer attention probabilities (a list of
    ``(B, H, T, T)`` tensors, e.g. ``outputs.attentions``) and returns
    :math:`\lambda\,\mathcal L_{\rm ent}`; add it to the task loss. θ is a parameter of this
    module: include it in the optimiser (the authors use no weight decay for it).

    Args:
        num_layers, num_heads: shape of θ.
        lam: λ (paper: 1e-5 CodeParrot, 5e-5 Languini, with ``mode="per_position"``).
        gamma: tolerance fraction γ (paper 0.2; appendix code 0.1).
        max_entropy: :math:`E_{\max}`; None uses ``log(#keys)`` of the attention passed in.
        mode, gate: see :func:`entropy_band_penalty`.
        theta_init: initial θ, a fraction of :math:`E_{\max}` in ``[0, 1]`` (not stated by
            the authors; learned values end in 0.2–0.5).
        eps: passed to :func:`attention_entropy` (reference code: 1e-9; default exact).
        check_inputs: check in :meth:`forward` that the attentions are probabilities (finite,
            nonnegative, rows summing to 1 within ``atol``, no mass on masked keys). The
            check syncs with the device; switch it off in training loops once the model is
            wired up (``check_inputs=False``).
        atol: tolerance on row sums (default: 1e-2 half, 1e-4 float32, 1e-6 float64).

    All options are validated here, at construction; metadata checks (number of layers,
    shapes) always run in :meth:`forward`.

    Mixed precision: float16/bfloat16 attentions (a model under ``torch.autocast``) give
    entropies and the penalty in float32 (autocast off; θ is not rounded), and the result
    is returned in the attentions' dtype.

    Padding: pass ``query_mask`` (bool ``(B, T)``, True = real token) so padded queries
    contribute nothing, :math:`P_{lh} = \sum_{b,i} m_{bi}\,\mathrm{pen}(E_{bhi} - \tau_{lh})`;
    masked keys already carry zero probability and hence zero entropy.

    Distributed data parallel (DDP): θ is a parameter like any other, so its gradient is
    all-reduced only if this module is **inside the wrapped model**. Register it as a
    submodule before wrapping (``model.entropy_reg = reg``; ``ddp = DistributedDataParallel(model)``)
    and either

    * compute the penalty in the model's ``forward`` and return it with the logits (works
      with every DDP option, including ``find_unused_parameters=True``), or
    * call ``ddp.module.entropy_reg(outputs.attentions)`` after the forward, as with a
      Hugging Face model. This needs ``find_unused_parameters=False`` (DDP's default; the
      Hugging Face ``Trainer`` turns it on unless ``ddp_find_unused_parameters=False``):
      with ``True`` DDP marks θ unused during the forward and the backward then fails with
      "Expected to mark a variable ready only once".

    A regulariser kept outside the wrapped model gets a different θ gradient on every rank
    (each sees its own batch), and θ drifts apart across ranks. The per-position penalty
    sums over the rank's own batch, so with DDP's gradient averaging the effective weight
    is λ / world_size of a single process that sees the whole global batch. Tested with
    two gloo processes in ``tests/regularizers/test_ddp_entropy_guided.py``.

    Hugging Face: build the model with ``attn_implementation="eager"`` (the fused SDPA and
    flash kernels never form the probabilities) and call
    ``reg(model(ids, attention_mask=am, output_attentions=True).attentions,
    query_mask=am.bool())``.

    Shape:
        attentions: list of ``L`` tensors ``(B, H, T, S)``; output: scalar.

    Examples:
        >>> reg = EntropyBandRegularizer(2, 4, lam=1e-3)
        >>> attn = [torch.softmax(torch.randn(3, 4, 8, 8), -1) for _ in range(2)]
        >>> reg(attn).ndim
        0
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        *,
        lam: float = 1e-5,
        gamma: float = 0.2,
        max_entropy: float | None = None,
        mode: Literal["per_position", "per_head"] = "per_position",
        gate: Literal["hard", "smooth"] = "hard",
        theta_init: float = 0.5,
        eps: float = 0.0,
        check_inputs: bool = True,
        atol: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_count(num_layers, "num_layers")
        check_count(num_heads, "num_heads")
        self.lam = _check_nonneg(lam, "lam", "1e-5")
        self.gamma = _check_nonneg(gamma, "gamma", "0.2")
        self.max_entropy = None if max_entropy is None else _check_max_entropy(max_entropy)
        self.mode = check_choice(mode, "mode", MODES)
        self.gate = check_choice(gate, "gate", GATES)
        theta_init = check_finite_real(theta_init, "theta_init", example="theta_init=0.5")
        if not 0.0 <= theta_init <= 1.0:
            raise InputError(
                f"theta_init must lie in [0, 1] (the threshold is theta * max_entropy, a fraction "
                f"of the largest entropy), got {theta_init!r}; use e.g. theta_init=0.5."
            )
        self.eps = _check_nonneg(eps, "eps", "0.0")
        self.check_inputs = bool(check_inputs)
        self.atol = None if atol is None else check_positive(atol, "atol", example="atol=1e-4")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}.")
        self.theta = nn.Parameter(
            torch.full((num_layers, num_heads), theta_init, device=device, dtype=dtype)
        )

    @reject_meta
    def penalty(
        self,
        attentions: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`\mathcal L_{\rm ent}` without λ.

        Args:
            attentions: one ``(B, H, T, S)`` tensor of attention probabilities per layer.
            mask: optional bool key mask broadcastable to ``(B, H, T, S)`` (True = valid
                key), passed to :func:`attention_entropy`; masked keys carry no entropy.
            query_mask: optional bool ``(B, T)`` or ``(B, H, T)`` (True = real query). A
                padded query's row is dropped from the sum
                :math:`\sum_{b,i} m_{bi}\,\mathrm{pen}(E_{bhi}-\tau_{lh})` (and from the mean
                in ``"per_head"`` mode), so padding changes neither the penalty nor the
                gradients of the real rows. Padded rows are also skipped by the input checks
                (they may hold anything, e.g. zeros or uniform weights from a fully masked row). With a Hugging Face batch pass
                ``attention_mask.bool()``; with a KV cache, the last ``T`` columns
                (``attention_mask[:, -T:]``).
        """
        if isinstance(attentions, torch.Tensor):
            attentions = list(attentions) if attentions.ndim == 5 else [attentions]
        elif not isinstance(attentions, Sequence):
            raise TypeError(
                "attentions must be a list of (B, H, T, S) tensors (one per layer) or a "
                f"(L, B, H, T, S) tensor, got {type(attentions).__name__}."
            )
        if len(attentions) != self.theta.shape[0]:
            raise InputError(
                f"got attentions for {len(attentions)} layers but theta has {self.theta.shape[0]}; "
                "pass one (B, H, T, S) tensor per layer."
            )
        if query_mask is not None and isinstance(attentions[0], torch.Tensor) and attentions[0].ndim == 4:
            # padded rows are ignored entirely: zero them and mask all their keys, so neither
            # the input checks nor the gradients see whatever the model left there
            B, H, T, _ = attentions[0].shape
            rows = _check_query_mask(query_mask, B, H, T, attentions[0].device)[..., None]
            attentions = [a.masked_fill(~rows, 0.0) if isinstance(a, torch.Tensor) else a for a in attentions]
            if mask is None:
                mask = rows
            elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
                try:
                    mask = mask & rows
                except RuntimeError:
                    pass  # attention_entropy reports the mask that does not fit
        # entropies in float32 for half attentions (not rounded back before the band)
        ents = [
            _attention_entropy(a, mask, False, self.eps, self.check_inputs, self.atol, f"attentions[{i}]")
            for i, a in enumerate(attentions)
        ]
        if ents[0].shape[1] != self.theta.shape[1]:
            raise InputError(
                f"attentions have {ents[0].shape[1]} heads but theta has {self.theta.shape[1]} "
                "(num_heads); build the regularizer with the model's number of heads."
            )
        if self.max_entropy is None:
            if attentions[0].shape[-1] < 2:
                raise InputError(
                    f"attentions have {attentions[0].shape[-1]} key(s), so log(#keys) = 0 cannot "
                    "be the largest entropy; pass max_entropy=... explicitly."
                )
            e_max = math.log(attentions[0].shape[-1])
        else:
            e_max = self.max_entropy
        pen = entropy_band_penalty(
            ents, self.theta, e_max, self.gamma, mode=self.mode, gate=self.gate, query_mask=query_mask
        )
        return pen.to(attentions[0].dtype)  # the attentions' dtype (computed in float32 for half)

    def forward(
        self,
        attentions: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`\lambda\,\mathcal L_{\rm ent}` of the attention probabilities of every layer.

        See :meth:`penalty` for ``mask`` (keys) and ``query_mask`` (padded queries).
        """
        return self.lam * self.penalty(attentions, mask, query_mask)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, gamma={self.gamma}, mode={self.mode!r}, gate={self.gate!r}"


@reject_meta
def temperature_softmax(
    logits: torch.Tensor, temperature: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Softmax over keys with per-head, per-query temperatures: :math:`\mathrm{softmax}_j(s_{ij}/t_{hi})`.

    Args:
        logits: ``(B, H, T, S)`` scaled scores :math:`q_i\cdot k_j/\sqrt{d}`.
        temperature: positive tensor broadcastable as ``(H, T)`` (or ``(B, H, T)``).
        mask: bool, True = valid key (broadcastable to ``logits``).

    Returns:
        The attention ``(B, H, T, S)`` in the dtype of ``logits``. Float16/bfloat16 logits are
        divided and normalised in float32 (autocast off; the temperature is not rounded to
        half precision) and the result is cast back.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating torch.Tensor (B, H, T, S), got {got}.")
    if logits.ndim != 4:
        raise InputError(
            f"logits must be (batch, heads, queries, keys), got shape {tuple(logits.shape)}; for "
            "one head use logits.unsqueeze(1)."
        )
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(
            f"temperature must be a torch.Tensor broadcastable to (heads, queries), got "
            f"{type(temperature).__name__}; e.g. torch.ones(H, T)."
        )
    B, H, T, _ = logits.shape
    try:
        torch.broadcast_shapes(temperature.shape, (B, H, T))
    except RuntimeError:
        raise InputError(
            f"temperature of shape {tuple(temperature.shape)} does not broadcast to (batch, heads, "
            f"queries) = {(B, H, T)}; pass one temperature per head and query, shape ({H}, {T})."
        ) from None
    wd = working_dtype(torch.promote_types(logits.dtype, temperature.dtype))
    with no_autocast():
        s = logits.to(wd) / temperature.to(wd).unsqueeze(-1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        # a fully masked row gives zeros; a NaN logit still propagates (it is not a masked key)
        a = torch.softmax(s, dim=-1).masked_fill((s == -math.inf).all(-1, keepdim=True), 0.0)
    return a.to(logits.dtype)


class LearnableSoftmaxTemperature(nn.Module):
    r"""Learnable temperature :math:`t\in\mathbb R_{>0}^{H\times T}` for attention softmax.

    ``forward(logits, mask=None, offset=0)`` returns

    .. math::

        a_{bhij} = \mathrm{softmax}_j\big(s_{bhij} / t_{h,\,o_b + i}\big), \qquad
        i = 0, \dots, T_q - 1,

    i.e. query row ``i`` uses the temperature of its **absolute position** :math:`o + i`.
    Without a cache :math:`o = 0` and rows ``0 .. T_q-1`` of ``t`` are used. With a KV cache
    the new queries sit after the cached ones: pass ``offset`` = the number of cached
    positions (``S - T_q`` for causal self-attention with ``S`` keys), an ``int`` or a
    long tensor ``(B,)`` when the rows of a batch hold different numbers of cached tokens.
    Decoding token by token with ``offset`` then gives exactly the rows of the
    full-sequence computation. With ``per_position=False`` there is one temperature per
    head and ``offset`` has no effect (it is still checked against ``max_len``).

    Parametrisation: ``"log"`` stores :math:`\log t` (always positive); ``"direct"`` stores
    :math:`t` itself and clamps it at ``min_temperature``. The paper initialises "the
    temperature" to 1e-2 / 1e-1; taken literally this multiplies logits by 100, so we suspect the
    stored quantity is a reparameterisation (unverified); the default here is ``t = 1``
    (plain softmax at init).

    Args:
        num_heads: H.
        max_len: maximum number of query positions T (the largest ``offset + T_q``).
        init: initial temperature.
        per_position: one temperature per (head, position) (paper) or per head.
        parametrization: ``"log"`` or ``"direct"``.
        min_temperature: floor for ``"direct"``.

    Examples:
        >>> temp = LearnableSoftmaxTemperature(2, 8)
        >>> s = torch.randn(1, 2, 8, 8)
        >>> causal = torch.ones(8, 8, dtype=torch.bool).tril()
        >>> full = temp(s, causal)
        >>> last = temp(s[:, :, -1:], causal[-1:], offset=7)  # one new query after 7 cached
        >>> torch.allclose(last, full[:, :, -1:])
        True
    """

    def __init__(
        self,
        num_heads: int,
        max_len: int,
        *,
        init: float = 1.0,
        per_position: bool = True,
        parametrization: Literal["log", "direct"] = "log",
        min_temperature: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_count(num_heads, "num_heads")
        check_count(max_len, "max_len")
        init = check_positive(init, "init", example="init=1.0")
        check_choice(parametrization, "parametrization", ("log", "direct"))
        min_temperature = check_positive(min_temperature, "min_temperature", example="min_temperature=1e-3")
        self.parametrization = parametrization
        self.min_temperature = min_temperature
        self.max_len = max_len
        T = max_len if per_position else 1
        v = math.log(init) if parametrization == "log" else init
        self.raw = nn.Parameter(torch.full((num_heads, T), v, device=device, dtype=dtype))

    @property
    def temperature(self) -> torch.Tensor:
        if self.parametrization == "log":
            return self.raw.exp()
        return self.raw.clamp_min(self.min_temperature)

    def _check_offset(self, offset: int | torch.Tensor, B: int, Tq: int, device: torch.device) -> None:
        if isinstance(offset, torch.Tensor):
            if offset.dtype in (torch.bool,) or offset.is_floating_point() or offset.is_complex():
                raise TypeError(
                    f"offset must be an int or an integer tensor (batch,), got a {offset.dtype} tensor; "
                    "use offset.long()."
                )
            if offset.shape != (B,) or offset.device != device:
                raise InputError(
                    f"an offset tensor must have shape (batch,) = {(B,)} on {device}, got "
                    f"{tuple(offset.shape)} on {offset.device}; one number of cached positions per row."
                )
            lo, hi = int(offset.min()), int(offset.max())
        else:
            if isinstance(offset, bool) or not isinstance(offset, Integral):
                raise TypeError(
                    f"offset must be an int (number of cached positions) or a long tensor (batch,), "
                    f"got {type(offset).__name__}."
                )
            lo = hi = offset
        if lo < 0:
            raise InputError(f"offset must be >= 0 (the number of cached positions), got {lo}.")
        if hi + Tq > self.max_len:
            raise InputError(
                f"query positions reach {hi + Tq - 1} (offset {hi} + {Tq} queries) but max_len="
                f"{self.max_len} gives positions 0..{self.max_len - 1}; increase max_len."
            )

    @reject_meta
    def forward(
        self, logits: torch.Tensor, mask: torch.Tensor | None = None, offset: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Temperature softmax of ``logits`` ``(B, H, T_q, S)``; see the class docstring for ``offset``."""
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            return temperature_softmax(logits, self.temperature, mask)  # raises the right error
        B, _, Tq, _ = logits.shape
        if Tq > self.max_len:
            raise InputError(f"got {Tq} query positions but max_len={self.max_len}; increase max_len.")
        self._check_offset(offset, B, Tq, logits.device)
        t = self.temperature
        if t.shape[1] == 1:  # one temperature per head
            t = t.expand(-1, Tq)
        elif isinstance(offset, torch.Tensor):  # per row: t[h, o_b + i] -> (B, H, Tq)
            pos = offset[:, None] + torch.arange(Tq, device=offset.device)
            t = t[:, pos].permute(1, 0, 2)
        else:
            t = t[:, offset : offset + Tq]
        return temperature_softmax(logits, t, mask)


class WeightNormLinear(nn.Linear):
    r"""Linear layer with weight normalisation :math:`W_{o\cdot} = g_o\, v_{o\cdot}/\lVert v_{o\cdot}\rVert`.

    Salimans & Kingma (2016); used by Jha & Reagen (2025) instead of LayerNorm.
    ``weight`` holds :math:`v`; ``g`` is initialised to the row norms so the layer starts equal to
    a plain ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.g = nn.Parameter(self.weight.detach().norm(dim=1).clone())

    def normalized_weight(self) -> torch.Tensor:
        return self.weight * (self.g / self.weight.norm(dim=1)).unsqueeze(1)

    @reject_meta
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_layer_input(input, self.weight, "WeightNormLinear", features=self.in_features)
        return F.linear(input, self.normalized_weight(), self.bias)


class SpectralNormLinear(nn.Linear):
    r"""Linear layer with spectral normalisation :math:`\hat W = W/\sigma(W)` (Miyato et al. 2018).

    σ by one power-iteration step per training forward with a persistent ``u`` buffer (no
    learnable scale; see :class:`~entrokit.regularizers.SigmaReparamLinear` for the learnable-γ
    version).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        s0, u0 = _svd_init(self.weight)
        self.register_buffer("u", u0.clone())
        self.register_buffer("sigma", s0.clone().reshape(()))

    @reject_meta
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_layer_input(input, self.weight, "SpectralNormLinear", features=self.in_features)
        sigma, u = spectral_norm_step(self.weight, self.u, update=self.training)
        if self.training:
            with torch.no_grad():
                self.u.copy_(u)
                self.sigma.copy_(sigma.detach())
        return F.linear(input, self.weight / sigma, self.bias)


class ScaledFFN(nn.Module):
    r"""Learnable FFN scaling: :math:`X_{\rm out} = \beta\,X + \alpha^{-1}\,\mathrm{FFN}(X)` (paper, scaled-FFN).

    Replaces the residual + LayerNorm around an FFN; ``alpha`` and ``beta`` are one learnable
    scalar each for this layer (the paper's :math:`\alpha,\beta\in\mathbb R^L` over L layers).

    Args:
        ffn: the feed-forward module (e.g. a fused ``nn.Linear(d, d)`` in a softmax-only model).
        alpha_init, beta_init: initial scales.
    """

    def __init__(self, ffn: nn.Module, *, alpha_init: float = 1.0, beta_init: float = 1.0) -> None:
        super().__init__()
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"ffn must be an nn.Module, got {type(ffn).__name__}.")
        alpha_init = check_positive(alpha_init, "alpha_init (it divides the FFN output)", example="alpha_init=1.0")
        beta_init = check_finite_real(beta_init, "beta_init", example="beta_init=1.0")
        self.ffn = ffn
        p = next(ffn.parameters(), None)
        kw = {} if p is None else {"device": p.device, "dtype": p.dtype}
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init), **kw))
        self.beta = nn.Parameter(torch.tensor(float(beta_init), **kw))

    @reject_meta
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.alpha, "ScaledFFN")
        return self.beta * x + self.ffn(x) / self.alpha
