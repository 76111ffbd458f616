r"""Entropy-coefficient controllers: stateful, resumable, trainer-agnostic.

Each controller is an :class:`~torch.nn.Module` built on :class:`entrokit._stateful.StatefulModule`.
Once per optimizer step the trainer passes the measured entropy (one number: the same
statistic the loss reads, e.g. ``aggregate(H.detach(), mask, mode)``) to ``step`` and gets
the coefficient to apply on the next step:

.. code-block:: python

    ctrl = PIController.tuned(target=0.6, gain=5.0)
    for batch in loader:
        H = token_entropy(logits)                   # [B, T]
        coef = ctrl.value                           # decided at the end of the last step
        loss = policy_loss - coef * aggregate(H, mask, "token-mean")
        ...
        ctrl.step(aggregate(H.detach(), mask, "token-mean"))

The state (coefficient, last measurement, step count, anchor) lives in registered buffers,
so ``state_dict()`` / ``load_state_dict()`` resume training exactly, and ``.to(device)``
moves it. A NaN or infinite measurement raises :class:`~entrokit.InputError` and leaves the
state untouched. Under ``torch.distributed`` (``sync=None`` with more than one rank, or
``sync=True``) the measurement is averaged over the ranks first, so every rank holds the
same coefficient; pass ``sync=False`` when the measurement is already global.

**Settling times.** Each docstring states how fast its controller reaches its target on
the *static plant*

.. math:: H_{k+1} = h + g\,c_k,

where :math:`c_k` is the coefficient returned by the :math:`k`-th ``step`` (measuring
:math:`H_k`), :math:`h` the entropy the policy would settle at without the bonus and
:math:`g = \partial H/\partial c > 0` the sensitivity. It is the simplest model in which a
bonus raises entropy; :class:`PIController` also covers the first-order plant
:math:`H_{k+1} = H_k + a\,(h + g c_k - H_k)`. ``tests/rl/test_controllers.py`` runs each
controller in closed loop on these plants and checks the stated bounds. Real training adds
noise and a drift of :math:`h`; the bounds say how fast the loop reacts, not what a
language model will do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._stateful import Option, StatefulModule, boolean, integer, real
from entrokit._validation import check_float_vector

__all__ = [
    "AnchoredTargetController",
    "Controller",
    "DeadbandController",
    "DifficultyAwareCoef",
    "FixedCoef",
    "PIController",
    "SignController",
    "TemperatureScheduler",
]

_F64 = torch.float64
_COEF = real(example="coef=1e-3")
_COEF_MIN = real(allow_inf=True, example="coef_min=0.0")
_COEF_MAX = real(allow_inf=True, example="coef_max=1.0")
_RATE = real(lo=0.0, lo_open=True, example="lr=1e-3")


def _measurement(value: Any, name: str = "measured") -> torch.Tensor:
    """A measured entropy: a Python/NumPy real or a 1-element tensor, as a float64 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise InputError(f"{name} is a meta tensor (shape only, no values); pass the measured number.")
        if value.numel() != 1:
            raise InputError(
                f"{name} must be one number (the aggregated entropy of the step), got a tensor of "
                f"shape {tuple(value.shape)}; reduce it first, e.g. aggregate(H, mask, 'token-mean')."
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor.")
        return value.detach().reshape(()).to(_F64)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number or a 1-element tensor, got {type(value).__name__}.")
    return torch.tensor(float(value), dtype=_F64)


class _EntropyFeedback(StatefulModule):
    """Fed one measured entropy per step: ``step`` (= ``forward``) stores it in the ``last``
    buffer through :meth:`~entrokit._stateful.StatefulModule.update_state` (refused when
    non-finite, state unchanged) and returns :meth:`_output`, what the next step uses."""

    def step(self, measured: Any) -> Any:
        """Feed the entropy measured this step; return what the next step uses (a controller's
        coefficient, the scheduler's temperature).

        Raises:
            InputError: ``measured`` is NaN or infinite (on any rank); the state is unchanged.
        """
        self.update_state(measured, what="the values passed as measured")
        return self._output()

    def forward(self, measured: Any) -> Any:
        """Same as :meth:`step`."""
        return self.step(measured)

    def _measure(self, measured: Any) -> Mapping[str, Any]:
        return {"last": _measurement(measured).to(self.last.device)}

    def _output(self) -> Any:
        raise NotImplementedError


class Controller(_EntropyFeedback):
    r"""Base of the coefficient controllers.

    State (buffers, in ``state_dict``): ``coef`` (the coefficient), ``last`` (the last
    measurement; ``inf`` before the first), ``num_steps``. Subclasses implement
    ``_control``.

    Args:
        coef: initial coefficient :math:`c_0` (kept as the fixed option ``initial_coef``;
            :meth:`~entrokit._stateful.StatefulModule.reset_state` returns to it).
        coef_min, coef_max: the box the coefficient is clipped to.
        sync, check_inputs: see :class:`~entrokit._stateful.StatefulModule`.

    The constructors are generated from the declared options: a subclass's own options
    come first; ``coef``, ``coef_min``, ``coef_max``, ``sync`` and ``check_inputs`` are
    keyword-only.
    """

    state_name = "coefficient"
    initial_coef: float = Option(_COEF, default=0.0, kw_only=True, alias="coef", fixed=True)
    coef_min: float = Option(_COEF_MIN, default=0.0, kw_only=True)
    coef_max: float = Option(_COEF_MAX, default=math.inf, kw_only=True)

    def _setup(self) -> None:
        self.add_state("coef", torch.tensor(self.initial_coef, dtype=_F64))
        self.add_state("last", torch.tensor(math.inf, dtype=_F64), sync="mean")
        self.add_state("num_steps", torch.zeros((), dtype=torch.long))

    def _check_relations(self) -> None:
        if self.coef_min > self.coef_max:
            raise InputError(
                f"coef_min={self.coef_min} exceeds coef_max={self.coef_max}; pass a box with "
                "coef_min <= coef_max."
            )
        if not self.coef_min <= float(self.coef) <= self.coef_max:
            raise InputError(
                f"coef={float(self.coef)} lies outside [coef_min, coef_max] = "
                f"[{self.coef_min}, {self.coef_max}]; widen the box or start inside it."
            )

    @property
    def value(self) -> float:
        """The coefficient to apply now (decided by the last ``step``)."""
        return float(self.coef)

    def _output(self) -> float:
        return self.value

    def _write(self, stats: Mapping[str, Any]) -> None:
        h = stats["last"].to(_F64)
        new = self._control(h)
        self.coef.copy_(torch.clamp(new, self.coef_min, self.coef_max))
        self.last.copy_(h)
        self.num_steps += 1

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FixedCoef(Controller):
    r"""A constant coefficient (the plain entropy bonus of verl, OpenRLHF and TRL).

    ``step`` still checks and records the measurement (so a NaN entropy is caught), but the
    coefficient never moves. Settling: on the static plant :math:`H_k = h + g c` from the
    first step on; the level is whatever :math:`c` produces, there is no target.

    Examples:
        >>> ctrl = FixedCoef(1e-3)
        >>> ctrl.step(0.7)
        0.001
    """

    initial_coef: float = Option(_COEF, alias="coef", fixed=True)
    coef_min: float = Option(_COEF_MIN, default=-math.inf, kw_only=True)

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        return self.coef.clone()


class SignController(Controller):
    r"""Sign-step controller (Skywork-OR1; TRL's ``use_adaptive_entropy``).

    Per step (TRL ``grpo_trainer.py``):

    .. math:: c \leftarrow \mathrm{clip}\bigl(c + \delta\,\mathrm{sign}^{+}(H^* - H),\ [c_{\min}, c_{\max}]\bigr),

    with :math:`\mathrm{sign}^+(0) = +1` (up when :math:`H \le H^*`). With
    ``apply_below_target=True`` (TRL's behaviour) the coefficient *applied* is :math:`c` only
    while the last measurement is :math:`\le H^*` and 0 otherwise (``value`` reports the
    applied one). Defaults are TRL's (``entropy_coef_delta=0.005``, box ``[0, 1]``); TRL's
    default target 0.2 nats is left out on purpose: it almost never triggers.

    Settling (static plant, ``apply_below_target=False``, :math:`c^* = (H^* - h)/g` inside
    the box): from step :math:`n = \lceil |c^* - c_0|/\delta\rceil + 1` on,
    :math:`|H_k - H^*| \le g\,\delta` (the coefficient chatters between the two grid values
    around :math:`c^*`). With the gate on, any step above target is followed by a step without
    bonus, so on a plant that responds within one step entropy alternates between the target
    and :math:`h`: the gate is a one-sided limiter, and :math:`H_k \le H^* + g\delta` holds
    from step :math:`n` on.

    Args:
        target: :math:`H^*` in nats.
        delta: step :math:`\delta > 0`.
        coef, coef_min, coef_max: initial value and box.
        apply_below_target: TRL's gate.
    """

    target: float = Option(real(example="target=0.6"))
    delta: float = Option(real(lo=0.0, lo_open=True, example="delta=0.005"), default=0.005)
    coef_max: float = Option(_COEF_MAX, default=1.0, kw_only=True)
    apply_below_target: bool = Option(boolean, default=True, kw_only=True)

    @property
    def value(self) -> float:
        if self.apply_below_target and not float(self.last) <= self.target:
            return 0.0
        return float(self.coef)

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        up = (h <= self.target).to(_F64)
        return self.coef + (2.0 * up - 1.0) * self.delta


class DeadbandController(Controller):
    r"""Dead-band integral controller of AEnt (AReaL ``recipe/AEnt``).

    After ``warmup`` steps, per step:

    .. math:: \beta \leftarrow \mathrm{clip}\bigl(\beta - \eta\,[\min(0, H - H_{lo}) + \max(0, H - H_{hi})],
              \ [\beta_{lo}, \beta_{hi}]\bigr):

    the coefficient rises while entropy is below the band, falls while above, and rests
    inside it. Defaults are AReaL's ``aent_args.py`` (β 1e-3, η 1e-3, band [0.1, 0.5], box
    [1e-5, 1e-2]); its README example uses β 2e-4, band [0.05, 0.23], box [1e-5, 3e-3],
    warmup 29.

    Settling (static plant, :math:`0 < g\eta \le 1`, no clipping): outside the band the
    distance :math:`d_k` to the band shrinks as :math:`d_k = (1 - g\eta)^k d_0` (counted from
    the first step after warmup), so it is below ``tol`` after
    :math:`\lceil \ln(\mathrm{tol}/d_0) / \ln(1 - g\eta) \rceil` steps, and entropy never
    leaves the band's side it came from. Inside the band nothing moves.

    Args:
        low, high: the band :math:`[H_{lo}, H_{hi}]` (nats).
        lr: :math:`\eta > 0`.
        coef, coef_min, coef_max: :math:`\beta_0` and the box.
        warmup: steps during which the coefficient is held at ``coef``.
    """

    low: float = Option(real(example="low=0.1"), default=0.1)
    high: float = Option(real(example="high=0.5"), default=0.5)
    lr: float = Option(_RATE, default=1e-3)
    initial_coef: float = Option(_COEF, default=1e-3, kw_only=True, alias="coef", fixed=True)
    coef_min: float = Option(_COEF_MIN, default=1e-5, kw_only=True)
    coef_max: float = Option(_COEF_MAX, default=1e-2, kw_only=True)
    warmup: int = Option(integer(minimum=0, example="warmup=0"), default=0, kw_only=True)

    def _check_relations(self) -> None:
        super()._check_relations()
        if self.low > self.high:
            raise InputError(f"low={self.low} exceeds high={self.high}; the band is [low, high].")

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        if int(self.num_steps) < self.warmup:
            return self.coef.clone()
        err = torch.clamp(h - self.low, max=0.0) + torch.clamp(h - self.high, min=0.0)
        return self.coef - self.lr * err


class AnchoredTargetController(Controller):
    r"""Integral controller toward a target anchored at the first measured entropy.

    The first ``step`` sets :math:`H^* = \rho H_0` (AER: a target a moderate fraction
    :math:`\rho < 1` below the initial entropy; SIREN: :math:`\rho = 1`, the anchor is the
    entropy of step 1). Then, every step (the first included)

    .. math:: c \leftarrow \mathrm{clip}\bigl(c + \eta\,(H^* - H),\ [c_{\min}, c_{\max}]\bigr).

    Provenance: the update ``coef += lr * (anchor - H)`` is SIREN's code (its adaptive-bonus
    baseline, ``dp_actor.py``); :math:`H^* = \rho H_0` and a global coefficient moved toward
    it are AER's paper text (no code was found; the exact AER update is not published in
    code), so with :math:`\rho \ne 1` this is our reading of the paper.

    Settling (static plant, :math:`0 < g\eta < 2`): the error obeys
    :math:`H^* - H_{k+1} = (1 - g\eta)(H^* - H_k)`, so :math:`|H_k - H^*| \le \mathrm{tol}`
    for :math:`k \ge \lceil \ln(\mathrm{tol}/|H^* - H_0|)/\ln|1 - g\eta| \rceil`; with
    :math:`g\eta = 1` the target is reached in one step.

    Args:
        ratio: :math:`\rho > 0`.
        lr: :math:`\eta > 0`.
        coef, coef_min, coef_max: initial coefficient and box.

    The anchor is the buffer ``anchor`` (NaN until the first step).
    """

    ratio: float = Option(real(lo=0.0, lo_open=True, example="ratio=1.0 (SIREN) or 0.5 (AER)"), default=1.0)
    lr: float = Option(_RATE, default=1e-3)
    coef_max: float = Option(_COEF_MAX, default=1.0, kw_only=True)

    def _setup(self) -> None:
        super()._setup()
        self.add_state("anchor", torch.tensor(math.nan, dtype=_F64))

    @property
    def target(self) -> float:
        """:math:`H^* = \\rho H_0` (NaN before the first step)."""
        return self.ratio * float(self.anchor)

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        if torch.isnan(self.anchor):
            self.anchor.copy_(h)
        return self.coef + self.lr * (self.ratio * self.anchor - h)


class PIController(Controller):
    r"""Proportional-integral controller with anti-windup and a documented settling time.

    With the error :math:`e_k = H^* - H_k` and its running sum :math:`S_k = \sum_{j\le k} e_j`,

    .. math:: c_k = \mathrm{clip}\bigl(c_0 + k_p e_k + k_i S_k,\ [c_{\min}, c_{\max}]\bigr).

    Anti-windup (back-calculation): :math:`S_k` is clamped so that the unclipped output stays
    inside the box, so after a saturated stretch the controller leaves the bound as soon as
    the error changes sign instead of first unwinding a large sum.

    Settling time. On the first-order plant :math:`H_{k+1} = H_k + a(h + g c_k - H_k)`
    (:math:`0 < a \le 1`; :math:`a = 1` is the static plant) the gains

    .. math:: k_p = \frac{1 - a}{a g},\qquad k_i = \frac{\lambda}{a g},\qquad 0 < \lambda < 2,

    (:meth:`tuned`) cancel the plant's pole, and the error after the first step obeys
    :math:`e_{k+1} = (1 - \lambda)\,e_k`, :math:`k \ge 1`. So :math:`|e_k| \le \mathrm{tol}`
    for :math:`k \ge 1 + \lceil \ln(\mathrm{tol}/|e_1|) / \ln|1-\lambda| \rceil`, and with
    :math:`\lambda = 1` (the default) the error is exactly zero from step 2 on (dead-beat),
    while the coefficient stays inside its box. Smaller :math:`\lambda` trades speed for
    less noise amplification: the measurement noise reaches :math:`c` with gain
    :math:`k_p + k_i`.

    Args:
        target: :math:`H^*` in nats.
        kp, ki: gains (>= 0).
        coef: :math:`c_0`, the coefficient at zero error (the feed-forward guess).
        coef_min, coef_max: the box.
    """

    target: float = Option(real(example="target=0.6"))
    kp: float = Option(real(lo=0.0, example="kp=0.0"))
    ki: float = Option(real(lo=0.0, example="ki=0.1"))
    coef_max: float = Option(_COEF_MAX, default=1.0, kw_only=True)

    def _setup(self) -> None:
        super()._setup()
        self.add_state("bias", torch.tensor(self.initial_coef, dtype=_F64))
        self.add_state("integral", torch.zeros((), dtype=_F64))

    @classmethod
    def tuned(
        cls,
        target: float,
        gain: float,
        *,
        rate: float = 1.0,
        lam: float = 1.0,
        **kwargs: Any,
    ) -> PIController:
        r"""Gains for the first-order plant with sensitivity ``gain`` (:math:`g`) and ``rate`` (:math:`a`).

        ``lam`` (:math:`\lambda \in (0, 2)`) is the per-step error contraction
        :math:`1 - \lambda`; see the class docstring for the settling time.
        """
        g = real(lo=0.0, lo_open=True, example="gain=5.0")(gain, "gain")
        a = real(lo=0.0, hi=1.0, lo_open=True, example="rate=1.0")(rate, "rate")
        lam = real(lo=0.0, hi=2.0, lo_open=True, hi_open=True, example="lam=1.0")(lam, "lam")
        return cls(target, kp=(1.0 - a) / (a * g), ki=lam / (a * g), **kwargs)

    def _control(self, h: torch.Tensor) -> torch.Tensor:
        e = self.target - h
        s = self.integral + e
        if self.ki > 0:  # anti-windup (back-calculation): the unclipped output stays in the box
            p = self.bias + self.kp * e
            s = torch.clamp(s, (self.coef_min - p) / self.ki, (self.coef_max - p) / self.ki)
        self.integral.copy_(s)
        return self.bias + self.kp * e + self.ki * s


class DifficultyAwareCoef(StatefulModule):
    r"""Per-prompt coefficients for hard prompts only (AER's difficulty-aware allocation).

    A global coefficient :math:`\alpha` comes from any controller (``base``, e.g.
    :class:`AnchoredTargetController` with ``ratio < 1``, AER's anchored target); prompt
    :math:`i` with a group accuracy :math:`\mathrm{acc}_i` (the fraction of its rollouts that
    were correct) gets

    .. math:: c_i = \alpha\,\mathbf 1[\mathrm{acc}_i < \tau],

    so the bonus acts on the prompts the policy still fails on and leaves solved ones alone.
    With ``G`` responses per prompt (GRPO groups, prompt-major order), pass
    ``coefs.repeat_interleave(G)`` as the per-response ``coef`` of
    :func:`entrokit.rl.losses.entropy_bonus`.
    Provenance: AER's paper text (no code was found); the exact weighting inside the hard
    set is not specified there, and this is the indicator reading.

    Settling: that of ``base`` (the global coefficient is ``base``'s); the per-prompt
    coefficients follow it exactly.

    Args:
        base: the controller of the global coefficient (its state is part of this module's
            ``state_dict``).
        tau: accuracy threshold :math:`\tau \in (0, 1]`.
    """

    tau = Option(real(lo=0.0, hi=1.0, lo_open=True, example="tau=0.5"))

    def __init__(self, base: Controller, tau: float = 0.5) -> None:
        super().__init__(sync=False)
        if not isinstance(base, Controller):
            raise TypeError(
                f"base must be an entrokit.rl controller (e.g. AnchoredTargetController), got "
                f"{type(base).__name__}."
            )
        self.base = base
        self.tau = tau
        self._ready()

    @property
    def value(self) -> float:
        """The global coefficient :math:`\\alpha`."""
        return self.base.value

    def step(self, measured: Any) -> float:
        """Update the global coefficient (see ``base.step``)."""
        return self.base.step(measured)

    def forward(self, accuracy: torch.Tensor) -> torch.Tensor:
        """Coefficients ``[P]`` for prompts with group accuracies ``accuracy`` ``[P]`` in ``[0, 1]``."""
        return self.per_prompt(accuracy)

    def per_prompt(self, accuracy: torch.Tensor) -> torch.Tensor:
        """Coefficients ``[P]`` for prompts with group accuracies ``accuracy`` ``[P]`` in ``[0, 1]``."""
        check_float_vector(accuracy, "accuracy", shape="[num_prompts]", detail=" with num_prompts >= 1",
                           values="the group accuracies", min_len=1)
        if self.check_inputs:
            bad = ~torch.isfinite(accuracy) | (accuracy < 0) | (accuracy > 1)
            if bool(bad.any()):
                raise InputError(
                    "accuracy must hold finite fractions in [0, 1] (correct rollouts / rollouts per "
                    f"prompt); got {accuracy[bad][0].item()!r}."
                )
        return (accuracy < self.tau).to(accuracy.dtype) * self.value


class TemperatureScheduler(_EntropyFeedback):
    r"""AEPO's bang-bang temperature rule for the auxiliary rollouts.

    Per step (597358816/AEPO ``ray_trainer.py::fit``): if the last measured entropy is
    :math:`\le H^*` the next auxiliary rollouts are sampled at :math:`T_{high}` (more
    exploration), else at :math:`T_{low}`; ``num_samples`` is the number of REINFORCE samples
    to splice into the batch, halved while entropy is above target. Before the first
    measurement the entropy counts as above target (:math:`T_{low}`). Pair it with
    :func:`entrokit.rl.losses.aepo_select_positives`, which picks the positive samples
    (and does not fail when there are none). AEPO measures entropy with the Monte-Carlo
    estimate :func:`entrokit.rl.losses.sampled_entropy`.

    Settling: a bang-bang rule has none in the usual sense; on a plant whose entropy is
    monotone in the temperature with :math:`H(T_{low}) < H^* < H(T_{high})`, entropy
    alternates around :math:`H^*` and never stays on one side for more than the time the
    plant needs to cross it.

    Args:
        target: :math:`H^*` (AEPO ``entropy_base`` 0.5).
        t_low, t_high: the two temperatures (0.8, 1.2).
        num_samples: REINFORCE samples per step below target (60).
    """

    state_name = "temperature state"
    target: float = Option(real(example="target=0.5"), default=0.5)
    t_low: float = Option(real(lo=0.0, lo_open=True, example="t_low=0.8"), default=0.8)
    t_high: float = Option(real(lo=0.0, lo_open=True, example="t_high=1.2"), default=1.2)
    num_samples: int = Option(integer(minimum=0, example="num_samples=60"), default=60)

    def _setup(self) -> None:
        self.add_state("last", torch.tensor(math.inf, dtype=_F64), sync="mean")

    def _check_relations(self) -> None:
        if self.t_low > self.t_high:
            raise InputError(f"t_low={self.t_low} exceeds t_high={self.t_high}; pass t_low <= t_high.")

    @property
    def below_target(self) -> bool:
        return float(self.last) <= self.target

    @property
    def temperature(self) -> float:
        """Sampling temperature for the next auxiliary rollouts."""
        return self.t_high if self.below_target else self.t_low

    @property
    def samples(self) -> int:
        """How many positive samples to splice in next (half of ``num_samples`` above target)."""
        return self.num_samples if self.below_target else self.num_samples // 2

    def _output(self) -> float:
        return self.temperature

    def _write(self, stats: Mapping[str, Any]) -> None:
        self.last.copy_(stats["last"])
