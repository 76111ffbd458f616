r"""Attention entropy and a recorder that measures it inside any model.

For one attention row :math:`a_{i\cdot}` over the valid keys :math:`\mathcal V_i`,

.. math::

    H_i = -\sum_{j \in \mathcal V_i} a_{ij} \log a_{ij}, \qquad
    0 \le H_i \le \log |\mathcal V_i| ,

in nats, with :math:`0 \log 0 = 0` taken exactly (no ``log(a + 1e-10)`` bias). The
normalised entropy is :math:`H_i / \log |\mathcal V_i|` (0 when a row has at most one valid
key). Per-head entropy is the mean of :math:`H_i` over batch and valid queries (Zhai et
al., 2023; Jha & Reagen, 2025).

Failure modes (Jha & Reagen 2025): heads are binned into quartiles
of a reference entropy. **Entropy collapse** = heads in the bottom quartile ``[0, ref/4)``
(near-zero entropy, a sign of training instability); **entropic overload** = heads in the
top quartile ``[3 ref/4, ref]`` (near-uniform attention). The paper's reference is the
largest observed head entropy; ``reference="log_n"`` uses the normalised entropy instead,
i.e. ``ref = log(#valid keys)`` row by row.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit._optional import require
from entrokit._validation import (
    _check_float_ndim,
    _check_unit_rows,
    default_atol,
    no_autocast,
    reject_meta,
    working_dtype,
)

__all__ = [
    "attention_entropy",
    "head_entropy_stats",
    "classify_heads",
    "quartile_fractions",
    "plot_heatmap",
    "AttentionEntropyRecorder",
]


def _check_attn(attn: Any, name: str = "attn") -> torch.Tensor:
    if not isinstance(attn, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of attention weights, got {type(attn).__name__}."
        )
    _check_float_ndim(attn, name, 4, layout="have 4 dims (batch, heads, queries, keys)",
                      hint=f"for a single head use {name}.unsqueeze(1), for a single example {name}.unsqueeze(0).")
    if attn.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(attn.shape)}).")
    return attn


def _check_mask(mask: Any, attn: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = key is valid), got {mask.dtype}; for an additive "
            "float mask (0 / -inf) pass mask=(float_mask == 0)."
        )
    try:
        mask = torch.broadcast_to(mask, attn.shape)
    except RuntimeError:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to attn shape {tuple(attn.shape)}; "
            "a key-padding mask (batch, keys) must be reshaped to (batch, 1, 1, keys)."
        ) from None
    if mask.device != attn.device:
        raise InputError(
            f"mask is on {mask.device} but attn is on {attn.device}; use mask.to(attn.device)."
        )
    return mask


def _neg_xlogx(a: torch.Tensor) -> torch.Tensor:
    # -a log a with 0 log 0 = 0; the `where` keeps the gradient finite (0) at a = 0
    pos = a > 0
    safe = torch.where(pos, a, torch.ones_like(a))
    return torch.where(pos, -a * torch.log(safe), torch.zeros_like(a))


@reject_meta
def attention_entropy(
    attn: torch.Tensor,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 0.0,
    *,
    check_inputs: bool = True,
    atol: float | None = None,
    name: str = "attn",
) -> torch.Tensor:
    r"""Shannon entropy of every attention row.

    .. math::

        H_{bhi} = -\sum_{j:\,m_{bhij}} a_{bhij} \log a_{bhij}, \qquad
        \tilde H_{bhi} = H_{bhi} / \log n_{bhi},\; n_{bhi} = \#\{j : m_{bhij}\}.

    Args:
        attn: attention weights ``(batch, heads, queries, keys)``; each row sums to 1 over
            its valid keys.
        mask: optional bool tensor broadcastable to ``attn``; ``True`` marks a valid key (the
            :func:`torch.nn.functional.scaled_dot_product_attention` convention). Masked keys
            contribute nothing and are not counted in :math:`n`. Key padding
            ``(batch, keys)`` → ``mask[:, None, None, :]``; causal → ``torch.ones(T, T).tril().bool()``.
        normalize: divide by :math:`\log n` of each row, giving values in ``[0, 1]`` (rows with
            ``n <= 1`` get 0).
        eps: 0 (default) computes :math:`0\log 0 = 0` exactly. ``eps > 0`` computes
            :math:`-\sum a\log(a+\varepsilon)` as in the entropy-guided reference code
            (``eps=1e-9`` there), slightly biased downwards.
        check_inputs: run value checks (finite, nonnegative, rows sum to 1, no mass on masked
            keys). They sync with the device; switch off in training loops.
        atol: tolerance on row sums (default 1e-4 float32, 1e-6 float64, 1e-2 half).
        name: how error messages call ``attn``.

    Returns:
        Tensor ``(batch, heads, queries)`` of entropies in nats (or normalised), in the dtype of
        ``attn`` (float16/bfloat16 weights are summed in float32, autocast off). Fully masked
        rows give 0. The gradient at exact zeros is taken as 0 (the true derivative of
        :math:`-a\log a` is :math:`+\infty` there).

    Raises:
        TypeError: ``attn`` or ``mask`` has the wrong type/dtype.
        InputError: wrong number of dims, negative/NaN weights, rows not summing to 1.

    Examples:
        >>> a = torch.full((1, 1, 2, 4), 0.25)
        >>> attention_entropy(a)  # log 4
        tensor([[[1.3863, 1.3863]]])
    """
    return _attention_entropy(attn, mask, normalize, eps, check_inputs, atol, name).to(attn.dtype)


def _attention_entropy(attn: Any, mask: Any, normalize: bool, eps: Any, check_inputs: bool, atol: Any,
                       name: str) -> torch.Tensor:
    """:func:`attention_entropy` in the working dtype (float32 for float16/bfloat16 weights)."""
    attn = _check_attn(attn, name)
    if mask is not None:
        mask = _check_mask(mask, attn)
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"eps must be a finite float >= 0, got {eps!r}; use eps=0.0 for the exact entropy.")
    a = attn if mask is None else attn.masked_fill(~mask, 0.0)
    if check_inputs:
        if not torch.isfinite(attn).all():
            raise InputError(
                f"{name} contains NaN or inf; attention weights must be finite probabilities."
            )
        if (attn < 0).any():
            raise InputError(
                f"{name} has negative entries (min {attn.min().item():.3g}); pass softmax "
                "probabilities, not logits (apply .softmax(-1) first)."
            )
        if atol is not None and (isinstance(atol, bool) or not isinstance(atol, Real) or not atol >= 0):
            raise InputError(f"atol must be a number >= 0 or None (the dtype's default), got {atol!r}; e.g. atol=1e-4.")
        tol = default_atol(attn.dtype) if atol is None else float(atol)
        if mask is not None:
            leak = attn.masked_fill(mask, 0.0).sum(-1)
            if (leak > tol).any():
                raise InputError(
                    f"{name} puts mass {leak.max().item():.3g} on masked keys; the mask must "
                    "mark every key that received weight as valid (True = valid)."
                )
        _check_unit_rows(a.sum(-1), tol, name, over="valid keys", valid=None if mask is None else mask.any(-1),
                         fix=f"Pass probabilities (softmax over the key axis, last dim), normalise with "
                             f"{name} / {name}.sum(-1, keepdim=True), or raise atol.")
    with no_autocast():  # float16/bfloat16 weights: the sum over keys runs in float32
        a = a.to(working_dtype(a.dtype))
        if eps > 0:
            h = -(a * torch.log(a + eps)).sum(-1)
        else:
            h = _neg_xlogx(a).sum(-1)
        if normalize:
            n = torch.full_like(h, attn.shape[-1]) if mask is None else mask.sum(-1).to(h.dtype)
            logn = torch.log(n.clamp_min(1.0))
            h = torch.where(n > 1, h / torch.where(n > 1, logn, torch.ones_like(logn)), torch.zeros_like(h))
    return h


def head_entropy_stats(
    attn: torch.Tensor, mask: torch.Tensor | None = None, *, check_inputs: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head sums needed to average entropies over batch and valid queries.

    Returns:
        ``(sum_entropy, sum_normalized_entropy, n_rows)``, each of shape ``(heads,)``; rows
        without any valid key are excluded. Divide the sums by ``n_rows`` for the means.
    """
    attn = _check_attn(attn)
    h = attention_entropy(attn, mask, check_inputs=check_inputs)
    hn = attention_entropy(attn, mask, normalize=True, check_inputs=False)
    if mask is None:
        rows = torch.ones_like(h)
    else:
        rows = _check_mask(mask, attn).any(-1).to(h.dtype)
    return (h * rows).sum((0, 2)), (hn * rows).sum((0, 2)), rows.sum((0, 2))


