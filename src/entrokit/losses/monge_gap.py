r"""The Monge gap of a map (Uscidda & Cuturi, ICML 2023).

For a reference measure :math:`\mu`, a map :math:`T` and a cost :math:`c`,

.. math::

    \mathcal M^c_\mu(T) = \int c(x, T(x))\,\mathrm d\mu(x) - W_c(\mu, T_\sharp\mu) \;\ge 0,

with equality exactly when :math:`T` is a :math:`c`-optimal map from :math:`\mu` to
:math:`T_\sharp\mu` (for :math:`c = \|x-y\|^2`, the gradient of a convex function, by
Brenier's theorem). Added to a fitting loss, :math:`\Delta(T_\sharp\mu, \nu) + \lambda
\mathcal M(T)`, it pushes a map network towards the optimal transport map among all the
maps that fit :math:`\nu`.

**Estimator** (OTT-JAX ``monge_gap_from_samples``). With the empirical measure
:math:`\hat\mu = \sum_i a_i\delta_{x_i}` and the same weights on the images
:math:`y_i = T(x_i)`,

.. math::

    \hat{\mathcal M}_\varepsilon = \sum_i a_i\, c(x_i, y_i)
        - \Big(\min_{P \in U(a, a)} \langle C, P\rangle - \varepsilon H(P)\Big),
    \qquad C_{ij} = c(x_i, y_j),\quad H(P) = -\sum_{ij} P_{ij}\log P_{ij},

i.e. the entropic OT cost in OTT's ``ent_reg_cost`` convention. In entrokit's
convention (:attr:`entrokit.OTResult.value` :math:`= \langle C,P\rangle + \varepsilon
\mathrm{KL}(P\|a\otimes a)`, the same minimiser) this is

.. math::

    \hat{\mathcal M}_\varepsilon = \sum_i a_i c(x_i, y_i) - \mathrm{value}
        + 2\varepsilon H(a),\qquad H(a) = -\sum_i a_i \log a_i .

**Bounds.** Let :math:`\mathcal M_0 \ge 0` be the unregularized empirical gap
(:math:`W_c` by an exact assignment). Since the diagonal coupling is feasible and
:math:`H(a) \le H(P) \le 2H(a)` for every coupling of :math:`(a, a)`,

.. math::

    \mathcal M_0 + \varepsilon H(a) \;\le\; \hat{\mathcal M}_\varepsilon \;\le\;
    \mathcal M_0 + 2\varepsilon H(a).

So the estimator is always :math:`\ge \varepsilon H(a) > 0` (``eps * log(n)`` for uniform
weights), and for a :math:`c`-optimal map (:math:`\mathcal M_0 = 0`) it lies in
:math:`[\varepsilon\log n, 2\varepsilon\log n]`: an entropic offset that vanishes with
:math:`\varepsilon` and carries no gradient pressure towards any particular map. The OT
value entering the formula is the Sinkhorn dual objective, a lower bound of the entropic
cost at any iterate (weak duality), so an unconverged solve can only *raise* the
estimate: the lower bound holds at any ``tol``.

**Gradients.** The first term is differentiated directly; the OT value by the envelope
theorem (potentials held fixed), which is its exact gradient with respect to the points:
no unrolling, no linear solve.
"""

from __future__ import annotations

import math

import torch

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import (
    as_float_tensor,
    check_nonneg_finite,
    check_positive,
    check_positive_int,
    check_same_dtype_device,
    reject_meta,
    upcast_half,
)
from entrokit.geometry import PointCloud
from entrokit.geometry.pointcloud import _COSTS
from entrokit.problem import OTProblem
from entrokit.solvers.sinkhorn import sinkhorn_result

__all__ = ["monge_gap"]

# rows of the cost evaluated at once when its mean is needed (relative_eps)
_MEAN_CHUNK_ENTRIES = 1 << 22


def _points(x, Tx) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_float_tensor(x, "x")
    Tx = as_float_tensor(Tx, "Tx", like=x if not isinstance(Tx, torch.Tensor) else None)
    check_same_dtype_device({"x": x, "Tx": Tx})
    if Tx.dim() < 2 or x.shape != Tx.shape:
        raise InputError(
            f"x and Tx must have the same shape (..., n, d), Tx[..., i, :] being the image "
            f"T(x[..., i, :]); got x {tuple(x.shape)} and Tx {tuple(Tx.shape)}. Evaluate the map "
            "on the points themselves, Tx = T(x); add a feature axis with x[..., None] for 1-D points."
        )
    return x, Tx


