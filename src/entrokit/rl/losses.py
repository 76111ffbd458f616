r"""Policy losses and entropy interventions for RL fine-tuning of language models.

Every loss takes per-token tensors of shape ``[B, T]`` (B responses, T positions) and a
``mask`` ``[B, T]`` of valid response tokens, reduces with
:func:`entrokit.rl.masks.aggregate` (verl's ``loss_agg_mode`` names, and an explicit
``normalizer`` for gradient accumulation), and returns ``(loss, stats)``: a scalar tensor
and a dict of detached scalar tensors for logging. Because the controllers of
:mod:`entrokit.rl.controllers` are fed the same ``aggregate`` of the entropy, a controller
and the loss it steers read the same statistic.

Notation: :math:`\ell_t = \log\pi_\theta(a_t)`, :math:`\ell^{old}_t` the behaviour policy's,
:math:`r_t = e^{\ell_t - \ell^{old}_t}`, :math:`A_t` the advantage (``[B]`` or ``[B, 1]``
broadcast to the sequence), :math:`H_t` the token entropy
(:func:`entrokit.rl.token_entropy`). The identity behind Clip-Cov, KL-Cov and STEER is the
first-order entropy change under a logit step, :math:`\Delta H \approx
-\mathrm{Cov}_{a\sim\pi}(\log\pi_a, \delta z_a)` (Cui et al. 2025, arXiv 2505.22617).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._stateful import StatefulModule, integer, optional, real
from entrokit._validation import check_float_vector, check_generator
from entrokit.rl.masks import aggregate

__all__ = [
    "COV_PRESETS",
    "EntropyHistory",
    "aepo_reinforce_loss",
    "aepo_select_positives",
    "anchored_entropy_loss",
    "clip_cov_policy_loss",
    "clipped_surrogate",
    "corridor_entropy_loss",
    "entropy_bonus",
    "kl_cov_policy_loss",
    "phase_weight",
    "sampled_entropy",
    "steer_token_weights",
]

Stats = dict[str, torch.Tensor]

#: Named settings of Clip-Cov and KL-Cov. ``"official"`` is the Entropy-Mechanism recipe
#: (PRIME-RL/Entropy-Mechanism-of-RL): KL-Cov's ``k_percent=0.2`` is a *percent*, so 0.2 % of
#: the valid tokens with ``ppo_kl_coef=1``; Clip-Cov's ``recipe/dapo/7b_clip_cov.sh`` runs
#: with ``clip_ratio_low = clip_ratio_high = 1`` (PPO clipping almost off). ``"verl"`` is
#: verl's defaults: ``kl_cov_ratio=2e-4`` (0.02 %) with ``ppo_kl_coef=0.1`` in the yaml (so
#: 10x fewer tokens and a 10x weaker penalty than the official recipe), and the actor's
#: ``clip_ratio=0.2``. Both draw Clip-Cov tokens with ``clip_cov_ratio=2e-4`` from the band
#: ``1 < cov < 5``.
COV_PRESETS: dict[str, dict[str, Any]] = {
    "official": {
        "clip_cov_ratio": 2e-4, "clip_cov_bounds": (1.0, 5.0), "clip_low": 1.0, "clip_high": 1.0,
        "kl_cov_ratio": 2e-3, "kl_coef": 1.0,
    },
    "verl": {
        "clip_cov_ratio": 2e-4, "clip_cov_bounds": (1.0, 5.0), "clip_low": 0.2, "clip_high": 0.2,
        "kl_cov_ratio": 2e-4, "kl_coef": 0.1,
    },
}

_FRACTION = real(lo=0.0, hi=1.0, lo_open=True, example="ratio=2e-3")
_NONNEG = real(lo=0.0, example="coef=1e-3")


# --------------------------------------------------------------------------------------
# Boundary checks (metadata always; values with check_inputs)
# --------------------------------------------------------------------------------------


def _check_mask(mask: Any) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, T] of bools, got {type(mask).__name__}.")
    if mask.dim() != 2:
        raise InputError(
            f"mask must have shape [B, T] (responses x positions), got {tuple(mask.shape)}; "
            "add a batch axis with mask[None] for a single response."
        )
    if mask.numel() == 0:
        raise InputError(f"the batch is empty (mask shape {tuple(mask.shape)}); pass at least one token.")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be boolean (or 0/1 integers), got {mask.dtype}; use mask.bool().")
        mask = mask != 0
    return mask


def _check_tokens(x: Any, name: str, mask: torch.Tensor, *, per_sequence: bool = False) -> torch.Tensor:
    """A floating ``[B, T]`` tensor on the mask's device (``[B]``/``[B, 1]`` if ``per_sequence``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T], got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}; use {name}.float().")
    b, t = mask.shape
    if per_sequence and tuple(x.shape) in ((b,), (b, 1)):
        x = x.reshape(b, 1).expand(b, t)
    if tuple(x.shape) != (b, t):
        also = f", [{b}] or [{b}, 1]" if per_sequence else ""
        raise InputError(
            f"{name} must have the mask's shape [{b}, {t}]{also}, got {tuple(x.shape)}; pass one "
            "value per response token (pad to the mask)."
        )
    if x.device != mask.device:
        raise InputError(f"{name} is on {x.device} but mask is on {mask.device}; move it with {name}.to(mask.device).")
    return x


