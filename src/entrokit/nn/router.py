r"""Mixture-of-experts routing by sparsity-constrained optimal transport.

Recipe of Liu, Puigcerver & Blondel (ICLR 2023, Sec. 5) as used in V-MoE: for a group of
``G`` tokens and ``E`` experts with router logits :math:`z \in \mathbb R^{G\times E}`,

1. gates :math:`\pi = \mathrm{softmax}(z)` per token and cost :math:`C = -\pi`;
2. marginals: every token carries mass ``token_mass`` and every expert receives
   :math:`G\cdot\mathrm{token\_mass}/E` (balanced load);
3. solve the top-k quadratic semi-dual (:func:`entrokit.smooth_ot`, ``reg="topk"``) with
   a fixed number of Adam steps (defaults: :math:`\gamma = 1`, 20 steps, lr 1e-2), where
   ``k = capacity``. ``mode="experts_choose"`` constrains the columns: each expert takes
   at most ``capacity`` tokens; ``mode="tokens_choose"`` constrains the rows: each token
   goes to at most ``capacity`` experts;
4. the plan decides the **dispatch** only (``plan > 0``). The combine weights are the
   softmax gates on the dispatched pairs (``use_softmax_combine=True``, the reference
   default), which is where gradients reach the logits; the OT step itself is not
   differentiated (no auxiliary load-balancing loss is needed).

The capacity bound holds exactly by construction (the plan is the gradient of a top-k
operator), whatever the number of steps.

**Precision.** float16/bfloat16 logits (what ``torch.autocast`` gives a router) are routed
in float32 with autocast off (the semi-dual's Adam steps need float32); ``combine``,
``plan`` and ``gates`` come back in the logits' dtype, and gradients reach the logits
through the cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._stateful import Option, OptionsModule, boolean, choice
from entrokit._validation import (
    check_choice,
    check_positive,
    check_positive_int,
    no_autocast,
    reject_meta,
    working_dtype,
)
from entrokit.geometry import DenseCost
from entrokit.problem import OTProblem
from entrokit.solvers.omega import TopKSquaredL2
from entrokit.solvers.smooth import smooth_ot_problem

__all__ = ["RouterOutput", "SparseOTRouter", "sparse_ot_route"]

_MODES = ("experts_choose", "tokens_choose")


@dataclass(frozen=True, eq=False)
class RouterOutput:
    r"""Routing decision for ``[..., G, E]`` logits.

    Attributes:
        dispatch: bool ``[..., G, E]``, token ``g`` is sent to expert ``e``.
        combine: ``[..., G, E]`` weights used to mix the expert outputs (zero off dispatch);
            differentiable in the logits.
        plan: the OT plan ``[..., G, E]`` (detached).
        gates: softmax of the logits ``[..., G, E]``.
        metrics: ``tokens_per_expert`` / ``experts_per_token`` (min, max, mean),
            ``dropped_tokens`` (count of tokens with no expert), ``dropped_fraction``,
            ``capacity``, and how far the plan is from the balanced marginals, as
            fractions of the total mass :math:`G\cdot\mathrm{token\_mass}` (the
            unit-mass L1 error of the solvers' ``marginal_error``; worst group):
            ``token_mass_error`` :math:`\sum_g|P\mathbf 1 - a|_g / \sum a`,
            ``expert_load_error`` :math:`\sum_e|P^\top\mathbf 1 - b|_e / \sum a`, and
            ``marginal_error``, their sum. The side the capacity constrains is exact (the
            experts' loads in ``experts_choose``, the tokens' mass in ``tokens_choose``);
            the other is what ``n_steps`` Adam steps reach, not a solver tolerance (e.g.
            about 0.1 at the defaults on 64 random tokens and 8 experts). Routing uses
            only the dispatch pattern, so this is a diagnostic: raise ``n_steps`` or
            ``lr`` to balance the loads more closely.
    """

    dispatch: torch.Tensor
    combine: torch.Tensor
    plan: torch.Tensor
    gates: torch.Tensor
    metrics: dict = field(default_factory=dict)


@reject_meta
def sparse_ot_route(
    logits: torch.Tensor,
    capacity: int,
    *,
    gamma: float = 1.0,
    n_steps: int = 20,
    lr: float = 1e-2,
    mode: str = "experts_choose",
    token_mass: float = 1.0,
    use_softmax_combine: bool = True,
) -> RouterOutput:
    """Route tokens to experts with a k-sparse OT plan (see the module docstring).

    Args:
        logits: router logits ``[G, E]`` or ``[groups, G, E]``, floating (float16 and
            bfloat16 are routed in float32; the outputs keep the logits' dtype).
        capacity: ``k``: tokens per expert (``experts_choose``) or experts per token
            (``tokens_choose``), an int >= 1.
        gamma: quadratic regularization of the plan.
        n_steps: Adam steps on the semi-dual.
        lr: Adam step size.
        mode: ``"experts_choose"`` or ``"tokens_choose"``.
        token_mass: mass carried by every token.
        use_softmax_combine: combine with the softmax gates (``True``) or with the
            normalised plan rows (``False``, no gradient to the logits).

    Returns:
        :class:`RouterOutput`.
    """
    _check_logits(logits)
    capacity = check_positive_int(capacity, "capacity")
    gamma = check_positive(gamma, "gamma")
    n_steps = check_positive_int(n_steps, "n_steps")
    lr = check_positive(lr, "lr")
    token_mass = check_positive(token_mass, "token_mass")
    check_choice(mode, "mode", _MODES)
    return _route(logits, capacity, gamma, n_steps, lr, mode, token_mass, use_softmax_combine)


def _check_logits(logits: Any, num_experts: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if num_experts is not None and logits.shape[-1] != num_experts:
        raise InputError(
            f"logits have {logits.shape[-1]} experts on the last axis but the router was built "
            f"with num_experts={num_experts}."
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating, got {logits.dtype}; use logits.float().")
    if logits.dim() not in (2, 3):
        raise InputError(
            f"logits must have shape (tokens, experts) or (groups, tokens, experts); got "
            f"{tuple(logits.shape)}. Reshape with logits.reshape(-1, G, E)."
        )
    if logits.numel() == 0:
        raise InputError(
            f"logits is empty (shape {tuple(logits.shape)}); expected at least one token, one expert and "
            "one group. Skip the router for an empty batch."
        )
    if not bool(torch.isfinite(logits).all()):
        raise InputError("logits contain NaN or inf; expected finite router logits.")


@no_autocast()
def _route(logits, capacity, gamma, n_steps, lr, mode, token_mass, use_softmax_combine) -> RouterOutput:
    out_dtype = logits.dtype
    squeeze = logits.dim() == 2
    z = logits.unsqueeze(0) if squeeze else logits
    z = z.to(working_dtype(z.dtype))
    B, G, E = z.shape
    gates = torch.softmax(z, dim=-1)
    a = torch.full((B, G), token_mass, dtype=z.dtype, device=z.device)
    b = torch.full((B, E), G * token_mass / E, dtype=z.dtype, device=z.device)
    problem = OTProblem(a, b, DenseCost(-gates.detach()))
    sparse_axis = "columns" if mode == "experts_choose" else "rows"
    out = smooth_ot_problem(
        problem, TopKSquaredL2(gamma, capacity), formulation="semi_dual", sparse_axis=sparse_axis,
        solver="adam", tol=1e-6, solve_dtype=torch.float64, max_iter=n_steps, lr=lr,
    )
    Tl = out["plan"]
    plan = Tl.transpose(-1, -2) if sparse_axis == "columns" else Tl  # (B, G, E)
    dispatch = plan > 0
    if use_softmax_combine:
        combine = gates * dispatch
    else:
        combine = plan / plan.sum(-1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    with torch.no_grad():
        tpe = dispatch.sum(-2).to(z.dtype)  # tokens per expert
        ept = dispatch.sum(-1).to(z.dtype)  # experts per token
        dropped = int((ept == 0).sum())
        # L1 marginal errors per group, relative to the total mass (the solvers' unit-mass measure)
        total = a.sum(-1)
        row_err = (plan.sum(-1) - a).abs().sum(-1) / total
        col_err = (plan.sum(-2) - b).abs().sum(-1) / total
    metrics = {
        "capacity": capacity,
        "tokens_per_expert": {"min": float(tpe.min()), "max": float(tpe.max()), "mean": float(tpe.mean())},
        "experts_per_token": {"min": float(ept.min()), "max": float(ept.max()), "mean": float(ept.mean())},
        "dropped_tokens": dropped,
        "dropped_fraction": dropped / (B * G),
        "token_mass_error": float(row_err.max()),
        "expert_load_error": float(col_err.max()),
        "marginal_error": float((row_err + col_err).max()),
    }
    def sq(t):
        return (t.squeeze(0) if squeeze else t).to(out_dtype) if t.is_floating_point() else (t.squeeze(0) if squeeze else t)

    return RouterOutput(sq(dispatch), sq(combine), sq(plan.detach()), sq(gates), metrics)


class SparseOTRouter(OptionsModule):
    """Module wrapper of :func:`sparse_ot_route`: its options are checked when they are set
    (at construction or later, e.g. ``router.gamma = 0.5``), not on every forward.

    Args:
        num_experts: ``E``; the last axis of the logits.
        capacity: tokens per expert (``experts_choose``) or experts per token.
        gamma, n_steps, lr, mode, token_mass, use_softmax_combine: see
            :func:`sparse_ot_route`.

    Example:
        >>> import torch
        >>> from entrokit.nn import SparseOTRouter
        >>> router = SparseOTRouter(num_experts=4, capacity=3)
        >>> out = router(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
        >>> int(out.dispatch.sum(0).max()) <= 3
        True
    """

    num_experts: int = Option(check_positive_int)
    capacity: int = Option(check_positive_int)
    gamma: float = Option(check_positive, default=1.0)
    n_steps: int = Option(check_positive_int, default=20)
    lr: float = Option(check_positive, default=1e-2)
    mode: str = Option(choice(_MODES), default="experts_choose")
    token_mass: float = Option(check_positive, default=1.0)
    use_softmax_combine: bool = Option(boolean, default=True)

    @reject_meta
    def forward(self, logits: torch.Tensor) -> RouterOutput:
        _check_logits(logits, self.num_experts)
        return _route(logits, self.capacity, self.gamma, self.n_steps, self.lr, self.mode, self.token_mass,
                      self.use_softmax_combine)