def _reference_scores(
    entropy: torch.Tensor, normalized: torch.Tensor | None, reference: str
) -> torch.Tensor:
    for name, t in (("entropy", entropy), ("normalized", normalized)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"{name} must be a floating torch.Tensor (layers, heads) of mean head entropies, "
                f"got {got}; use AttentionEntropyRecorder.entropy or head_entropy_stats."
            )
        if t.device.type == "meta":
            raise InputError(f"{name} is a meta tensor (shape and dtype only, no values); pass the recorded entropies.")
        if t.numel() == 0:
            raise InputError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one head's entropy.")
    if normalized is not None and normalized.shape != entropy.shape:
        raise InputError(
            f"normalized must have the shape of entropy {tuple(entropy.shape)}, got "
            f"{tuple(normalized.shape)}; pass both from the same recorder."
        )
    if reference == "max_observed":
        m = torch.nan_to_num(entropy, nan=-math.inf).max()
        if not torch.isfinite(m) or m <= 0:
            return torch.zeros_like(entropy)
        return entropy / m
    if reference == "log_n":
        if normalized is None:
            raise InputError("reference='log_n' needs normalized entropies; pass normalized=...")
        return normalized
    raise InputError(f"reference must be 'max_observed' or 'log_n', got {reference!r}.")


