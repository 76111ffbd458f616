r"""Column regularizers :math:`\Omega` for smooth and sparsity-constrained OT.

The primal problem (Blondel, Seguy & Rolet 2018; Liu, Puigcerver & Blondel 2023) is

.. math::

    \mathrm{OT}_\Omega(a, b) = \min_{T \ge 0,\ T\mathbf 1 = a,\ T^\top \mathbf 1 = b}
        \langle T, C\rangle + \sum_j \Omega(t_j),

where :math:`t_j` is column ``j`` of the plan. A solver only needs two conjugates of
:math:`\Omega`, both evaluated on vectors laid out along the **last axis** (every leading
axis is a batch axis):

* :math:`\delta_\Omega(s) = \sup_{y \ge 0} \langle y, s\rangle - \Omega(y)` (dual);
* :math:`\max_\Omega(s; b) = \sup_{y \ge 0,\ \mathbf 1^\top y = b} \langle y, s\rangle -
  \Omega(y)` (semi-dual).

Both are convex in ``s`` (suprema of affine functions), and their gradients are the plan
columns: :math:`t_j = \nabla\delta_\Omega(\alpha + \beta_j\mathbf 1 - c_j)` and
:math:`t_j = \nabla_s \max_\Omega(\alpha - c_j; b_j)` (Danskin).

Three regularizers are provided:

==============================  =====================================================  ==========================================================
:math:`\Omega(t)`               :math:`\delta_\Omega(s)`                                :math:`\nabla_s\max_\Omega(s;b)`
==============================  =====================================================  ==========================================================
:math:`\gamma\sum t\log t`      :math:`\gamma\sum_i e^{s_i/\gamma-1}`                   :math:`b\,\mathrm{softmax}(s/\gamma)`
:math:`\frac\gamma2\|t\|^2`     :math:`\frac1{2\gamma}\|[s]_+\|^2`                      :math:`b\,\mathrm{Proj}_\Delta(s/(\gamma b))`
top-k: :math:`+\iota_{\|t\|_0\le k}`  :math:`\frac1{2\gamma}\sum_{i\in\mathrm{top}_k(s)}[s_i]_+^2`  :math:`b\,\mathrm{Proj}_{\Delta,k}(s/(\gamma b))`
==============================  =====================================================  ==========================================================

with :math:`\max_\Omega(s;b) = b\langle p, s\rangle - \tfrac{\gamma b^2}{2}\|p\|^2` at the
(sparse) simplex projection :math:`p`. The k-sparse projection keeps the ``k`` largest
coordinates and projects them onto the simplex (Kyrillidis et al., 2013), which is exact;
``torch.topk`` selects exactly ``k`` indices even under ties, so every gradient has at most
``k`` nonzeros by construction.

All values are differentiable in ``s`` and ``b`` by Danskin's theorem: the maximiser
``p`` (or the top-k support) is computed without autograd and the value is re-expressed
in closed form around it (the ``stop_gradient`` trick of the reference implementation).
"""

from __future__ import annotations

import math

import torch

from entrokit._errors import InputError
from entrokit._validation import check_positive, check_positive_int

__all__ = [
    "Regularizer",
    "Entropy",
    "SquaredL2",
    "TopKSquaredL2",
    "make_regularizer",
    "simplex_projection_sorted",
    "sparse_simplex_projection",
]


