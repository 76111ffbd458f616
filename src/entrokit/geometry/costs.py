r"""Ground costs of point clouds, :math:`C_{ij} = c(x_i, y_j)`: one class per cost.

A cost object carries everything the point-cloud backends need to know about it:

* :meth:`Cost.tile`: the torch tile ``c(x_rows, y_cols)`` of shape ``(..., n', m')``
  (dense matrices, online tiles and their recomputed autograd tiles all call it);
* :meth:`Cost.keops`: the same formula on KeOps ``LazyTensor`` s (``None``: not compiled);
* :attr:`Cost.translation_invariant`: :math:`c(x + t, y + t) = c(x, y)`, so the backends
  centre both clouds before computing tiles (:func:`centre`), which keeps the rounding of
  the squared-Euclidean expansion at the scale of the clouds' radius;
* :attr:`Cost.symmetric`: :math:`c(x, y) = c(y, x)`, so a reduction over the rows is the
  reduction over the columns with the clouds swapped;
* an optional closed-form gradient of :math:`\langle C, P\rangle` at a fixed plan,
  :meth:`Cost.transport_cost_vjp` (:attr:`Cost.has_transport_cost_vjp`).

A new cost is one subclass. Strings name the built-in ones (:func:`resolve_cost`):
``"sqeuclidean"`` :math:`\|x-y\|^2`, ``"euclidean"`` :math:`\|x-y\|`, ``"pnorm"``
:math:`\sum_k |x_k - y_k|^p` (:class:`PNorm`); any other callable ``c(x, y)`` is wrapped in
:class:`CostCallable`.

**The matmul expansion** (:func:`expand`) is the one place where the squared Euclidean
cost, its soft-min exponents and its plan exponents are formed:
:math:`\|x_i - y_j\|^2 = \|x_i\|^2 + \|y_j\|^2 - 2\langle x_i, y_j\rangle`, one batched
``baddbmm`` with the row and column terms folded in.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable

import torch

from entrokit._errors import InputError

__all__ = ["Cost", "SqEuclidean", "Euclidean", "PNorm", "CostCallable", "resolve_cost", "centre", "expand",
           "ieee_matmul", "COST_NAMES"]

COST_NAMES = ("sqeuclidean", "euclidean", "pnorm")


class ieee_matmul:
    r"""Context: float32 matmuls in full precision on CUDA even where the user enabled TF32
    (a TF32 product rounds ``x . y`` to 10 bits, an exponent error of about
    :math:`10^{-3} R^2/\varepsilon`, far above any useful tolerance). No-op on CPU."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self):
        if self.active:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def centre(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clouds shifted by the midpoint of their means (detached): the centring of every
    translation-invariant cost."""
    c = 0.5 * (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)).detach()
    return x - c, y - c


def expand(x: torch.Tensor, y: torch.Tensor, col: torch.Tensor, alpha: float,
           row: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`z_{ij} = \mathrm{col}_j + \alpha\langle x_i, y_j\rangle\;(+\,\mathrm{row}_i)`,
    ``(..., n, m)``, as one batched product (``baddbmm``/``addmm``). With
    ``col = |y|^2``, ``alpha = -2``, ``row = |x|^2`` it is the squared distance; with
    ``col = (h_j - |y_j|^2)/eps``, ``alpha = 2/eps`` a soft-min exponent. The result is a
    fresh buffer (callers may update it in place)."""
    yt = y.transpose(-1, -2)
    if x.dim() == 3 and y.dim() == 3:
        z = torch.baddbmm(col.unsqueeze(-2), x, yt, alpha=alpha)
    elif x.dim() == 2 and y.dim() == 2:
        z = torch.addmm(col.unsqueeze(-2), x, yt, alpha=alpha)
    else:
        z = torch.matmul(x, yt).mul_(alpha).add_(col.unsqueeze(-2))
    return z if row is None else z.add_(row.unsqueeze(-1))


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1)


