r"""The geometry contract: the only door from a solver to the ground cost.

Every reduction over :math:`n` or :math:`m` that a solver needs is a method of the
geometry, so a dense matrix, a point cloud computed in tiles, a low-rank cost or a cost
sharded over processes is a new geometry, never a solver fork.

The central primitive is the *partial* log-sum-exp along one axis. For ``axis=1``
(reduce over the columns ``j``), with :math:`z_{ij} = (h_j + \varepsilon\log w_j -
C_{ij})/\varepsilon`,

.. math::

    \operatorname{lse}_i = \log\sum_j e^{z_{ij}} = M_i + \log S_i,\qquad
    M_i = \max_j z_{ij},\quad S_i = \sum_j e^{z_{ij} - M_i},

returned as the pair :math:`(M, S)`. Pairs from disjoint tiles (or ranks) combine
exactly, :math:`M = \max(M^{(1)}, M^{(2)})`, :math:`S = \sum_k S^{(k)} e^{M^{(k)} - M}`
(:func:`combine_lse`), which is what online, fused and sharded geometries need. The
soft-min (soft :math:`c`-transform) is :math:`-\varepsilon(M + \log S)`. Zero weights
give :math:`\log 0 = -\infty` and drop out exactly.

Plans are always described by potentials,
:math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)`, and the geometry computes
``P v``, ``Pᵀ u``, the marginals and :math:`\langle C, P\rangle` without a solver ever
holding ``C``. Only solvers that need the dense Hessian (Newton) or the smooth duals call
:meth:`Geometry.cost_matrix`.

Shapes: solvers work on geometries with exactly one leading batch axis ``(B, n, m)``
(:meth:`Geometry.flatten_batch`); user inputs may carry any number of batch axes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Geometry", "exp_floor", "combine_lse", "lse_to_softmin", "plan_block", "logsumexp_pair", "log_weights"]


def log_weights(w: torch.Tensor) -> torch.Tensor:
    """log w with log 0 = -inf exactly (no smoothing constant)."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), torch.full_like(w, -float("inf")))


def exp_floor(dtype: torch.dtype) -> float:
    """Exponents below this are treated as exp(-inf) = 0.

    Exponentials that underflow into subnormal numbers run an order of magnitude slower
    on x86 CPUs (and subnormals slow down every later product), while terms below
    ``exp(floor)`` are far below the working precision of any sum they enter.
    """
    return -600.0 if dtype == torch.float64 else -80.0


def logsumexp_pair(z: torch.Tensor, dim: int, *, overwrite: bool = False,
                   base2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Partial log-sum-exp of ``z`` along ``dim``: ``(M, S)`` with ``lse = M + log S``.

    ``M`` is detached (a constant shift, so gradients flow through ``S`` only, exactly);
    a slice that is entirely ``-inf`` gives ``M = -inf, S = 0``. Exponents are floored at
    :func:`exp_floor` (no subnormals); a floored term is below the rounding error of
    ``S >= 1``, so ``-inf`` entries (zero weights) still contribute nothing. With
    ``overwrite`` (``z`` is a temporary) and no autograd, ``z`` is reused as workspace.
    With ``base2``, ``z`` holds exponents in base 2 (:math:`z \log_2 e`) and the pair is
    still the natural one, ``M`` scaled by :math:`\ln 2` (``torch.exp2`` is 2-3x faster
    than ``torch.exp`` on CPU).
    """
    mx = z.detach().amax(dim=dim, keepdim=True)
    empty = mx == -float("inf")
    shift = mx.masked_fill(empty, 0.0)
    floor = exp_floor(z.dtype) * (1.0 / math.log(2.0) if base2 else 1.0)
    if z.requires_grad or not overwrite:
        e = (torch.exp2 if base2 else torch.exp)((z - shift).clamp_min(floor))
    else:
        e = z.sub_(shift).clamp_min_(floor)
        e = e.exp2_() if base2 else e.exp_()
    s = e.sum(dim).masked_fill(empty.squeeze(dim), 0.0)
    mx = mx.squeeze(dim)
    return (mx * math.log(2.0) if base2 else mx), s


def combine_lse(
    pairs: list[tuple[torch.Tensor, torch.Tensor]] | tuple[tuple[torch.Tensor, torch.Tensor], ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Combine partial pairs of disjoint tiles: :math:`M=\max_k M^{(k)}`,
    :math:`S=\sum_k S^{(k)}e^{M^{(k)}-M}` (exact; ``-inf`` tiles contribute nothing)."""
    pairs = list(pairs)
    if len(pairs) == 1:
        return pairs[0]
    mx = torch.stack([p[0] for p in pairs]).amax(0)
    total = torch.zeros_like(pairs[0][1])
    for m_k, s_k in pairs:
        scale = torch.where(m_k == -float("inf"), torch.zeros_like(m_k), torch.exp(m_k - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))))
        total = total + s_k * scale
    return mx, total


