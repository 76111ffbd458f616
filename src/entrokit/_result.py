r"""The immutable result every solver returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from entrokit.problem import OTProblem

__all__ = ["OTResult"]


@dataclass(frozen=True, eq=False)
class OTResult:
    r"""Solution of a (batch of) regularized OT problem(s).

    For entropic OT the plan is recovered from the potentials as
    :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)`.

    Attributes:
        f: source potential ``[..., n]``.
        g: target potential ``[..., m]``. ``(f + c, g - c)`` describes the same plan; the
            returned pair is normalised so that :math:`\langle a,f\rangle = \langle b,g\rangle`.
        value: the regularized objective :math:`\langle C,P\rangle + \varepsilon\,
            \mathrm{KL}(P\|a\otimes b)` (generalised KL), evaluated in dual form
            :math:`\langle a,f\rangle + \langle b,g\rangle - \varepsilon(\sum_{ij}P_{ij}
            - \sum_i a_i\sum_j b_j)`, shape ``[...]``. POT's ``sinkhorn2``-style objective
            :math:`\langle C,P\rangle - \varepsilon H(P)` with
            :math:`H(P) = -\sum P\log P` equals ``value`` :math:`+\ \varepsilon(H(a) +
            H(b))` for unit masses, so both have the same minimiser.
        transport_cost: :math:`\langle C, P\rangle`, shape ``[...]``.
        marginal_error: :math:`\|P\mathbf 1 - a\|_1 + \|P^\top\mathbf 1 - b\|_1` at return.
        n_iter: iterations run per problem, int64 ``[...]``.
        converged: whether each problem reached ``tol``, bool ``[...]``.
        errors: marginal error at every convergence check, ``[n_checks, ...]``.
        problem: the :class:`~entrokit.problem.OTProblem` that was solved.
        eps: the regularization strength (``None`` for unregularized solvers).
        method: the solver that produced the result.
        grad: the differentiation mode (``"envelope"``, ``"implicit"`` or ``"unroll"``).
        info: solver-specific diagnostics (histories, fallbacks, timings).
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    transport_cost: torch.Tensor
    marginal_error: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    errors: torch.Tensor
    problem: OTProblem
    eps: float | None
    method: str
    grad: str
    info: Mapping[str, Any] = field(default_factory=dict)
    plan_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def plan(self) -> torch.Tensor:
        """The transport plan ``[..., n, m]``, computed on demand (and cached).

        For online point clouds this materialises the full matrix.
        """
        cache = self.__dict__.get("_plan_cache")
        if cache is None:
            if self.plan_fn is None:
                raise AttributeError(f"the {self.method!r} solver does not provide a plan")
            cache = self.plan_fn()
            object.__setattr__(self, "_plan_cache", cache)
        return cache

    @property
    def a(self) -> torch.Tensor:
        return self.problem.a

    @property
    def b(self) -> torch.Tensor:
        return self.problem.b

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums of the plan."""
        P = self.plan
        return P.sum(-1), P.sum(-2)

    def __repr__(self) -> str:
        def s(t):
            return t.item() if t.numel() == 1 else tuple(t.shape)

        return (
            f"OTResult(method={self.method!r}, eps={self.eps}, value={s(self.value.detach())}, "
            f"transport_cost={s(self.transport_cost.detach())}, marginal_error="
            f"{s(self.marginal_error)}, n_iter={s(self.n_iter)}, converged={s(self.converged)})"
        )
