r"""Top-entropy token masks and the one loss aggregation of :mod:`entrokit.rl`.

* :func:`top_entropy_mask` keeps the tokens whose entropy is at or above the
  :math:`(1-\rho)`-quantile of the valid tokens' entropies: over the whole batch (the "80/20"
  rule of *Beyond the 80/20 Rule*, TRL's ``top_entropy_quantile``), optionally over every
  rank of a process group with an exact quantile, or within each sequence (SIREN's peak-entropy
  mask, ``mask_ratio = 1 - rho``).
* :func:`aggregate` reduces a (batch, time) tensor of per-token values with verl's
  ``loss_agg_mode`` names. A controller and the loss it steers should read the statistic
  through the same call.

Quantiles use linear interpolation between order statistics, as :func:`torch.quantile`:
position :math:`q (n-1)` in the sorted valid values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit.rl.entropy import _as_fraction

__all__ = ["AGG_MODES", "aggregate", "distributed_quantile", "top_entropy_mask"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_values(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_meta:
        raise InputError(f"{name} is a meta tensor (no values); pass a real tensor.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}; use {name}.float().")
    if x.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one token.")
    return x


def _check_token_mask(mask: Any, x: torch.Tensor, *, allow_float: bool, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.is_meta:
        raise InputError("mask is a meta tensor (no values); pass a real tensor.")
    if tuple(mask.shape) != tuple(x.shape):
        raise InputError(
            f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(x.shape)}; "
            "pass one flag per token."
        )
    if mask.device != x.device:
        raise InputError(f"mask is on {mask.device} but {name} is on {x.device}; move it.")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        if not allow_float:
            raise TypeError(f"mask must be boolean here, got {mask.dtype}; use mask.bool().")
        return mask
    if mask.is_complex():
        raise TypeError(f"mask must be boolean or real, got {mask.dtype}.")
    return mask != 0


def _group_of(group: Any):
    if group is None or group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "a global quantile was asked for (group=...), but torch.distributed is not "
            "initialised; call torch.distributed.init_process_group first or pass group=None."
        )
    return dist.group.WORLD if group is True or group == "world" else group


def _sorted_quantile(sorted_vals: torch.Tensor, counts: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated q-quantile of each row's first ``counts`` entries (sorted ascending).

    Rows with count 0 give +inf (so that ``x >= quantile`` selects nothing).
    """
    pos = (counts - 1).clamp(min=0).to(sorted_vals.dtype) * q
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (counts - 1).clamp(min=0))
    frac = pos - lo.to(pos.dtype)
    v_lo = sorted_vals.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = sorted_vals.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = v_lo + (v_hi - v_lo) * frac
    return torch.where(counts > 0, out, torch.full_like(out, float("inf")))


def distributed_quantile(values: torch.Tensor, q: float, *, group: Any = "world") -> torch.Tensor:
    r"""Exact ``q``-quantile of the union of ``values`` over the ranks of ``group``.

    Every rank passes its own 1-D tensor (any length, possibly empty); the counts are
    all-gathered first, then the values padded to the largest count, so padding never enters
    the order statistics (unlike a sentinel value). All ranks return the same 0-d tensor, equal
    to ``torch.quantile(torch.cat(all values), q)`` (linear interpolation). Memory: the gathered
    values, world x the largest count.
    """
    import torch.distributed as dist

    q = _as_fraction(q, "q", low_open=False, high_closed=True)
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise InputError("values must be a 1-D floating tensor of this rank's valid values.")
    if values.is_meta:
        raise InputError("values is a meta tensor (no values); pass a real tensor.")
    g = _group_of(group)
    if g is None:
        gathered = values
    else:
        world = dist.get_world_size(g)
        n = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=g)
        counts_t = torch.cat(counts)
        n_max = int(counts_t.max())  # one sync: the buffer size must be known on the host
        buf = values.new_full((n_max,), float("inf"))
        buf[: values.numel()] = values
        bufs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(bufs, buf, group=g)
        keep = torch.arange(n_max, device=values.device)[None, :] < counts_t[:, None]
        gathered = torch.stack(bufs)[keep]
    if gathered.numel() == 0:
        raise InputError("values is empty on every rank: the quantile of an empty set is undefined.")
    if bool(torch.isnan(gathered).any()):  # after the gather: every rank raises
        raise InputError("values contains NaN (on this or another rank); the quantile is undefined.")
    s = torch.sort(gathered).values
    return _sorted_quantile(s, torch.tensor(s.numel(), device=s.device), q)