def classify_heads(
    entropy: torch.Tensor,
    normalized: torch.Tensor | None = None,
    *,
    reference: Literal["max_observed", "log_n"] = "max_observed",
    collapse_below: float = 0.25,
    overload_above: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flag collapsed and overloaded heads (quartile bins of Jha & Reagen 2025).

    Args:
        entropy: mean head entropies ``(layers, heads)`` in nats (NaN = absent head).
        normalized: mean normalised entropies ``(layers, heads)``; needed for ``"log_n"``.
        reference: ``"max_observed"`` (paper): score = entropy / max head entropy;
            ``"log_n"``: score = entropy / log(#valid keys).
        collapse_below: score below which a head counts as collapsed (bottom quartile).
        overload_above: score at or above which a head counts as overloaded (top quartile).

    Returns:
        ``(collapsed, overloaded)`` bool tensors ``(layers, heads)``.
    """
    if not 0 <= collapse_below < overload_above <= 1:
        raise InputError(
            f"need 0 <= collapse_below < overload_above <= 1, got {collapse_below}, {overload_above}."
        )
    s = _reference_scores(entropy, normalized, reference)
    present = ~torch.isnan(s)
    return present & (s < collapse_below), present & (s >= overload_above)


def quartile_fractions(
    entropy: torch.Tensor,
    normalized: torch.Tensor | None = None,
    *,
    reference: Literal["max_observed", "log_n"] = "max_observed",
) -> torch.Tensor:
    """Fraction of heads in each quartile ``[0,1/4), [1/4,1/2), [1/2,3/4), [3/4,1]`` of the reference.

    This is the statistic the paper reports (e.g. 45 % of softmax-only heads in the top quartile).
    """
    s = _reference_scores(entropy, normalized, reference)
    s = s[~torch.isnan(s)]
    idx = (s * 4).floor().clamp(0, 3).long()
    return torch.bincount(idx, minlength=4).to(s.dtype) / max(s.numel(), 1)


def plot_heatmap(
    entropy: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    ax: Any = None,
    title: str = "mean attention entropy (nats)",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    annotate: bool = True,
) -> Any:
    """Layer × head heat map of entropies; returns the matplotlib ``Figure``.

    Needs matplotlib (the ``cli`` extra: ``pip install 'entrokit[cli]'``).

    Args:
        entropy: ``(layers, heads)`` tensor.
        names: row labels (layer names).
        ax: optional axes to draw into (its figure is returned).
        vmax: colour scale top, e.g. ``math.log(T)``.
        annotate: write the value in each cell.
    """
    Figure = require("matplotlib.figure", "plot_heatmap").Figure

    e = entropy.detach().to("cpu", torch.float64)
    if e.ndim != 2:
        raise InputError(f"entropy must be (layers, heads), got shape {tuple(e.shape)}.")
    if ax is None:
        fig = Figure(figsize=(1.0 + 0.6 * e.shape[1], 1.0 + 0.5 * e.shape[0]), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    im = ax.imshow(e.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(e.shape[1]))
    ax.set_yticks(range(e.shape[0]))
    if names is not None:
        ax.set_yticklabels(list(names), fontsize=7)
    if annotate:
        for i in range(e.shape[0]):
            for j in range(e.shape[1]):
                v = e[i, j].item()
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


# ----------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------

Extractor = Callable[[nn.Module, tuple, Any], Any]
_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)


def _valid_from_additive_or_bool(m: torch.Tensor, true_means_valid: bool) -> torch.Tensor:
    if m.dtype == torch.bool:
        return m if true_means_valid else ~m
    return m != -math.inf


def _sdpa_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # recompute softmax(q k^T * scale + mask) as documented for F.scaled_dot_product_attention
    q, k = query.detach(), key.detach()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * s
    L, S = q.shape[-2], k.shape[-2]
    valid = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        valid = valid.tril()
    bias = torch.zeros_like(logits)
    if attn_mask is not None:
        valid = valid & _valid_from_additive_or_bool(attn_mask, True)
        if attn_mask.dtype != torch.bool:
            bias = bias + attn_mask.to(logits.dtype).masked_fill(attn_mask == -math.inf, 0.0)
    valid = torch.broadcast_to(valid, logits.shape)
    logits = (logits + bias).masked_fill(~valid, -math.inf)
    w = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return w, valid


def _hf_probs(output: Any) -> torch.Tensor | None:
    # a Hugging Face attention module returns (attn_output, attn_weights, ...): the weights are
    # the first 4-D floating tensor after the output (None unless attn_implementation="eager")
    if not isinstance(output, (tuple, list)):
        return None
    for o in output[1:]:
        if isinstance(o, torch.Tensor) and o.ndim == 4 and o.is_floating_point():
            return o
    return None


def _hf_valid_keys(attention_mask: Any, probs: torch.Tensor, site: str) -> torch.Tensor | None:
    # the 4-D mask a Hugging Face attention module receives: additive (0 = keep, dtype min or
    # -inf = masked) or bool (True = keep), shape (B or 1, 1 or H, T_q, S)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4:
        return None
    m = attention_mask[..., : probs.shape[-1]]
    if m.dtype == torch.bool:
        valid = m
    else:
        valid = m > torch.finfo(m.dtype).min / 2
    try:
        return torch.broadcast_to(valid, probs.shape)
    except RuntimeError:
        raise InputError(
            f"attention site {site!r}: its attention_mask of shape {tuple(attention_mask.shape)} does "
            f"not broadcast to the attention weights {tuple(probs.shape)}; register the module with "
            "an extractor that returns (probs, valid_mask) instead."
        ) from None


class _Site:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sum_h: torch.Tensor | None = None
        self.sum_hn: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.calls = 0

    def add(self, attn: torch.Tensor, mask: torch.Tensor | None) -> None:
        a = attn.detach()
        if a.ndim == 3:  # unbatched (heads, queries, keys)
            a = a.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0) if mask.ndim == 3 else mask
        if mask is not None:
            mask = torch.broadcast_to(mask, a.shape)
        a = a.to(torch.float64) if a.dtype in (torch.float16, torch.bfloat16) else a
        sh, shn, rows = head_entropy_stats(a, mask, check_inputs=False)
        if self.sum_h is None:
            self.sum_h, self.sum_hn, self.rows = sh, shn, rows
        elif self.sum_h.shape != sh.shape:
            raise InputError(
                f"attention site {self.name!r} changed its number of heads "
                f"({self.sum_h.shape[0]} -> {sh.shape[0]}); call recorder.reset() between models."
            )
        else:
            self.sum_h, self.sum_hn, self.rows = self.sum_h + sh, self.sum_hn + shn, self.rows + rows
        self.calls += 1


class AttentionEntropyRecorder:
    """Record per-layer, per-head mean attention entropy of any model.

    Three kinds of attention are captured while the recorder is active (``with`` block, or
    ``attach()`` … ``detach()``):

    * ``nn.MultiheadAttention``: a forward pre-hook forces ``need_weights=True,
      average_attn_weights=False`` and the forward hook restores what the caller asked for
      (``None`` weights or head-averaged weights), so the model's outputs are unchanged. The
      key-padding / attention masks passed to the module define the valid keys. Note: asking
      for weights disables PyTorch's fused fast path while recording.
    * ``torch.nn.functional.scaled_dot_product_attention``: replaced inside the context by a
      wrapper that calls the original and recomputes ``softmax(q kᵀ·scale + mask)`` from its
      arguments (pre-dropout weights). The call is attributed to the innermost running
      submodule of ``model``. Code that imported the function by name
      (``from torch.nn.functional import scaled_dot_product_attention``) is not seen; register
      it as a custom site instead.
    * custom modules: ``register(module, extractor)`` where ``extractor(module, inputs, output)``
      returns the probabilities ``(batch, heads, queries, keys)`` or ``(probs, valid_mask)``;
      with ``extractor=None`` the recorder reads ``module.<attr>`` (default ``attention_probs``)
      after each forward.
    * Hugging Face ``transformers`` models: :meth:`register_hf` hooks every attention module
      (e.g. ``GPT2Attention``) and reads the weights it returns. The model must use
      ``attn_implementation="eager"``: the SDPA and flash kernels never form the
      probabilities. Valid keys come from the 4-D mask the module receives (causal and
      padding); padded queries are dropped when the model is called with
      ``attention_mask=`` as a keyword.

    Entropies are averaged over batch and valid queries and accumulated over every recorded
    call until :meth:`reset`.

    Args:
        model: the model to inspect.
        mha: hook every ``nn.MultiheadAttention`` inside ``model``.
        sdpa: patch ``F.scaled_dot_product_attention`` while active.

    Examples:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 8)
        >>> with AttentionEntropyRecorder(mha) as rec:
        ...     _ = mha(x, x, x, need_weights=False)
        >>> rec.entropy.shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, *, mha: bool = True, sdpa: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.mha = mha
        self.sdpa = sdpa
        self._custom: list[tuple[nn.Module, Extractor | None, str | None, str]] = []
        self._sites: dict[str, _Site] = {}
        self._handles: list[Any] = []
        self._stack: list[str] = []
        self._orig_sdpa: Any = None
        self._sdpa_counts: dict[str, int] = {}
        self._hf: list[tuple[nn.Module, str]] = []
        self._hf_query_mask: torch.Tensor | None = None
        self.active = False

    # -- registration -----------------------------------------------------------------
    def register(
        self,
        module: nn.Module,
        extractor: Extractor | None = None,
        *,
        name: str | None = None,
        attr: str = "attention_probs",
    ) -> AttentionEntropyRecorder:
        """Add a custom attention module; returns ``self`` for chaining."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}.")
        if extractor is not None and not callable(extractor):
            raise TypeError("extractor must be callable (module, inputs, output) -> probs.")
        self._custom.append((module, extractor, name, attr))
        if self.active:
            self._hook_custom(module, extractor, name, attr)
        return self

    def register_hf(self, modules: Sequence[nn.Module] | None = None) -> AttentionEntropyRecorder:
        """Record the attention modules of a Hugging Face ``transformers`` model; returns ``self``.

        Every module whose class name ends in ``Attention`` and that contains no other such
        module (``GPT2Attention``, ``LlamaAttention``, ``BertSelfAttention``, ...) becomes a
        site named by its path (``transformer.h.0.attn``), unless ``modules`` lists them
        (``nn.MultiheadAttention`` is left to its own hook).
        The module's second output holds the attention weights ``(B, H, T_q, S)`` when the
        model runs the eager attention: build it with ``attn_implementation="eager"``
        (``GPT2Config(..., attn_implementation="eager")`` or
        ``from_pretrained(..., attn_implementation="eager")``). Needs ``transformers>=4.53``
        (tested with 4.53.3 and 5.25.0): earlier versions return the weights only with
        ``output_attentions=True`` and keep the causal mask out of the mask the attention
        module receives, so the normalised entropy would count future keys.

        Masks: keys are valid where the module's 4-D ``attention_mask`` is 0 (additive) or
        True (bool), so the causal mask and key padding count in the normalised entropy. If
        the model is called with ``attention_mask=`` (``(B, S)``, 1 = real token) as a
        keyword, query rows whose token is padding are dropped; with a KV cache the last
        ``T_q`` columns are the queries. Record in ``eval()`` mode or with
        ``attn_pdrop=0``: in training mode the returned weights are **after** attention
        dropout (rows no longer sum to 1).

        Examples:
            >>> import torch
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64,
            ...                  attn_implementation="eager")
            >>> model = GPT2LMHeadModel(cfg).eval()
            >>> with AttentionEntropyRecorder(model).register_hf() as rec:
            ...     _ = model(torch.randint(64, (2, 10)))
            >>> rec.entropy.shape
            torch.Size([2, 2])
        """
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl is not None and impl != "eager":
            raise InputError(
                f"the model runs attn_implementation={impl!r}, which never forms the attention "
                "probabilities; build it with attn_implementation='eager' (e.g. "
                "GPT2Config(..., attn_implementation='eager') or "
                "from_pretrained(..., attn_implementation='eager'))."
            )
        if modules is None:
            found = [
                (n, m) for n, m in self.model.named_modules()
                if type(m).__name__.endswith("Attention") and not isinstance(m, nn.MultiheadAttention)
                and not any(type(c).__name__.endswith("Attention") for c in m.modules() if c is not m)
            ]
            if not found:
                raise InputError(
                    f"no attention module (class name ending in 'Attention') in {type(self.model).__name__}; "
                    "pass the modules explicitly: register_hf(modules=[...])."
                )
        else:
            if isinstance(modules, nn.Module) or not all(isinstance(m, nn.Module) for m in modules):
                raise TypeError("modules must be a list of nn.Module (the attention modules) or None.")
            found = [(self._name_of(m), m) for m in modules]
        first = not self._hf
        for name, m in found:
            self._hf.append((m, name or type(m).__name__))
            if self.active:
                self._hook_hf(m, name or type(m).__name__)
        if self.active and first:
            self._hook_hf_query_mask()
        return self

    def _name_of(self, module: nn.Module) -> str:
        for n, m in self.model.named_modules():
            if m is module:
                return n or type(module).__name__
        return type(module).__name__

    def _site(self, name: str) -> _Site:
        if name not in self._sites:
            self._sites[name] = _Site(name)
        return self._sites[name]

    # -- hooks --------------------------------------------------------------------------
    def _hook_custom(self, module, extractor, name, attr) -> None:
        site_name = name or self._name_of(module)

        def post(mod, inputs, output):
            if extractor is None:
                probs = getattr(mod, attr, None)
                if probs is None:
                    raise InputError(
                        f"module {site_name!r} has no attribute {attr!r} after forward; store the "
                        f"attention probabilities in self.{attr} or pass an extractor."
                    )
            else:
                probs = extractor(mod, inputs, output)
            mask = None
            if isinstance(probs, tuple):
                probs, mask = probs
            self._site(site_name).add(probs, mask)

        self._handles.append(module.register_forward_hook(post))

    def _hook_hf_query_mask(self) -> None:
        def pre(mod, args, kwargs):
            am = kwargs.get("attention_mask")
            self._hf_query_mask = am.bool() if isinstance(am, torch.Tensor) and am.ndim == 2 else None

        self._handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))

    def _hook_hf(self, module: nn.Module, name: str) -> None:
        def post(mod, args, kwargs, output):
            probs = _hf_probs(output)
            if probs is None:
                raise InputError(
                    f"attention module {name!r} returned no attention weights; build the model with "
                    "attn_implementation='eager' (and use transformers>=4.53)."
                )
            valid = _hf_valid_keys(kwargs.get("attention_mask"), probs, name)
            qm = self._hf_query_mask
            if qm is not None:
                B, _, Tq, _ = probs.shape
                if qm.shape[0] != B or qm.shape[1] < Tq:
                    raise InputError(
                        f"attention site {name!r}: the model's attention_mask has shape "
                        f"{tuple(qm.shape)} but the attention weights have batch {B} and {Tq} "
                        "queries; pass a (batch, past + new tokens) padding mask."
                    )
                q = qm[:, -Tq:].to(probs.device)[:, None, :, None]
                valid = q.expand(probs.shape) if valid is None else valid & q
            self._site(name).add(probs, valid)

        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _hook_mha(self, name: str, module: nn.MultiheadAttention) -> None:
        state: dict[str, Any] = {}

        def pre(mod, args, kwargs):
            b = _MHA_SIG.bind(mod, *args, **kwargs)
            b.apply_defaults()
            ba = dict(b.arguments)
            ba.pop("self")
            state["need"], state["avg"] = ba["need_weights"], ba["average_attn_weights"]
            state["kpm"], state["am"] = ba["key_padding_mask"], ba["attn_mask"]
            state["batched"] = ba["query"].dim() == 3
            state["bf"] = mod.batch_first
            ba["need_weights"], ba["average_attn_weights"] = True, False
            q, k, v = ba.pop("query"), ba.pop("key"), ba.pop("value")
            return (q, k, v), ba

        def post(mod, inputs, output):
            out, w = output
            valid = None
            if w is not None:
                wb = w if w.dim() == 4 else w.unsqueeze(0)  # (B, H, L, S)
                valid = torch.ones(wb.shape, dtype=torch.bool, device=wb.device)
                am, kpm = state["am"], state["kpm"]
                if am is not None:
                    v = _valid_from_additive_or_bool(am, False)  # MHA: bool True = masked
                    v = v.view(wb.shape[0], wb.shape[1], *v.shape[-2:]) if v.dim() == 3 else v
                    valid = valid & v
                if kpm is not None:
                    v = _valid_from_additive_or_bool(kpm, False)
                    v = v.view(wb.shape[0], 1, 1, -1) if v.dim() == 2 else v.view(1, 1, 1, -1)
                    valid = valid & v
                self._site(name).add(wb, valid)
            if not state["need"]:
                return out, None
            if state["avg"] and w is not None:
                return out, w.mean(dim=-3)
            return out, w

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post))

    def _hook_stack(self) -> None:
        for n, m in self.model.named_modules():
            label = n or type(m).__name__

            def pre(mod, args, _label=label):
                if not self._stack:  # outermost forward: SDPA call numbering restarts
                    self._sdpa_counts.clear()
                self._stack.append(_label)

            def post(mod, args, out):
                if self._stack:
                    self._stack.pop()

            self._handles.append(m.register_forward_pre_hook(pre))
            self._handles.append(m.register_forward_hook(post, always_call=True))

    def _patched_sdpa(self, orig):
        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
            out = orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)
            if self._stack:
                owner = self._stack[-1]
                cnt = self._sdpa_counts.get(owner, 0)
                self._sdpa_counts[owner] = cnt + 1
                label = owner if cnt == 0 else f"{owner}#{cnt}"
                with torch.no_grad():
                    w, valid = _sdpa_weights(query, key, attn_mask, is_causal, scale, enable_gqa)
                if w.dim() == 3:
                    w, valid = w.unsqueeze(1), valid.unsqueeze(1)
                elif w.dim() > 4:
                    w, valid = w.flatten(0, -4), valid.flatten(0, -4)
                self._site(label).add(w, valid)
            return out

        return sdpa

    # -- lifecycle ------------------------------------------------------------------------
    def attach(self) -> AttentionEntropyRecorder:
        """Install the hooks (and the SDPA patch); returns ``self``."""
        if self.active:
            return self
        if self.mha:
            for n, m in self.model.named_modules():
                if isinstance(m, nn.MultiheadAttention):
                    self._hook_mha(n or "mha", m)
        for module, extractor, name, attr in self._custom:
            self._hook_custom(module, extractor, name, attr)
        for module, name in self._hf:
            self._hook_hf(module, name)
        if self._hf:
            self._hook_hf_query_mask()
        if self.sdpa:
            self._hook_stack()
            self._orig_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._patched_sdpa(self._orig_sdpa)
        self.active = True
        return self

    def detach(self) -> None:
        """Remove every hook and restore ``F.scaled_dot_product_attention``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._hf_query_mask = None
        if self._orig_sdpa is not None:
            F.scaled_dot_product_attention = self._orig_sdpa
            self._orig_sdpa = None
        self.active = False

    def __enter__(self) -> AttentionEntropyRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily stop recording (e.g. around a training step)."""
        was = self.active
        self.detach()
        try:
            yield
        finally:
            if was:
                self.attach()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._sites.clear()
        self._sdpa_counts.clear()

    # -- results ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Site names in the order they were first seen (rows of :attr:`entropy`)."""
        return list(self._sites)

    def _stack_means(self, which: str) -> torch.Tensor:
        if not self._sites:
            raise InputError(
                "nothing recorded: run a forward pass inside the recorder context; check that the "
                "model uses nn.MultiheadAttention, F.scaled_dot_product_attention or registered sites."
            )
        H = max(s.rows.shape[0] for s in self._sites.values())
        ref = next(iter(self._sites.values())).sum_h
        out = torch.full((len(self._sites), H), math.nan, dtype=ref.dtype, device=ref.device)
        for i, s in enumerate(self._sites.values()):
            tot = s.sum_h if which == "h" else s.sum_hn
            out[i, : tot.shape[0]] = tot / s.rows.clamp_min(1)
        return out

    @property
    def entropy(self) -> torch.Tensor:
        """Mean entropy in nats, ``(layers, heads)`` (NaN where a layer has fewer heads)."""
        return self._stack_means("h")

    @property
    def normalized_entropy(self) -> torch.Tensor:
        """Mean of row entropies divided by log(#valid keys), ``(layers, heads)``."""
        return self._stack_means("hn")

    def detect(
        self,
        *,
        reference: Literal["max_observed", "log_n"] = "max_observed",
        collapse_below: float = 0.25,
        overload_above: float = 0.75,
    ) -> dict[str, list[tuple[str, int]]]:
        """``{"collapse": [(layer name, head), ...], "overload": [...]}``; see :func:`classify_heads`."""
        col, ovl = classify_heads(
            self.entropy, self.normalized_entropy, reference=reference,
            collapse_below=collapse_below, overload_above=overload_above,
        )
        names = self.names
        return {
            "collapse": [(names[i], j) for i, j in col.nonzero().tolist()],
            "overload": [(names[i], j) for i, j in ovl.nonzero().tolist()],
        }

    def plot_heatmap(self, *, normalized: bool = False, **kwargs: Any) -> Any:
        """Heat map of :attr:`entropy` (or :attr:`normalized_entropy`); returns a ``Figure``."""
        e = self.normalized_entropy if normalized else self.entropy
        if normalized:
            kwargs.setdefault("vmax", 1.0)
            kwargs.setdefault("title", "normalised attention entropy")
        return plot_heatmap(e, self.names, **kwargs)