class Cost:
    """A ground cost :math:`c(x, y)` between points (module docstring). Subclasses define
    :meth:`tile` and, optionally, :meth:`keops` and :meth:`transport_cost_vjp`."""

    #: short name (the string form of the built-in costs)
    name: str = "cost"
    #: ``c(x + t, y + t) = c(x, y)``: the backends centre the clouds
    translation_invariant: bool = False
    #: ``c(x, y) = c(y, x)``
    symmetric: bool = False
    #: :meth:`transport_cost_vjp` has a closed form
    has_transport_cost_vjp: bool = False
    #: depends on the points only (no parameters of its own): the online plan then has a
    #: backward in the points alone; otherwise the tensors it holds are found
    #: (:func:`entrokit.geometry._online.cost_leaves`) and differentiated on the recomputed tiles
    parameter_free: bool = False

    def tile(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``C[..., i, j] = c(x_i, y_j)`` for ``x (..., n', d)``, ``y (..., m', d)`` (already
        centred when :attr:`translation_invariant`)."""
        raise NotImplementedError

    def tile_t(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The transposed tile ``C[..., j, i] = c(x_i, y_j)`` (reductions over the rows)."""
        return self.tile(y, x) if self.symmetric else self.tile(x, y).transpose(-1, -2)

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clouds as :meth:`tile` takes them: centred for translation-invariant costs."""
        return centre(x, y) if self.translation_invariant else (x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The full cost ``(..., n, m)`` (dense path)."""
        with ieee_matmul(x.device):
            return self.tile(*self.prepare(x, y))

    @property
    def has_keops(self) -> bool:
        """Whether :meth:`keops` gives a formula (KeOps can compile this cost)."""
        return type(self).keops is not Cost.keops

    def keops(self, p_i, q_j, dtype: torch.dtype):
        """The symbolic cost between KeOps LazyTensors ``(B, n, 1, d)`` and ``(B, 1, m, d)``
        (a ``(B, n, m, 1)`` LazyTensor); ``None`` when KeOps cannot compile this cost."""
        return None

    def transport_cost_vjp(self, x, y, Pv, PTu, r, c) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Gradients of :math:`\langle C, P\rangle` in ``x`` and ``y`` at a fixed plan given by
        its products ``Pv``, ``PTu`` (several vectors at once) and marginals ``r``, ``c``."""
        raise NotImplementedError(f"the cost {self.name!r} has no closed-form transport-cost gradient.")

    def __repr__(self) -> str:
        return self.name


class SqEuclidean(Cost):
    r""":math:`c(x, y) = \|x - y\|^2` (the POT/OTT convention; GeomLoss uses half of it), by
    the matmul expansion (:func:`expand`) of centred points, clamped at 0."""

    name = "sqeuclidean"
    translation_invariant = True
    symmetric = True
    parameter_free = True
    has_transport_cost_vjp = True

    def tile(self, x, y):
        # in place after the product: one n x m buffer per call
        return expand(x, y, _sq_norm(y), -2.0, _sq_norm(x)).clamp_min_(0.0)

    def keops(self, p_i, q_j, dtype):
        diff = p_i - q_j
        return (diff * diff).sum(-1)

    def transport_cost_vjp(self, x, y, Pv, PTu, r, c):
        r""":math:`\nabla_{x_i} = 2(r_i x_i - (P y)_i)`,
        :math:`\nabla_{y_j} = 2(c_j y_j - (P^\top x)_j)` (all coordinates in one product)."""
        return 2.0 * (r.unsqueeze(-1) * x - Pv(y)), 2.0 * (c.unsqueeze(-1) * y - PTu(x))


class _SafeSqrt(torch.autograd.Function):
    """sqrt with gradient 0 at 0 (avoids NaN gradients for coincident points)."""

    @staticmethod
    def forward(ctx, x):
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, gy / (2 * y).clamp_min(torch.finfo(y.dtype).tiny), torch.zeros_like(y))


def _coordinate_sum(x: torch.Tensor, y: torch.Tensor, term) -> torch.Tensor:
    """sum_k term(x_ik - y_jk), one coordinate at a time (no (n, m, d) temporary)."""
    out = None
    for k in range(x.shape[-1]):
        t = term(x[..., :, k].unsqueeze(-1) - y[..., :, k].unsqueeze(-2))
        out = t if out is None else out + t
    return out


class Euclidean(Cost):
    r""":math:`c(x, y) = \|x - y\|` from coordinate differences (no cancellation near
    coincident points; zero gradient where points coincide)."""

    name = "euclidean"
    translation_invariant = True
    symmetric = True
    parameter_free = True

    def tile(self, x, y):
        return _SafeSqrt.apply(_coordinate_sum(x, y, lambda t: t * t))

    def keops(self, p_i, q_j, dtype):
        diff = p_i - q_j
        # KeOps' Sqrt has the derivative Rsqrt(0)/2 = 0 at 0: no NaN for coincident points
        return (diff * diff).sum(-1).sqrt()


class PNorm(Cost):
    r""":math:`c(x, y) = \sum_k |x_k - y_k|^p` (the p-th power of the :math:`\ell_p`
    distance), :math:`p \ge 1` (the gradient :math:`p|t|^{p-1}\operatorname{sign} t` is
    finite at 0)."""

    translation_invariant = True
    symmetric = True
    parameter_free = True

    def __init__(self, p: float):
        if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(p) or p < 1:
            raise InputError(f"cost='pnorm' needs a finite exponent p >= 1 (p=1: Manhattan), got p={p!r}.")
        self.p = float(p)
        self.name = f"pnorm(p={self.p:g})"

    def tile(self, x, y):
        p = self.p
        if p == 1.0:
            return _coordinate_sum(x, y, torch.abs)
        if p == 2.0:
            return _coordinate_sum(x, y, lambda t: t * t)
        return _coordinate_sum(x, y, lambda t: t.abs().pow(p))

    def keops(self, p_i, q_j, dtype):
        diff = p_i - q_j
        if self.p == 1.0:
            return diff.abs().sum(-1)
        if self.p == 2.0:
            return (diff * diff).sum(-1)
        ad = diff.abs()
        # KeOps' Powf calls the single-precision powf even on doubles: exp(p log|d|) keeps
        # float64 accuracy
        power = (ad.log() * self.p).exp() if dtype == torch.float64 else ad ** self.p
        # IfElse(-|d|, 0, |d|^p) is 0 where d = 0 and routes the gradient around log(0)
        return (-ad).ifelse(0.0, power).sum(-1)


class CostCallable(Cost):
    """A user callable ``c(x, y)`` mapping ``(B, n', d), (B, m', d)`` to a floating
    ``(B, n', m')`` tensor (checked on every tile). It may hold parameters of its own:
    the online backend then differentiates it by autograd on tiles recomputed in backward."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def tile(self, x, y):
        C = self.fn(x, y)
        if not isinstance(C, torch.Tensor):
            raise TypeError(f"the cost callable must return a torch.Tensor, got {type(C).__name__}.")
        if not C.is_floating_point():
            raise TypeError(
                f"the cost callable returned dtype {C.dtype}; it must return a floating tensor "
                f"of the points' dtype ({x.dtype}). Cast inside the callable, e.g. c(x, y).to(x.dtype)."
            )
        if C.shape[-2:] != (x.shape[-2], y.shape[-2]):
            raise InputError(
                f"the cost callable returned shape {tuple(C.shape)} for inputs {tuple(x.shape)} and "
                f"{tuple(y.shape)}; it must return (..., {x.shape[-2]}, {y.shape[-2]})."
            )
        return C


_BY_NAME = {"sqeuclidean": SqEuclidean, "euclidean": Euclidean}


def resolve_cost(cost, p=None) -> Cost:
    """The cost object of ``cost``: a :class:`Cost` (returned as is), a name of
    :data:`COST_NAMES` (``"pnorm"`` with its exponent ``p``) or a callable ``c(x, y)``."""
    if isinstance(cost, str):
        if cost != "pnorm" and p is not None:
            raise InputError(f"p={p!r} is only used with cost='pnorm'; got cost={cost!r}. Drop p, or pass cost='pnorm'.")
        if cost == "pnorm":
            if p is None:
                raise InputError("cost='pnorm' needs the exponent p (C_ij = sum_k |x_ik - y_jk|^p), e.g. p=1.5.")
            return PNorm(p)
        if cost in _BY_NAME:
            return _BY_NAME[cost]()
        raise InputError(f"cost must be 'sqeuclidean', 'euclidean', 'pnorm' or a callable c(x, y); got {cost!r}.")
    if p is not None:
        raise InputError(f"p={p!r} is only used with cost='pnorm'; got cost={cost!r}. Drop p, or pass cost='pnorm'.")
    if isinstance(cost, Cost):
        return cost
    if callable(cost):
        return CostCallable(cost)
    raise TypeError(f"cost must be a string, a Cost or a callable, got {type(cost).__name__}.")