def top_entropy_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    top_fraction: float = 0.2,
    per: str = "batch",
    group: Any = None,
) -> torch.Tensor:
    r"""Boolean mask of the highest-entropy valid tokens.

    A valid token is kept when :math:`H \ge Q_{1-\rho}`, the :math:`(1-\rho)`-quantile of the
    valid entropies (``rho = top_fraction``; ties at the quantile are kept, so slightly more
    than a fraction :math:`\rho` can be kept):

    * ``per="batch"``: one quantile over every valid token (TRL's ``get_high_entropy_mask``,
      the 80/20 rule with :math:`\rho = 0.2`); with ``group`` (``"world"``, ``True`` or a
      ``ProcessGroup``) over every rank's valid tokens, exactly (:func:`distributed_quantile`).
    * ``per="sequence"``: one quantile per row of a (batch, time) tensor (SIREN's
      ``mask_by_quantile`` with ``mask_ratio = 1 - rho``); computed for all rows at once with
      one row sort. A row with no valid token keeps nothing.

    ``top_fraction = 1`` keeps every valid token. A NaN entropy at a valid token raises
    :class:`~entrokit.InputError` (it has no place in the order); invalid tokens may hold anything.

    Parameters
    ----------
    entropy : Tensor
        Per-token entropies (any shape for ``per="batch"``; (batch, time) for ``"sequence"``).
    mask : bool Tensor, same shape, optional
        Valid tokens (the response mask). Default: all valid.
    top_fraction : float in (0, 1]
    per : {"batch", "sequence"}
    group : None, "world", True or a ProcessGroup
        Only with ``per="batch"``.

    Returns
    -------
    bool Tensor, the shape of ``entropy``
    """
    entropy = _check_values(entropy, "entropy")
    valid = _check_token_mask(mask, entropy, allow_float=False, name="entropy")
    rho = _as_fraction(top_fraction, "top_fraction")
    if per not in ("batch", "sequence"):
        raise InputError(f"per must be 'batch' or 'sequence', got {per!r}.")
    q = 1.0 - rho
    if per == "batch":
        vals = entropy.detach()[valid]
        if _group_of(group) is None:
            _check_no_nan(vals)
            if vals.numel() == 0:
                return torch.zeros_like(valid)
            s = torch.sort(vals).values
            thr = _sorted_quantile(s, torch.tensor(s.numel(), device=s.device), q)
        else:
            thr = distributed_quantile(vals, q, group=group)
        return valid & (entropy.detach() >= thr)
    if group is not None:
        raise InputError("group= applies to per='batch' only; a sequence lives on one rank.")
    if entropy.dim() != 2:
        raise InputError(
            f"per='sequence' needs a (batch, time) tensor, got shape {tuple(entropy.shape)}."
        )
    _check_no_nan(entropy.detach()[valid])
    e = entropy.detach().masked_fill(~valid, float("inf"))  # invalid entries sort last
    s = torch.sort(e, dim=-1).values
    thr = _sorted_quantile(s, valid.sum(-1), q)
    return valid & (entropy.detach() >= thr.unsqueeze(-1))


def _check_no_nan(vals: torch.Tensor) -> None:
    if bool(torch.isnan(vals).any()):
        raise InputError(
            "entropy contains NaN at a valid (mask=True) token; expected finite entropies. Find where "
            "it came from (a NaN logit?) or mark the token invalid in mask."
        )


def _check_normalizer(normalizer: Any, like: torch.Tensor) -> torch.Tensor | float | None:
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise InputError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}.")
        return normalizer.to(like.dtype).reshape(())
    if isinstance(normalizer, bool):
        raise TypeError("normalizer must be a positive number, got a bool.")
    try:
        v = float(normalizer)
    except (TypeError, ValueError):
        raise TypeError(
            f"normalizer must be a positive number, got {type(normalizer).__name__} {normalizer!r}."
        ) from None
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"normalizer must be a finite number > 0, got {normalizer!r}.")
    return v


def aggregate(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    *,
    normalizer: Any = None,
    horizon: int | None = None,
) -> torch.Tensor:
    r"""Reduce per-token values ``x`` (batch, time) to a scalar, verl's ``agg_loss`` modes.

    With :math:`m` the mask, :math:`n_b = \sum_t m_{bt}` and :math:`\mathcal{B} = \{b : n_b > 0\}`:

    * ``token-mean``: :math:`\sum_{bt} m x / N`, :math:`N = \sum_{bt} m` by default;
    * ``seq-mean-token-mean``: :math:`\sum_{b\in\mathcal{B}} (\sum_t m x / n_b) / N_s`;
    * ``seq-mean-token-sum``: :math:`\sum_{b\in\mathcal{B}} \sum_t m x / N_s`;
    * ``seq-mean-token-sum-norm`` (Dr. GRPO): ``seq-mean-token-sum`` divided by ``horizon``
      (default ``x.shape[-1]``; pass a constant to keep the scale fixed through training),

    with :math:`N_s = |\mathcal{B}|` by default. ``normalizer`` replaces :math:`N` (tokens) or
    :math:`N_s` (sequences): for gradient accumulation pass the count over *all* micro-batches
    of the optimizer step, so that the micro-batch losses sum to the full-batch loss; under DDP
    (gradients averaged over ranks) pass the global count divided by the world size, like verl's
    ``dp_size`` factor. An empty selection gives 0 (not NaN). ``mask`` may be boolean, 0/1
    integers or float weights.
    """
    x = _check_values(x, "x")
    if mode not in AGG_MODES:
        raise InputError(f"mode must be one of {', '.join(map(repr, AGG_MODES))}; got {mode!r}.")
    m = _check_token_mask(mask, x, allow_float=True, name="x").to(x.dtype)
    norm = _check_normalizer(normalizer, x)
    if mode != "token-mean" and x.dim() != 2:
        raise InputError(f"mode {mode!r} needs a (batch, time) tensor, got shape {tuple(x.shape)}.")
    xm = torch.where(m != 0, x * m, torch.zeros_like(x))  # masked NaN/inf never leak in
    if mode == "token-mean":
        den = m.sum().clamp(min=1e-30) if norm is None else norm
        return xm.sum() / den
    n_tok = m.sum(-1)
    has = n_tok > 0
    seq = xm.sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / n_tok.clamp(min=1e-30)
    seq = torch.where(has, seq, torch.zeros_like(seq))
    den = has.sum().clamp(min=1).to(x.dtype) if norm is None else norm
    out = seq.sum() / den
    if mode == "seq-mean-token-sum-norm":
        h = x.shape[-1] if horizon is None else horizon
        if isinstance(h, bool) or not isinstance(h, (int, float)) and not hasattr(h, "__index__"):
            raise TypeError(f"horizon must be a positive number, got {type(h).__name__}.")
        h = float(h)
        if not (math.isfinite(h) and h > 0):
            raise InputError(f"horizon must be a finite number > 0, got {horizon!r}.")
        out = out / h
    return out