def _check_finite(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Value check (one device sync): valid tokens must be finite (padding may hold anything)."""
    oks = torch.stack([(torch.isfinite(v) | ~mask).all() for v in tensors.values()])
    if not bool(oks.all()):
        name = list(tensors)[int((~oks).nonzero()[0])]
        raise InputError(
            f"{name} contains NaN or inf at a valid (mask=True) token; expected finite values. The "
            "policy has probably diverged (lower the learning rate or clip gradients), or the mask "
            "misses a padded position."
        )


def _inputs(mask: Any, check_inputs: bool, per_sequence: tuple[str, ...] = (), **tensors: Any):
    mask = _check_mask(mask)
    out = {n: _check_tokens(v, n, mask, per_sequence=n in per_sequence) for n, v in tensors.items()}
    if check_inputs:
        _check_finite(mask, **out)
    # padding never reaches the arithmetic: no NaN from it in the value or the gradient
    out = {n: torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device)) for n, v in out.items()}
    return mask, out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return aggregate(x.detach().to(torch.float32 if x.dtype != torch.float64 else x.dtype), mask, "token-mean")


def _clip_range(clip_low: Any, clip_high: Any) -> tuple[float, float]:
    lo = real(lo=0.0, hi=1.0, example="clip_low=0.2")(clip_low, "clip_low")
    hi = lo if clip_high is None else real(lo=0.0, example="clip_high=0.28")(clip_high, "clip_high")
    return lo, hi


def _preset(preset: Any) -> Mapping[str, Any]:
    if preset not in COV_PRESETS:
        raise InputError(f"preset must be one of {sorted(COV_PRESETS)}, got {preset!r}.")
    return COV_PRESETS[preset]


# --------------------------------------------------------------------------------------
# PPO / GRPO
# --------------------------------------------------------------------------------------


def _surrogate_terms(logp, old_logp, adv, lo, hi):
    ratio = torch.exp(logp - old_logp)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - lo, 1.0 + hi)
    return ratio, pg1, pg2


def _policy_inputs(logp, old_logp, advantages, mask, check_inputs, **extra):
    """The checked ``(mask, tensors)`` of a policy loss: ``[B, T]`` log-probabilities, advantages
    per token or per response, and any ``extra`` per-token tensors."""
    return _inputs(mask, check_inputs, ("advantages",), logp=logp, old_logp=old_logp, advantages=advantages,
                   **extra)


def _policy_result(pg, mask, mode, normalizer, t, **stats):
    r"""``(aggregate(pg), stats)`` of a policy loss; ``approx_kl`` (mean of
    :math:`\ell^{old} - \ell` over valid tokens) is added to the stats."""
    stats["approx_kl"] = _masked_mean(t["old_logp"] - t["logp"], mask)
    return aggregate(pg, mask, mode, normalizer=normalizer), stats


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""PPO/GRPO clipped surrogate with asymmetric clip-high and dual clip.

    Per token (Schulman et al. 2017, Eq. 7; DAPO's clip-higher; dual clip of Ye et al. 2020):

    .. math::

        L_t = \max\bigl(-A_t r_t,\ -A_t\,\mathrm{clip}(r_t, 1-\varepsilon_{lo}, 1+\varepsilon_{hi})\bigr),
        \qquad L_t \leftarrow \min(L_t, -c A_t)\ \text{ where } A_t < 0,

    optionally times detached ``token_weights`` (e.g. :func:`steer_token_weights`), then
    ``aggregate(L, mask, mode, normalizer)``.

    Args:
        logp, old_logp: ``[B, T]`` log-probabilities of the sampled tokens.
        advantages: ``[B, T]``, or ``[B]`` / ``[B, 1]`` (one per response, GRPO).
        mask: ``[B, T]`` valid tokens.
        clip_low: :math:`\varepsilon_{lo} \in [0, 1]` (0.2).
        clip_high: :math:`\varepsilon_{hi} \ge 0`; ``None`` means ``clip_low`` (DAPO: 0.28).
        dual_clip: :math:`c > 1` (verl ``clip_ratio_c`` 3.0) or ``None`` (off).
        token_weights: ``[B, T]`` weights, treated as constants.
        mode, normalizer: see :func:`entrokit.rl.masks.aggregate`.
        check_inputs: refuse NaN/inf at valid tokens (one device sync).

    Returns:
        ``(loss, stats)`` with stats ``clip_frac`` (share of valid tokens where the clipped
        term is active), ``dual_clip_frac``, ``approx_kl`` (mean of
        :math:`\ell^{old} - \ell`) and ``ratio`` (mean).
    """
    lo, hi = _clip_range(clip_low, clip_high)
    c = optional(real(lo=1.0, lo_open=True, example="dual_clip=3.0"))(dual_clip, "dual_clip")
    extra = {} if token_weights is None else {"token_weights": token_weights}
    mask, t = _policy_inputs(logp, old_logp, advantages, mask, check_inputs, **extra)
    ratio, pg1, pg2 = _surrogate_terms(t["logp"], t["old_logp"], t["advantages"], lo, hi)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if c is not None:
        pg3 = -t["advantages"] * c
        dual = (t["advantages"] < 0) & (pg > pg3)
        pg = torch.where(t["advantages"] < 0, torch.minimum(pg, pg3), pg)
    if token_weights is not None:
        pg = pg * t["token_weights"].detach()
    return _policy_result(pg, mask, mode, normalizer, t, clip_frac=_masked_mean((pg2 > pg1).float(), mask),
                          dual_clip_frac=_masked_mean(dual.float(), mask), ratio=_masked_mean(ratio, mask))


# --------------------------------------------------------------------------------------
# Entropy terms
# --------------------------------------------------------------------------------------


def _coef(coef: Any, mask: torch.Tensor) -> torch.Tensor | float:
    """A real >= 0, or a tensor of per-response ([B]) or per-token ([B, T]) coefficients."""
    if isinstance(coef, torch.Tensor) and coef.numel() != 1:
        c = _check_tokens(coef, "coef", mask, per_sequence=True)
        return c.detach()
    return _NONNEG(coef, "coef")


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: Any,
    *,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""Entropy bonus :math:`-c\cdot\mathrm{agg}(H)` (verl, OpenRLHF, TRL).

    ``coef`` is a number (e.g. ``controller.value``), or per-response ``[B]`` / per-token
    ``[B, T]`` coefficients (:class:`~entrokit.rl.controllers.DifficultyAwareCoef`): then the
    loss is :math:`-\mathrm{agg}(c_t H_t)`.

    Returns:
        ``(loss, {"entropy": agg(H)})``; the logged entropy is the same ``aggregate`` the
        controller should be fed.
    """
    mask, t = _inputs(mask, check_inputs, entropy=entropy)
    h = t["entropy"]
    c = _coef(coef, mask)
    loss = -aggregate(h * c, mask, mode, normalizer=normalizer)
    return loss, {"entropy": aggregate(h.detach(), mask, mode)}


def anchored_entropy_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    anchor: Any,
    coef: float = 0.005,
    *,
    mode: str = "seq-mean-token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""SIREN's self-anchored regulariser :math:`c\,(\mathrm{agg}(H) - H_{anchor})^2`.

    Linn3a/siren ``dp_actor.py``: the selected entropy (``mask`` should already combine the
    response mask with SIREN's peak-entropy mask, :func:`entrokit.rl.masks.top_entropy_mask`
    per sequence, and ``entropy`` be the top-p entropy, ``token_entropy(...,
    support=TopP(0.8))``) is aggregated seq-mean-token-mean, and the anchor is the value of
    step 1 (:class:`~entrokit.rl.controllers.AnchoredTargetController` keeps it as its
    ``anchor`` buffer). Default ``coef`` 0.005 as in SIREN's script.

    Returns:
        ``(loss, {"entropy": agg(H), "deviation": agg(H) - anchor})``.
    """
    a = real(example="anchor=1.2")(anchor, "anchor")
    c = _NONNEG(coef, "coef")
    mask, t = _inputs(mask, check_inputs, entropy=entropy)
    h = aggregate(t["entropy"], mask, mode, normalizer=normalizer)
    dev = h - a
    return c * dev * dev, {"entropy": h.detach(), "deviation": dev.detach()}


class EntropyHistory(StatefulModule):
    r"""Mean of all past per-step entropies, :math:`\bar H_W` of EPO's smoothing penalty.

    ``update(measured)`` adds one step's entropy (a number; averaged over ranks under
    ``torch.distributed``); ``mean`` is the mean over every step so far (``None`` before the
    first). State: ``total`` and ``count`` buffers (float64), so it resumes from a
    ``state_dict``. A NaN or infinite measurement raises and leaves the history unchanged.
    """

    state_name = "entropy history"

    def _setup(self) -> None:
        self.add_state("total", torch.zeros((), dtype=torch.float64), sync="mean")
        self.add_state("count", torch.zeros((), dtype=torch.float64))

    @property
    def mean(self) -> float | None:
        n = float(self.count)
        return None if n == 0 else float(self.total) / n

    def update(self, measured: Any) -> float:
        """Add one step's entropy; return the new mean."""
        from entrokit.rl.controllers import _measurement

        self.update_state(_measurement(measured).to(self.total.device), what="the values passed as measured")
        return float(self.mean)

    def _measure(self, measured: torch.Tensor) -> Mapping[str, Any]:
        return {"total": measured}

    def _write(self, stats: Mapping[str, Any]) -> None:
        self.total += stats["total"]
        self.count += 1


def phase_weight(step: Any, total_steps: Any, gamma: float = 1.0) -> float:
    r"""EPO's phase weight :math:`\beta_k = 1 + \exp(-\gamma k / k_{mid})`, :math:`k_{mid} = \lfloor K/2\rfloor`.

    Paper text (no official code was found): the smoothing penalty weighs twice as much at
    the start (:math:`\beta_0 = 2`) and decays toward 1.

    Args:
        step: :math:`k \ge 0`.
        total_steps: :math:`K \ge 2`.
        gamma: :math:`\gamma > 0`.
    """
    k = integer(minimum=0, example="step=10")(step, "step")
    big_k = integer(minimum=2, example="total_steps=200")(total_steps, "total_steps")
    g = real(lo=0.0, lo_open=True, example="gamma=1.0")(gamma, "gamma")
    return 1.0 + math.exp(-g * k / (big_k // 2))


def corridor_entropy_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    history_mean: float | None,
    *,
    coef: float,
    alpha: float,
    kappa: tuple[float, float],
    beta: float = 1.0,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""EPO's entropy term with its smoothing corridor (paper text; no official code found).

    .. math::

        L = -\lambda\bigl[\mathrm{agg}(H) - \beta_k\,\alpha\,\mathrm{agg}\bigl(
            [\kappa_l \bar H_W - H_t]_+ + [H_t - \kappa_r \bar H_W]_+\bigr)\bigr],

    where :math:`\bar H_W` is the mean of all past per-step entropies
    (:class:`EntropyHistory`) and :math:`\beta_k` the phase weight (:func:`phase_weight`):
    the bonus raises entropy, and the penalty pulls every token back inside the corridor
    :math:`[\kappa_l \bar H_W, \kappa_r \bar H_W]`. The paper states the corridor on per-step
    entropies; here it is applied to each token's entropy and reduced with ``mode`` (our
    reading). Before any history exists (``history_mean=None``) only the bonus acts.

    Args:
        entropy, mask: ``[B, T]``.
        history_mean: :math:`\bar H_W` (``EntropyHistory.mean``) or ``None``.
        coef: :math:`\lambda \ge 0`.
        alpha: :math:`\alpha \ge 0`.
        kappa: :math:`(\kappa_l, \kappa_r)` with :math:`0 < \kappa_l \le \kappa_r`.
        beta: phase weight :math:`\beta_k` (:func:`phase_weight`).

    Returns:
        ``(loss, {"entropy", "smoothing", "history_mean"})``.
    """
    lam = _NONNEG(coef, "coef")
    al = _NONNEG(alpha, "alpha")
    be = _NONNEG(beta, "beta")
    if not isinstance(kappa, (tuple, list)) or len(kappa) != 2:
        raise TypeError(f"kappa must be a pair (kappa_l, kappa_r), got {kappa!r}.")
    kl = real(lo=0.0, lo_open=True, example="kappa=(0.8, 1.2)")(kappa[0], "kappa_l")
    kr = real(lo=0.0, lo_open=True, example="kappa=(0.8, 1.2)")(kappa[1], "kappa_r")
    if kl > kr:
        raise InputError(f"kappa_l={kl} exceeds kappa_r={kr}; the corridor is [kappa_l, kappa_r] * mean.")
    hbar = None if history_mean is None else real(example="history_mean=1.0")(history_mean, "history_mean")
    mask, t = _inputs(mask, check_inputs, entropy=entropy)
    h = t["entropy"]
    bonus = aggregate(h, mask, mode, normalizer=normalizer)
    if hbar is None:
        smooth = torch.zeros_like(bonus)
    else:
        out = torch.clamp(kl * hbar - h, min=0.0) + torch.clamp(h - kr * hbar, min=0.0)
        smooth = al * aggregate(out, mask, mode, normalizer=normalizer)
    loss = -lam * (bonus - be * smooth)
    nan = torch.full_like(bonus, math.nan)
    return loss, {
        "entropy": aggregate(h.detach(), mask, mode),
        "smoothing": smooth.detach(),
        "history_mean": nan if hbar is None else torch.full_like(bonus, hbar),
    }


# --------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (Cui et al. 2025)
# --------------------------------------------------------------------------------------


def _token_cov(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cov_t = (A_t - mean A)(logp_t - mean logp), means over valid tokens (verl core_algos)."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    a_bar = (adv * m).sum() / n
    l_bar = (logp.detach() * m).sum() / n
    return (adv - a_bar) * (logp.detach() - l_bar)


def clip_cov_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    preset: str = "official",
    ratio: float | None = None,
    bounds: tuple[float, float] | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    generator: torch.Generator | None = None,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""Clip-Cov: drop the policy-gradient term of a few high-covariance tokens.

    verl ``compute_policy_loss_clip_cov`` (from the official Entropy-Mechanism code):

    1. :math:`\mathrm{cov}_t = (A_t - \bar A)(\ell_t - \bar\ell)` (means over valid tokens);
    2. candidates: valid tokens not already clipped by PPO with
       :math:`\mathrm{lb} < \mathrm{cov}_t < \mathrm{ub}`;
    3. draw :math:`\min(\max(1, \lfloor rN\rfloor), \#\text{candidates})` of them uniformly
       at random (``torch.randperm`` with ``generator``; :math:`N` = valid tokens) and zero
       their clipped-surrogate term (value and gradient).

    ``preset`` fills ``ratio`` (r), ``bounds`` (lb, ub) and the PPO clip range from
    :data:`COV_PRESETS`; explicit arguments override it. The presets differ only in the clip
    range here: ``"official"`` runs with ``clip_low = clip_high = 1`` (the recipe), ``"verl"``
    with verl's 0.2.

    Returns:
        ``(loss, stats)`` with ``cov_frac`` (share of valid tokens dropped), ``num_dropped``,
        ``clip_frac`` and ``approx_kl``.
    """
    p = _preset(preset)
    r = _FRACTION(p["clip_cov_ratio"] if ratio is None else ratio, "ratio")
    lb, ub = p["clip_cov_bounds"] if bounds is None else _bounds(bounds)
    lo, hi = _clip_range(p["clip_low"] if clip_low is None else clip_low,
                         p["clip_high"] if clip_high is None and clip_low is None else clip_high)
    check_generator(generator)
    mask, t = _policy_inputs(logp, old_logp, advantages, mask, check_inputs)
    adv = t["advantages"]
    _, pg1, pg2 = _surrogate_terms(t["logp"], t["old_logp"], adv, lo, hi)
    clipped = (pg2 > pg1) & mask
    cov = _token_cov(adv, t["logp"], mask)
    cand = mask & ~clipped & (cov > lb) & (cov < ub)
    idx = cand.reshape(-1).nonzero().flatten()
    n_valid = int(mask.sum())
    n_drop = min(max(1, int(r * n_valid)), idx.numel())
    keep = torch.ones(mask.numel(), dtype=pg1.dtype, device=pg1.device)
    if n_drop > 0:
        perm = torch.randperm(idx.numel(), generator=generator, device="cpu" if generator is None else generator.device)
        keep[idx[perm[:n_drop].to(idx.device)]] = 0.0
    keep = keep.reshape(mask.shape)
    pg = torch.maximum(pg1, pg2) * keep
    return _policy_result(pg, mask, mode, normalizer, t, cov_frac=_masked_mean((keep == 0).float(), mask),
                          num_dropped=torch.tensor(float(n_drop), device=pg.device),
                          clip_frac=_masked_mean(clipped.float(), mask))


def kl_cov_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    preset: str = "official",
    ratio: float | None = None,
    kl_coef: float | None = None,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""KL-Cov: a KL penalty on the tokens of largest covariance.

    verl ``compute_policy_loss_kl_cov``: the unclipped surrogate :math:`-A_t r_t` on every
    token, plus :math:`\beta\,|\ell_t - \ell^{old}_t|` on the :math:`\max(1, \lfloor rN\rfloor)`
    valid tokens of largest :math:`\mathrm{cov}_t` (see :func:`clip_cov_policy_loss`).
    ``preset="official"``: :math:`r = 0.2\,\%`, :math:`\beta = 1`; ``"verl"``:
    :math:`r = 0.02\,\%`, :math:`\beta = 0.1` (:data:`COV_PRESETS`). On-policy
    (:math:`\ell = \ell^{old}`) the penalty's value is 0 (its subgradient at 0 is taken as 0
    by autograd), a known property (Entropy-Mechanism issue #1).

    Returns:
        ``(loss, stats)`` with ``num_penalized``, ``kl_abs`` (mean :math:`|\ell - \ell^{old}|`)
        and ``approx_kl``.
    """
    p = _preset(preset)
    r = _FRACTION(p["kl_cov_ratio"] if ratio is None else ratio, "ratio")
    beta = _NONNEG(p["kl_coef"] if kl_coef is None else kl_coef, "kl_coef")
    mask, t = _policy_inputs(logp, old_logp, advantages, mask, check_inputs)
    adv, lp, old = t["advantages"], t["logp"], t["old_logp"]
    log_ratio = lp - old
    pg = -adv * torch.exp(log_ratio)
    n_valid = int(mask.sum())
    sel = torch.zeros(mask.numel(), dtype=pg.dtype, device=pg.device)
    k = 0
    if n_valid > 0:
        cov = _token_cov(adv, lp, mask).reshape(-1)
        valid_idx = mask.reshape(-1).nonzero().flatten()
        k = max(1, int(n_valid * r))
        top = torch.topk(cov[valid_idx], k, largest=True).indices
        sel[valid_idx[top]] = 1.0
    pg = pg + beta * log_ratio.abs() * sel.reshape(mask.shape)
    return _policy_result(pg, mask, mode, normalizer, t, num_penalized=torch.tensor(float(k), device=pg.device),
                          kl_abs=_masked_mean(log_ratio.abs(), mask))


def _bounds(bounds: Any) -> tuple[float, float]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds must be a pair (lb, ub), got {bounds!r}.")
    lb = real(example="bounds=(1.0, 5.0)")(bounds[0], "bounds[0]")
    ub = real(example="bounds=(1.0, 5.0)")(bounds[1], "bounds[1]")
    if lb >= ub:
        raise InputError(f"bounds must satisfy lb < ub, got ({lb}, {ub}); use e.g. bounds=(1.0, 5.0).")
    return lb, ub


# --------------------------------------------------------------------------------------
# STEER
# --------------------------------------------------------------------------------------


def steer_token_weights(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    w_min: float = 0.8,
    w_max: float = 1.2,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""STEER's token weights from the estimated entropy change of each token's update.

    zz-haooo/STEER ``core_algos.py`` (``loss_mode: entropy_control``): with
    :math:`\pi_t = e^{\ell_t}`,

    .. math:: \Omega_t = \Bigl|\frac{A_t}{\pi^{old}_t}\,\pi_t(1-\pi_t)\,(\ell_t + H_t)\Bigr|,

    the magnitude of the first-order entropy change of a step on token :math:`t`. Over the
    valid tokens of the batch, :math:`\Omega` is mapped linearly onto :math:`[w_{min},
    w_{max}]`, the largest :math:`\Omega` to :math:`w_{min}`:
    :math:`w_t = w_{max} - (w_{max}-w_{min})\,(\Omega_t - \Omega_{min})/(\Omega_{max} -
    \Omega_{min})`. When every :math:`\Omega` is equal the weights are
    :math:`(w_{min}+w_{max})/2`. Padding gets weight 0. Defaults 0.8 / 1.2 (the run script
    uses 0.8 / 1.0); pass the weights to :func:`clipped_surrogate` (``token_weights=``,
    ``dual_clip=10``, ``clip_high=0.28`` as in STEER).

    Returns:
        ``(weights [B, T], {"omega_mean", "weight_mean"})``; the weights are detached.
    """
    lo = real(lo=0.0, example="w_min=0.8")(w_min, "w_min")
    hi = real(lo=0.0, example="w_max=1.2")(w_max, "w_max")
    if lo > hi:
        raise InputError(f"w_min={lo} exceeds w_max={hi}; pass w_min <= w_max.")
    mask, t = _inputs(mask, check_inputs, ("advantages",), advantages=advantages, logp=logp,
                      old_logp=old_logp, entropy=entropy)
    with torch.no_grad():
        lp = t["logp"]
        pi = torch.exp(lp)
        omega = (t["advantages"] * torch.exp(-t["old_logp"]) * pi * (1 - pi) * (lp + t["entropy"])).abs()
        big = torch.finfo(omega.dtype).max
        o_min = torch.where(mask, omega, big).min()
        o_max = torch.where(mask, omega, -big).max()
        span = o_max - o_min
        scaled = torch.where(span > 0, (omega - o_min) / torch.where(span > 0, span, 1.0), 0.5)
        w = torch.where(mask, hi - (hi - lo) * scaled, 0.0)
    return w, {"omega_mean": _masked_mean(omega, mask), "weight_mean": _masked_mean(w, mask)}


# --------------------------------------------------------------------------------------
# AEPO and the Monte-Carlo entropy
# --------------------------------------------------------------------------------------


def sampled_entropy(
    logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Monte-Carlo entropy estimate :math:`-\mathrm{agg}(\log\pi(a_t))` (AEPO, ``dp_actor.py``).

    **Biased; prefer** :func:`entrokit.rl.token_entropy` **when the logits are at hand.**
    :math:`-\log\pi(a_t)` is unbiased for :math:`H(\pi(\cdot|s_t))` only when :math:`a_t` is
    drawn from :math:`\pi` itself. Tokens sampled at another temperature, with top-k/top-p
    truncation, or by the old policy before an update (every PPO epoch after the first)
    bias it; and its gradient is not :math:`\nabla H`: since
    :math:`\mathbb E_{a\sim\pi}[\nabla\log\pi(a)] = 0`, the estimator's gradient is zero in
    expectation, so it cannot serve as a bonus. It is cheap (no vocabulary pass), which is
    why AEPO uses it for its temperature rule.

    Returns:
        A scalar tensor that carries ``logp``'s graph.
    """
    mask, t = _inputs(mask, check_inputs, logp=logp)
    return -aggregate(t["logp"], mask, mode, normalizer=normalizer)


def aepo_select_positives(
    advantages: torch.Tensor,
    *,
    threshold: float = 0.05,
    max_samples: int = 60,
) -> tuple[torch.Tensor, Stats]:
    r"""AEPO's choice of REINFORCE samples: those with advantage above ``threshold``.

    597358816/AEPO ``ray_trainer.py::fit``: among the samples re-generated at the scheduled
    temperature (:class:`~entrokit.rl.controllers.TemperatureScheduler`), keep those with
    :math:`A > 0.05` (their advantage is then set to 1, see :func:`aepo_reinforce_loss`), at
    most ``max_samples`` of them (the scheduler's ``samples``), in batch order. Unlike the
    reference, which returns ``None`` and crashes on the next line, an empty selection is an
    empty index tensor.

    Args:
        advantages: ``[N]`` one advantage per sample (floating); a NaN advantage is never
            selected (NaN > threshold is false).
        threshold: strict lower bound on the advantage.
        max_samples: cap (>= 0; NumPy integers accepted).

    Returns:
        ``(index [n] long, {"num_selected", "num_positive"})``, ``0 <= n <= max_samples``.
    """
    check_float_vector(advantages, "advantages", shape="[N]", detail=" (one per sample)", values="the advantages")
    thr = real(example="threshold=0.05")(threshold, "threshold")
    cap = integer(minimum=0, example="max_samples=60")(max_samples, "max_samples")
    pos = (advantages > thr).nonzero().flatten()  # NaN compares False: never selected
    idx = pos[:cap]
    dev = advantages.device
    return idx, {
        "num_selected": torch.tensor(float(idx.numel()), device=dev),
        "num_positive": torch.tensor(float(pos.numel()), device=dev),
    }


def aepo_reinforce_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token-mean",
    normalizer: Any = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, Stats]:
    r"""REINFORCE on the selected positive samples with advantage 1: :math:`-\mathrm{agg}(\ell_t)`.

    ``logp`` / ``mask`` are the rows of :func:`aepo_select_positives`' index. An empty
    selection (``B = 0``) gives a zero loss that still backpropagates (no crash).

    Returns:
        ``(loss, {"num_samples"})``.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == 0:
        if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
            raise TypeError("logp must be a floating torch.Tensor [B, T].")
        if logp.shape != mask.shape:
            raise InputError(f"logp must have the mask's shape {tuple(mask.shape)}, got {tuple(logp.shape)}.")
        return logp.sum() * 0.0, {"num_samples": torch.zeros((), device=logp.device)}
    mask, t = _inputs(mask, check_inputs, logp=logp)
    loss = -aggregate(t["logp"], mask, mode, normalizer=normalizer)
    return loss, {"num_samples": torch.tensor(float(mask.shape[0]), device=mask.device)}