def _weights(a, x: torch.Tensor) -> torch.Tensor:
    """Weights ``(B, n)`` summing to 1, for points flattened to ``(B, n, d)``."""
    batch, n = tuple(x.shape[:-2]), x.shape[-2]
    B = math.prod(batch)
    if a is None:
        return torch.full((B, n), 1.0 / n, dtype=x.dtype, device=x.device)
    a = as_float_tensor(a, "a", like=x if not isinstance(a, torch.Tensor) else None)
    check_same_dtype_device({"x": x, "a": a})
    if a.shape != (n,) and tuple(a.shape) != (*batch, n):
        raise InputError(
            f"a must have shape ({n},) or {(*batch, n)} (one weight per point), got "
            f"{tuple(a.shape)}."
        )
    check_nonneg_finite(a, "a")
    mass = a.sum(-1)
    if bool((mass <= 0).any()):
        raise InputError("weights a have zero total mass; expected a positive sum (at least one weight > 0).")
    a = a / mass.unsqueeze(-1)
    return a.expand(*batch, n).reshape(B, n)


def _cost_fn(cost):
    if isinstance(cost, str):
        if cost not in _COSTS:
            raise InputError(f"cost must be 'sqeuclidean', 'euclidean' or a callable c(x, y); got {cost!r}.")
        return _COSTS[cost]
    if callable(cost):
        return cost
    raise TypeError(f"cost must be a string or a callable c(x, y), got {type(cost).__name__}.")