def simplex_projection_sorted(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Euclidean projection onto the unit simplex of vectors already sorted decreasingly.

    Sort-based rule (Held et al. 1974; Duchi et al. 2008): with cumulative sums
    :math:`S_r = \sum_{i\le r} v_{(i)}`, the support size is
    :math:`K = \max\{r : v_{(r)} - (S_r - 1)/r > 0\}`, the threshold
    :math:`\theta = (S_K - 1)/K` and the projection :math:`[v - \theta]_+`.

    Args:
        v: ``(..., k)`` sorted in decreasing order along the last axis.

    Returns:
        ``(p, theta, K)``: projection ``(..., k)``, threshold ``(...)`` and support size
        ``(...)`` (int64, at least 1).
    """
    k = v.shape[-1]
    cs = torch.cumsum(v, -1) - 1.0
    r = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = v - cs / r > 0
    K = cond.sum(-1).clamp_min(1)  # cond holds on a prefix; K >= 1 always
    theta = cs.gather(-1, (K - 1).unsqueeze(-1)).squeeze(-1) / K.to(v.dtype)
    p = (v - theta.unsqueeze(-1)).clamp_min(0.0)
    return p, theta, K


def sparse_simplex_projection(
    u: torch.Tensor, k: int | None = None, *, k_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    r"""Projection of each vector along the last axis onto :math:`\{p\ge 0, \mathbf 1^\top
    p = 1, \|p\|_0 \le k\}`.

    With ``k=None`` this is the plain simplex projection, computed *adaptively*: project
    the ``k_start`` largest entries and, whenever a support fills the whole window, grow
    the window by 4x. When the support is smaller than the window, every discarded entry
    lies below the threshold, so the result is exact.

    Returns:
        ``(p, theta, support, window)``: ``p`` dense like ``u`` (at most ``k`` nonzeros
        per vector), threshold, support size and the window used (reuse it as the next
        ``k_start``).
    """
    n = u.shape[-1]
    if k is not None:
        w = min(k, n)
        vals, idx = torch.topk(u, w, dim=-1, sorted=True)
        pv, theta, K = simplex_projection_sorted(vals)
        p = torch.zeros_like(u).scatter_(-1, idx, pv)
        return p, theta, K, w
    w = min(n, max(1, k_start or 16))
    while True:
        if w == n:
            vals, idx = torch.sort(u, dim=-1, descending=True)
        else:
            vals, idx = torch.topk(u, w, dim=-1, sorted=True)
        pv, theta, K = simplex_projection_sorted(vals)
        if w == n or not bool((K >= w).any()):
            break
        w = min(n, 4 * w)
    p = torch.zeros_like(u).scatter_(-1, idx, pv)
    return p, theta, K, w


class Regularizer:
    r"""A column regularizer :math:`\Omega` with its conjugates (see the module docstring).

    Every method acts on the last axis; leading axes are batch axes. ``b`` has the shape
    of ``s`` without its last axis.

    Attributes:
        gamma: regularization strength :math:`\gamma > 0`.
        name: ``"entropy"``, ``"l2"`` or ``"topk"``.
        sparse: whether plans from this regularizer are sparse.
    """

    name: str = ""
    sparse: bool = False

    def __init__(self, gamma: float):
        self.gamma = check_positive(gamma, "gamma")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma:g})"

    def omega(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\Omega(t)` summed over the last axis (``+inf`` if infeasible)."""
        raise NotImplementedError

    def delta(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(value, grad)`` of :math:`\delta_\Omega(s)`; ``value`` is differentiable."""
        raise NotImplementedError

    def max_omega(self, s: torch.Tensor, b: torch.Tensor, state: dict | None = None):
        r"""``(value, grad, beta)`` of :math:`\max_\Omega(s; b)`.

        ``grad`` is the plan column :math:`t = \nabla_s\max_\Omega(s;b)` (mass ``b``);
        ``beta`` is the multiplier of the mass constraint, so that the same column is
        :math:`\nabla\delta_\Omega(s + \beta)` (the dual potential of the column).
        ``state`` is a dict the solver carries between calls (window sizes).
        """
        raise NotImplementedError


class Entropy(Regularizer):
    r"""Negative entropy :math:`\Omega(t) = \gamma\sum_i t_i\log t_i` (POT's ``NegEntropy``).

    :math:`\delta(s) = \gamma\sum_i e^{s_i/\gamma - 1}`,
    :math:`\max(s;b) = \gamma b\,\mathrm{logsumexp}(s/\gamma) - \gamma b\log b`.
    """

    name = "entropy"
    sparse = False

    def omega(self, t):
        return self.gamma * torch.special.xlogy(t, t).sum(-1)

    def delta(self, s):
        G = torch.exp(s / self.gamma - 1.0)
        return self.gamma * G.sum(-1), G.detach()

    def max_omega(self, s, b, state=None):
        g = self.gamma
        lse = torch.logsumexp(s / g, dim=-1)
        val = g * b * lse - g * torch.special.xlogy(b, b)
        t = (b.unsqueeze(-1) * torch.softmax(s / g, dim=-1)).detach()
        # t = exp((s + beta)/g - 1)  =>  beta = g (1 + log b - lse)   (b > 0)
        beta = torch.where(b > 0, g * (1.0 + torch.log(torch.where(b > 0, b, torch.ones_like(b))) - lse),
                           torch.full_like(b, -math.inf)).detach()
        return val, t, beta


class SquaredL2(Regularizer):
    r"""Quadratic regularization :math:`\Omega(t) = \frac\gamma2\|t\|^2` (POT's ``SquaredL2``).

    :math:`\delta(s) = \frac{1}{2\gamma}\|[s]_+\|^2`, :math:`\nabla\delta(s) = [s]_+/\gamma`;
    :math:`\max(s;b) = b\langle p,s\rangle - \frac{\gamma b^2}2\|p\|^2` with
    :math:`p = \mathrm{Proj}_\Delta(s/(\gamma b))`.
    """

    name = "l2"
    sparse = True
    k: int | None = None

    def omega(self, t):
        return 0.5 * self.gamma * (t * t).sum(-1)

    def _top(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return s, None

    def delta(self, s):
        vals, idx = self._top(s)
        pos = vals.clamp_min(0.0)
        val = (pos * pos).sum(-1) / (2 * self.gamma)
        G = pos.detach() / self.gamma
        if idx is not None:
            G = torch.zeros_like(s, requires_grad=False).scatter_(-1, idx, G)
        return val, G

    def max_omega(self, s, b, state=None):
        g = self.gamma
        pos = b > 0
        bs = torch.where(pos, b, torch.ones_like(b)).detach()
        with torch.no_grad():
            u = s.detach() / (g * bs.unsqueeze(-1))
            k_start = None if state is None else state.get("window")
            p, theta, K, w = sparse_simplex_projection(u, self.k, k_start=k_start)
            if state is not None and self.k is None:
                state["window"] = w
            p = p * pos.unsqueeze(-1)
        # Danskin: p is held fixed, value is exact and so are its first derivatives
        val = b * (s * p).sum(-1) - 0.5 * g * b * b * (p * p).sum(-1)
        t = b.detach().unsqueeze(-1) * p
        # t = [s - g b theta]_+ / g on the support => beta = -g b theta
        beta = torch.where(pos, -g * bs * theta, torch.full_like(theta, -math.inf))
        return val, t, beta


class TopKSquaredL2(SquaredL2):
    r"""Sparsity-constrained quadratic regularization (Liu, Puigcerver & Blondel 2023).

    :math:`\Omega_k(t) = \frac\gamma2\|t\|^2 + \iota\{\|t\|_0 \le k\}`.
    :math:`\delta_k(s) = \frac{1}{2\gamma}\sum_{i\in\mathrm{top}_k(s)}[s_i]_+^2` and
    :math:`\max_k(s;b)` uses the k-sparse simplex projection; every column of the plan
    has at most ``k`` nonzeros. ``k = 1`` gives unregularized OT (the convex envelope of
    :math:`\Omega_1` on the simplex of mass ``b`` is the constant :math:`\frac\gamma2 b^2`),
    ``k >= n`` gives :class:`SquaredL2`.
    """

    name = "topk"

    def __init__(self, gamma: float, k: int):
        super().__init__(gamma)
        self.k = check_positive_int(k, "k")

    def __repr__(self) -> str:
        return f"TopKSquaredL2(gamma={self.gamma:g}, k={self.k})"

    def omega(self, t):
        nnz = (t != 0).sum(-1)
        val = 0.5 * self.gamma * (t * t).sum(-1)
        return torch.where(nnz <= self.k, val, torch.full_like(val, math.inf))

    def _top(self, s):
        if self.k >= s.shape[-1]:
            return s, None
        with torch.no_grad():
            idx = torch.topk(s.detach(), self.k, dim=-1, sorted=False).indices
        return s.gather(-1, idx), idx


def make_regularizer(reg, gamma: float, k: int | None = None) -> Regularizer:
    """Build a regularizer from its name (``"entropy"``, ``"l2"``, ``"topk"``) or pass one through."""
    if isinstance(reg, Regularizer):
        if k is not None:
            raise InputError("k is given twice: pass it either in the Regularizer object or as k=, not both.")
        return reg
    if not isinstance(reg, str):
        raise TypeError(f"reg must be a string or a Regularizer, got {type(reg).__name__}.")
    if reg == "topk":
        if k is None:
            raise InputError(
                "reg='topk' needs k, the maximum number of nonzeros per column (row with "
                "sparse_axis='rows'); pass e.g. k=2."
            )
        return TopKSquaredL2(gamma, k)
    if k is not None:
        raise InputError(f"k={k!r} only applies to reg='topk'; got reg={reg!r}. Drop k or use reg='topk'.")
    if reg == "l2":
        return SquaredL2(gamma)
    if reg == "entropy":
        return Entropy(gamma)
    raise InputError(f"reg must be one of 'l2', 'topk', 'entropy'; got {reg!r}.")