def lse_to_softmin(pair: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    r"""Soft-min :math:`-\varepsilon(M + \log S)` from a partial pair (``+inf`` if empty)."""
    mx, s = pair
    shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return -eps * (torch.log(s) + shift)


def plan_block(f, g, a, b, C, eps) -> torch.Tensor:
    r"""P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) for a block of rows/columns.

    The weights multiply (rather than enter as log a) so that gradients with respect to
    zero weights are finite; the exponent is clamped below overflow, which only touches
    pairs whose weights are zero.
    """
    dtype = torch.result_type(f, C)
    for t in (g, a, b):
        dtype = torch.promote_types(dtype, t.dtype)
    lo, hi = exp_floor(dtype), 0.5 * math.log(torch.finfo(dtype).max)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (f, g, a, b, C)):
        # no graph: one buffer of the broadcast shape, updated in place
        f, g, a, b = f.unsqueeze(-1), g.unsqueeze(-2), a.unsqueeze(-1), b.unsqueeze(-2)
        shape = torch.broadcast_shapes(f.shape, g.shape, C.shape, a.shape, b.shape)
        S = torch.sub(f, C, out=torch.empty(shape, dtype=dtype, device=C.device))
        S.add_(g).mul_(1.0 / eps).clamp_(lo, hi).exp_()
        return S.mul_(a).mul_(b)
    S = (f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps
    return torch.exp(S.clamp(lo, hi)) * a.unsqueeze(-1) * b.unsqueeze(-2)


class TensorMetadata:
    """``dtype`` and ``device`` of an object that holds tensors, read from its ``_stored``
    tensor (a geometry's cost or points, a problem's weights)."""

    _stored: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self._stored.dtype

    @property
    def device(self) -> torch.device:
        return self._stored.device


class Geometry(TensorMetadata):
    """Base class: the primitives a solver may call. Subclasses are immutable.

    **A new geometry needs only** :meth:`cost_matrix`: every other primitive has a dense
    default that materialises that matrix (as OTT's ``Geometry`` does), so every solver
    runs on it unchanged, gradients included (they flow through the matrix the method
    returns). The metadata (:attr:`shape`, :attr:`dtype`, :attr:`device`,
    :attr:`batch_shape`) is read from the matrix too: override it when
    :meth:`cost_matrix` is not cheap. A geometry that never stores the matrix (online,
    low rank, sharded) overrides the metadata, :meth:`lse` (or :meth:`softmin`),
    :meth:`plan_reduce`, :meth:`plan_matvec`, :meth:`cost_bounds`,
    :meth:`tensors`/:meth:`rebuild` (for gradients) and the batch-shape methods. All
    primitives take and return *batched* tensors: potentials and weights ``(B, n)`` /
    ``(B, m)``.
    """

    # -- the dense defaults --------------------------------------------------------------
    def _dense(self):
        """:class:`~entrokit.geometry.DenseCost` of :meth:`cost_matrix`: the default
        implementation of every primitive a subclass leaves out."""
        from entrokit.geometry.dense import DenseCost  # dense.py builds on this module

        return DenseCost(self.cost_matrix())

    # -- metadata ----------------------------------------------------------------------
    @property
    def _stored(self) -> torch.Tensor:
        """The tensor the metadata is read from: dtype, device, and the batch axes (all but
        its last two). By default the ``(..., n, m)`` :meth:`cost_matrix`, which also gives
        :attr:`shape`; a geometry that stores its cost, or another representation of it,
        returns that."""
        return self.cost_matrix()

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``."""
        return (self._stored.shape[-2], self._stored.shape[-1])

    @property
    def global_shape(self) -> tuple[int, int]:
        """``(n, m)`` of the whole problem. Equal to :attr:`shape` except for geometries
        sharded over processes, whose :attr:`shape` is this process's share (uniform
        weights and size-dependent solver defaults use the global size)."""
        return self.shape

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch axes (``()`` for one problem)."""
        return tuple(self._stored.shape[:-2])

    @property
    def batched(self) -> bool:
        return len(self.batch_shape) > 0

    @property
    def is_online(self) -> bool:
        """True when the cost is never stored as a full matrix."""
        return False

    # -- structure ---------------------------------------------------------------------
    def reshape_batch(self, batch_shape: tuple[int, ...]) -> Geometry:
        """The same problems with the leading axes reshaped to ``batch_shape`` (default: a
        :class:`~entrokit.geometry.DenseCost` of the reshaped matrix, so a solver that
        batches its problem runs on the dense engines)."""
        return self._dense().reshape_batch(batch_shape)

    def flatten_batch(self) -> Geometry:
        """Exactly one leading batch axis ``(B, n, m)`` (``B = 1`` for one problem)."""
        B = math.prod(self.batch_shape)
        return self.reshape_batch((B,))

    with_batch = flatten_batch

    def to_dtype(self, dtype: torch.dtype) -> Geometry:
        """The same geometry with its tensors cast to ``dtype`` (for float64 certification
        of float32 solves)."""
        if dtype == self.dtype:
            return self
        return self.rebuild(*(t.detach().to(dtype) for t in self.tensors()))

    def detach(self) -> Geometry:
        """The same costs without their autograd graph."""
        return self._dense().detach()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the cost depends on (for custom autograd Functions; default: the
        cost matrix, whose graph leads to whatever it was computed from)."""
        return (self.cost_matrix(),)

    def rebuild(self, *tensors: torch.Tensor) -> Geometry:
        """A copy of this geometry built on other tensors of the same shapes as
        :meth:`tensors` (default: a :class:`~entrokit.geometry.DenseCost`)."""
        from entrokit.geometry.dense import DenseCost

        return DenseCost(*tensors)

    # -- cost bounds and checks -----------------------------------------------------------
    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min C, max C)`` per problem, shape ``(B,)`` each (NaN propagates)."""
        return self._dense().cost_bounds()

    def cost_range(self) -> torch.Tensor:
        """``max C - min C`` per problem, shape ``(B,)``."""
        lo, hi = self.cost_bounds()
        return hi - lo

    def max_cost(self) -> torch.Tensor:
        """``max |C|`` per problem, shape ``(B,)``."""
        lo, hi = self.cost_bounds()
        return torch.maximum(lo.abs(), hi.abs())

    def check_finite(self) -> None:
        """Raise :class:`~entrokit.InputError` if any computed cost entry is NaN or infinite.

        Run once at the boundary, before a solver iterates (one pass over the cost).
        """
        from entrokit._errors import InputError

        lo, hi = self.cost_bounds()
        if bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            return
        what = "NaN" if bool(torch.isnan(lo).any() | torch.isnan(hi).any()) else "an infinite value"
        raise InputError(
            f"cost contains {what} (computed by {self!r}); expected finite costs. "
            "For point clouds, rescale the coordinates (large coordinates overflow when "
            "squared) or fix the cost callable; for a cost matrix, replace infinite entries "
            "by a large finite number or drop the corresponding points."
        )

    # -- reductions over n and m ------------------------------------------------------------
    def lse(self, h: torch.Tensor, log_w: torch.Tensor, eps: float, axis: int):
        r"""Partial log-sum-exp pair ``(M, S)`` of
        :math:`z = (h + \varepsilon\log w - C)/\varepsilon` along ``axis`` (module
        docstring). ``axis=1``: ``h, log_w`` of shape ``(B, m)``, output ``(B, n)``;
        ``axis=0``: ``(B, n) -> (B, m)``."""
        return self._dense().lse(h, log_w, eps, axis)

    def softmin(self, h: torch.Tensor, log_w: torch.Tensor, eps: float, axis: int) -> torch.Tensor:
        r"""Soft c-transform
        :math:`-\varepsilon\log\sum_j w_j e^{(h_j - C_{ij})/\varepsilon}` (``axis=1``) or
        its transpose (``axis=0``); differentiable."""
        return lse_to_softmin(self.lse(h, log_w, eps, axis), eps)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate: torch.dtype | None = None,
                    round_to: torch.dtype | None = None):
        r"""Row sums, column sums and :math:`\langle C, P\rangle` of
        :math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}`, differentiable in every
        argument, without storing P for online geometries. With ``accumulate`` (e.g.
        ``torch.float64``) the plan entries are computed in the working dtype, exactly as
        :meth:`plan` returns them, and summed in ``accumulate``; with ``round_to`` the
        entries are first rounded to that dtype (a float32 plan formed from float64
        potentials). Geometries may omit ``round_to``."""
        return self._dense().plan_reduce(f, g, a, b, eps, accumulate=accumulate, round_to=round_to)

    def marginals(self, f, g, a, b, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P 1, Pᵀ 1)``."""
        row, col, _ = self.plan_reduce(f, g, a, b, eps)
        return row, col

    def transport_cost(self, f, g, a, b, eps) -> torch.Tensor:
        r""":math:`\langle C, P\rangle`."""
        return self.plan_reduce(f, g, a, b, eps)[2]

    def plan_matvec(self, f, g, a, b, eps, vec: torch.Tensor, axis: int) -> torch.Tensor:
        """``P @ vec`` (axis=1, vec ``(B, m)``) or ``P.T @ vec`` (axis=0, vec ``(B, n)``); ``vec``
        may carry a trailing axis of ``k`` vectors, ``(B, m, k)`` / ``(B, n, k)``."""
        return self._dense().plan_matvec(f, g, a, b, eps, vec, axis)

    def plan_operator(self, f, g, a, b, eps):
        """``(Pv, PTu, r, c)``: closures for ``P @ v`` and ``P.T @ u`` and the marginals, for
        solvers that apply one plan many times (the adjoint CG). Online geometries apply
        it tile by tile; dense ones materialise the plan once."""

        def Pv(v):
            return self.plan_matvec(f, g, a, b, eps, v, axis=1)

        def PTu(u):
            return self.plan_matvec(f, g, a, b, eps, u, axis=0)

        r, c = self.marginals(f, g, a, b, eps)
        return Pv, PTu, r, c

    @property
    def has_transport_cost_vjp(self) -> bool:
        """Whether :meth:`transport_cost_vjp` has a closed form for this geometry."""
        return False

    def transport_cost_vjp(self, Pv, PTu, r, c) -> tuple[torch.Tensor, ...]:
        r"""Gradient of :math:`\langle C, P\rangle` with respect to :meth:`tensors`, the plan
        :math:`P` held fixed and given by its products ``Pv``, ``PTu`` and marginals ``r``,
        ``c`` (:meth:`plan_operator`): no :math:`n m` autograd graph. Only geometries with
        :attr:`has_transport_cost_vjp`; others are differentiated by autograd."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form transport-cost gradient.")

    def check_grad_mode(self, grad: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Raise :class:`~entrokit.InputError` when this geometry cannot differentiate a
        solve in mode ``grad`` with weights ``a, b`` (called before solving). Every mode
        is supported by default."""

    def row_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum of a per-row vector ``(B, n) -> (B,)`` (a sharded geometry all-reduces it)."""
        return v.sum(-1)

    def col_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum of a per-column vector ``(B, m) -> (B,)``."""
        return v.sum(-1)

    # -- materialisation (only for solvers that need the dense matrix) ---------------------
    def cost_matrix(self) -> torch.Tensor:
        """The dense cost ``(..., n, m)`` (materialises it for point clouds): the one
        method a new geometry must implement (class docstring)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement cost_matrix() (or every primitive it would default)."
        )

    def plan(self, f, g, a, b, eps) -> torch.Tensor:
        """The dense plan ``(B, n, m)`` (materialised)."""
        return plan_block(f, g, a, b, self.cost_matrix(), eps)

    def self_geometries(self) -> tuple[Geometry, Geometry]:
        """The geometries of the self-problems ``(C(x, x), C(y, y))`` that a debiased
        Sinkhorn divergence needs. Geometries built from two point sets implement it;
        for others, pass the three geometries explicitly."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot build the self-costs C(x, x) and C(y, y); pass the three "
            "geometries (xy, xx, yy) explicitly."
        )

    def scaling_engine(self, a, b, log_a, log_b):
        """An engine running Sinkhorn as scalings of an absorbed kernel (two mat-vecs per
        iteration), or ``None`` when this geometry only offers log-sum-exp updates."""
        return None


class PointGeometry(Geometry):
    """Base of the geometries built from two point clouds ``x (..., n, d)`` and
    ``y (..., m, d)`` held as attributes: shape, dtype, device and batch axes are read from
    them (``shape`` is the ``(n, m)`` of the points held here)."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def _stored(self) -> torch.Tensor:
        return self.x  # (..., n, d): dtype, device and batch axes

    def tensors(self):
        return (self.x, self.y)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[-2], self.y.shape[-2])