def _mean_cost(c, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{ij} a_i a_j c(x_i, y_j)` per problem ``(B,)``, detached, in row tiles."""
    with torch.no_grad():
        n = x.shape[-2]
        rows = max(1, _MEAN_CHUNK_ENTRIES // max(n, 1))
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for s in range(0, n, rows):
            C = c(x[:, s : s + rows], y)
            total = total + torch.einsum("bi,bij,bj->b", a[:, s : s + rows], C, a)
    return total


def _gap_geometry(c, xb, yb, w, relative_eps: bool, chunk_size):
    """The point cloud of the gap's OT problem and the cost unit ``scale`` ``(B,)``: 1, or
    with ``relative_eps`` the mean cost (the cost divided by it: solving ``C / s`` at
    ``eps`` is solving ``C`` at ``eps * s``)."""
    if relative_eps:
        scale = _mean_cost(c, xb, yb, w)
        if bool((scale <= 0).any()):
            raise InputError(
                "relative_eps=True needs a positive mean cost between x and Tx, got 0 (every point "
                "of x and Tx coincides); pass an absolute eps instead."
            )
        s = scale.reshape(-1, 1, 1)

        def scaled(u, v):  # solving C / s at eps is solving C at eps * s
            return c(u, v) / s
        geom = PointCloud(xb, yb, scaled, chunk_size=chunk_size)
    else:
        scale = torch.ones(xb.shape[0], dtype=xb.dtype, device=xb.device)
        geom = PointCloud(xb, yb, c, chunk_size=chunk_size)
    return geom, scale


@reject_meta
def monge_gap(
    x,
    Tx,
    *,
    eps: float,
    cost="sqeuclidean",
    a=None,
    relative_eps: bool = False,
    tol: float = 1e-3,
    max_iter: int | None = None,
    chunk_size: int | None = None,
    return_result: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, OTResult]:
    r"""Entropic Monge gap :math:`\hat{\mathcal M}_\varepsilon` of the map ``x -> Tx``
    (OTT-JAX's ``monge_gap_from_samples``; see the module docstring for the formula and
    its bounds).

    Args:
        x: reference points ``[..., n, d]`` (samples of :math:`\mu`; usually constant).
        Tx: their images ``[..., n, d]`` under the map, ``Tx[..., i, :] = T(x[..., i, :])``
            (the map network's output: gradients flow to it).
        eps: entropic regularization :math:`\varepsilon > 0`; absolute, in cost units,
            unless ``relative_eps``.
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`, OTT's default ``SqEuclidean``),
            ``"euclidean"`` or a callable ``c(x, y)`` mapping ``[B, n', d], [B, m', d]`` to
            ``[B, n', m']`` (see :class:`~entrokit.PointCloud`).
        a: weights of the points ``[n]`` or ``[..., n]``, nonnegative; rescaled to sum to 1
            (the gap compares probability measures). ``None``: uniform.
        relative_eps: use :math:`\varepsilon\cdot\sum_{ij}a_ia_jC_{ij}` (``eps`` times the
            mean cost between ``x`` and ``Tx``, per problem, treated as a constant) as the
            regularization, like OTT's ``relative_epsilon="mean"``; OTT's Monge-gap
            tutorial uses ``eps=0.01`` this way.
        tol: L1 marginal tolerance of the Sinkhorn solve (OTT's default threshold,
            ``1e-3``). Couplings close to a permutation (a map near the optimal one, at the
            small ``eps`` a Monge gap uses) put Sinkhorn in its slow, sublinear regime, and
            float32 potentials cannot certify much below ``1e-4`` there; the gap itself
            moves by about ``1e-4`` relative between ``tol=1e-3`` and ``1e-6``. Pass a
            smaller ``tol`` (and float64) for reference values.
        max_iter: Sinkhorn iteration budget (default 10 000).
        chunk_size: compute the cost in tiles of this many rows, never storing the
            ``n x n`` matrix (large ``n``).
        return_result: also return the :class:`~entrokit.OTResult` of the OT problem
            between ``x`` and ``Tx`` (its plan shows how far the map is from optimal). With
            ``relative_eps`` it is the result of the equivalent problem with the cost divided
            by the mean cost, at ``eps``: same plan, values in units of the mean cost.

    Returns:
        The gap, of the batch shape (a 0-d tensor for one point set); with
        ``return_result``, ``(gap, result)``. A solve that misses ``tol`` emits a
        :class:`~entrokit.ConvergenceWarning` (the gap is then an over-estimate).

    Raises:
        InputError: ``x`` and ``Tx`` of different shapes, ``eps <= 0``, weights of the
            wrong shape, negative, non-finite or of zero mass, non-finite points.

    Example:
        >>> import math, torch
        >>> from entrokit.losses.monge_gap import monge_gap
        >>> x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)  # SPD: optimal
        >>> R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)  # rotation
        >>> eps = 1e-3
        >>> bool(monge_gap(x, x @ A, eps=eps) <= 2 * eps * math.log(64))
        True
        >>> bool(monge_gap(x, x @ R, eps=eps) > 1.0)
        True
    """
    eps = check_positive(eps, "eps")
    tol = check_positive(tol, "tol")
    check_positive_int(max_iter, "max_iter", allow_none=True)
    if not isinstance(relative_eps, bool):
        raise TypeError(f"relative_eps must be True or False, got {type(relative_eps).__name__}.")
    c = _cost_fn(cost)
    t, out_dtype = upcast_half(x=x, Tx=Tx, a=a)  # float16/bfloat16: solved in float32
    x, Tx = _points(t["x"], t["Tx"])
    for u, name in ((x, "x"), (Tx, "Tx")):
        check_nonneg_finite(u, name, allow_negative=True)
    batch, (n, d) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    B = math.prod(batch)
    w = _weights(t["a"], x)  # (B, n), unit mass
    xb, yb = x.reshape(B, n, d), Tx.reshape(B, n, d)

    # first term: sum_i a_i c(x_i, T(x_i)), through the same cost function as the OT problem
    diag = PointCloud(xb.reshape(B * n, 1, d), yb.reshape(B * n, 1, d), c).cost_matrix()
    displacement = (w * diag.reshape(B, n)).sum(-1)

    geom, scale = _gap_geometry(c, xb, yb, w, relative_eps, chunk_size)
    # the points and weights are checked: the problem goes straight to the solver
    res = sinkhorn_result(OTProblem(w, w, geom), eps, tol=tol, max_iter=max_iter, grad="envelope")
    ent_a = -torch.special.xlogy(w, w).sum(-1)
    # OTT's ent_reg_cost, <C,P> - eps_eff H(P), in the original cost units
    ent_reg_cost = scale * (res.value - 2.0 * eps * ent_a)
    gap = (displacement - ent_reg_cost).reshape(batch).to(out_dtype or x.dtype)
    return (gap, res) if return_result else gap
