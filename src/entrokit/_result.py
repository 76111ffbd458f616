r"""The immutable result every solver returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from entrokit.problem import OTProblem

__all__ = ["OTResult", "SolverInfo", "SinkhornInfo"]


class SolverInfo(Mapping):
    """Read-only diagnostics of a solve: attribute and mapping access (``info.time``,
    ``info["time"]``), never mutated after the solve.

    Keys every solver sets: ``time`` (seconds). Sinkhorn adds ``stages``,
    ``stage_iters``, ``absorptions``, ``fallbacks``, ``eps_scaling`` (and
    ``probe_iters`` when ``"auto"`` switched to annealing); the Newton solvers add their
    per-iteration histories (``objective``, ``marginal_error``, ``time``, ``phase``),
    ``n_warmup``, ``n_newton``, ``cg_iters``, ``status``, ...; smooth OT adds ``reg``,
    ``formulation``, ``solver``. Batched Newton histories are lists with one entry per
    problem.
    """

    __slots__ = ("_data",)
    #: keys a subclass guarantees (checked at construction)
    required: tuple[str, ...] = ()

    def __init__(self, data: Mapping[str, Any] | None = None, **fields: Any):
        merged = {**(data or {}), **fields}
        missing = [k for k in self.required if k not in merged]
        if missing:
            raise KeyError(f"{type(self).__name__} is missing the field(s) {missing}")
        object.__setattr__(self, "_data", merged)

    @classmethod
    def wrap(cls, info) -> SolverInfo:
        return info if isinstance(info, SolverInfo) else cls(info or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"solver info has no field {key!r}; fields: {sorted(self._data)}") from None

    def __setattr__(self, key, value):
        raise AttributeError("SolverInfo is read-only")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(sorted(self._data))})"


class SinkhornInfo(SolverInfo):
    """Diagnostics of :func:`entrokit.sinkhorn`: ``time`` (s), ``stages`` (eps-scaling
    stages run), ``stage_iters``, ``absorptions`` and ``fallbacks`` (of the scaling
    engine), ``eps_scaling`` (whether annealing ran) and, when ``"auto"`` switched to
    annealing, ``probe_iters``; ``float64_finish`` (iterations of a float32 point cloud's
    float64 finish) and ``multiscale_start`` (the result is an online cloud's multiscale
    start, certified without a loop) where they apply."""

    required = ("time", "stages", "stage_iters", "absorptions", "fallbacks", "eps_scaling")


def _per_problem():
    """A tensor field with one entry (or one vector) per problem, batch axes leading."""
    return field(metadata={"tensor": True, "per_problem": True})


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

    f: torch.Tensor = _per_problem()
    g: torch.Tensor = _per_problem()
    value: torch.Tensor = _per_problem()
    transport_cost: torch.Tensor = _per_problem()
    marginal_error: torch.Tensor = _per_problem()
    n_iter: torch.Tensor = _per_problem()
    converged: torch.Tensor = _per_problem()
    errors: torch.Tensor = field(metadata={"tensor": True})  # [n_checks, ...]
    problem: OTProblem
    eps: float | None
    method: str
    grad: str
    info: Mapping[str, Any] = field(default_factory=dict)
    plan_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    apply_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = field(default=None, repr=False)
    marginals_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

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

    def apply(self, vec: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """``P @ vec`` (``axis=1``, ``vec [..., m]``) or ``P.T @ vec`` (``axis=0``,
        ``vec [..., n]``) without materialising the plan (online geometries apply it
        tile by tile)."""
        if axis not in (0, 1):
            from entrokit._errors import InputError

            raise InputError(f"axis must be 0 (P.T @ vec) or 1 (P @ vec), got {axis!r}.")
        if self.apply_fn is not None:
            return self.apply_fn(vec, axis)
        P = self.plan
        P = P.to_dense() if P.is_sparse else P
        if axis == 1:
            return (P @ vec.unsqueeze(-1)).squeeze(-1)
        return (vec.unsqueeze(-2) @ P).squeeze(-2)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums of the plan (from the potentials, without materialising it,
        for entropic solvers)."""
        if self.marginals_fn is not None:
            return self.marginals_fn()
        P = self.plan
        if isinstance(P, torch.Tensor) and P.is_sparse:
            P = P.to_dense()
        return P.sum(-1), P.sum(-2)

    def numpy(self) -> OTResult:
        """A copy whose tensor fields (and plan) are NumPy arrays, detached, on the CPU."""
        import dataclasses

        def conv(t):
            if isinstance(t, torch.Tensor):
                t = t.detach().cpu()
                return (t.to_dense() if t.is_sparse else t).numpy()
            return t

        fields = {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("tensor")}
        plan_fn = None if self.plan_fn is None else (lambda fn=self.plan_fn: conv(fn()))
        marg = None if self.marginals_fn is None else (lambda fn=self.marginals_fn: tuple(conv(t) for t in fn()))

        def apply_np(vec, axis, res=self):
            return conv(res.apply(torch.as_tensor(vec, dtype=res.f.dtype), axis))

        return dataclasses.replace(self, **fields, plan_fn=plan_fn, marginals_fn=marg, apply_fn=apply_np)

    def __repr__(self) -> str:
        def s(t):
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t)
            return t.item() if t.numel() == 1 else tuple(t.shape)

        value, tc = (t.detach() if isinstance(t, torch.Tensor) else t for t in (self.value, self.transport_cost))
        return (
            f"OTResult(method={self.method!r}, eps={self.eps}, value={s(value)}, "
            f"transport_cost={s(tc)}, marginal_error="
            f"{s(self.marginal_error)}, n_iter={s(self.n_iter)}, converged={s(self.converged)})"
        )


#: the tensor fields of :class:`OTResult` with the problems' batch axes leading (what a
#: batch of results concatenates): ``f, g, value, transport_cost, marginal_error, n_iter,
#: converged``
PER_PROBLEM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(OTResult) if f.metadata.get("per_problem"))
