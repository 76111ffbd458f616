r"""A dense cost held as attention logits: the geometry of the Sinkhorn attention and
matching layers (:mod:`entrokit.nn`).

For scores :math:`L` at temperature :math:`\varepsilon_0` the cost is
:math:`C = -\varepsilon_0 L`, and the entropic plan at :math:`\varepsilon = \varepsilon_0`
is :math:`P_{ij} = a_i b_j e^{(f_i + g_j)/\varepsilon + L_{ij}}` (Sander et al., AISTATS
2022, eq. 5): the soft-min never forms :math:`C`.
"""

from __future__ import annotations

import torch

from entrokit.geometry.base import log_weights, logsumexp_pair
from entrokit.geometry.dense import DenseCost

__all__ = ["LogitCost"]


class LogitCost(DenseCost):
    r"""Dense cost :math:`C = -\varepsilon_0 L` held as its logits :math:`L` (attention
    scores divided by the temperature :math:`\varepsilon_0`; ``-inf`` marks a forbidden
    pair, :math:`C = +\infty`).

    The soft-min is one broadcast add and one fused ``torch.logsumexp`` (the same update
    as :class:`DenseCost`'s, with fewer passes over the :math:`n\times m` numbers and one
    saved tensor per update under autograd); the plan
    :math:`a_i b_j e^{(f_i + g_j)/\varepsilon + L_{ij}}` is formed in one buffer, so the
    implicit backward's mat-vecs and residual stay cheap. Every live row and column must
    hold a finite logit (the layers give empty rows/columns zero weight and logit 0).
    Log-sum-exp updates only (no scaling engine).
    """

    def __init__(self, logits: torch.Tensor, eps: float):
        self.L = logits
        self.eps0 = float(eps)

    @property
    def C(self) -> torch.Tensor:  # the cost, built on demand (plans, implicit backward)
        return self.L * (-self.eps0)

    def __repr__(self) -> str:
        return f"LogitCost(shape={tuple(self.L.shape)}, eps={self.eps0:g}, dtype={self.L.dtype})"

    @property
    def _stored(self) -> torch.Tensor:
        return self.L

    def reshape_batch(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return LogitCost(self.L.reshape(*batch_shape, *self.shape), self.eps0)

    def detach(self) -> LogitCost:
        return LogitCost(self.L.detach(), self.eps0)

    def tensors(self):
        return (self.L,)

    def rebuild(self, L):
        return LogitCost(L, self.eps0)

    def cost_bounds(self):
        flat = self.C.detach().flatten(-2)
        return flat.amin(-1), flat.amax(-1)

    def _logits(self, eps):
        return self.L if eps == self.eps0 else self.L * (self.eps0 / eps)

    def _z(self, h, log_w, eps, axis):
        hw = h / eps + log_w
        return (hw.unsqueeze(-2) if axis == 1 else hw.unsqueeze(-1)) + self._logits(eps)

    def lse(self, h, log_w, eps, axis):
        return logsumexp_pair(self._z(h, log_w, eps, axis), dim=-1 if axis == 1 else -2)

    def softmin(self, h, log_w, eps, axis):
        r""":math:`-\varepsilon \log\sum e^{z}` with :math:`z = L + h/\varepsilon + \log w`,
        as :math:`-\varepsilon(m + \log\sum e^{z - m})`, :math:`m = \max z` (a constant
        shift). The exponentials overwrite :math:`z` (one :math:`n\times m` buffer), and under
        autograd they are the saved tensor, so the backward is one product
        (``torch.logsumexp`` saves :math:`z` and recomputes the exponentials). A slice that is
        entirely ``-inf`` gives :math:`+\infty`, as ``torch.logsumexp`` does."""
        dim = -1 if axis == 1 else -2
        z = self._z(h, log_w, eps, axis)
        # an all -inf slice: a finite shift keeps exp(z - m) = 0 and the result +inf
        m = z.detach().amax(dim=dim, keepdim=True).clamp_min_(torch.finfo(z.dtype).min)
        e = z.sub_(m).exp_()  # z is a temporary (autograd keeps only e)
        return (e.sum(dim).log() + m.squeeze(dim)).mul(-eps)

    def plan(self, f, g, a, b, eps):
        r""":math:`P = \exp(L + (f/\varepsilon + \log a)_i + (g/\varepsilon + \log b)_j)` in three
        passes; the weights enter through their logs (zero weights give exact zeros and no
        gradient)."""
        row = (f / eps + log_weights(a)).unsqueeze(-1)
        col = (g / eps + log_weights(b)).unsqueeze(-2)
        return torch.add(self._logits(eps), row).add_(col).exp_()  # one n x m buffer

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        P = self.plan(f, g, a, b, eps)
        if round_to is not None:
            P = P.to(round_to)
        C = self.C
        if accumulate is not None and accumulate != P.dtype:
            P, C = P.to(accumulate), C.to(accumulate)
        PC = torch.where(P > 0, P * C, torch.zeros_like(P))  # forbidden pairs: 0 * inf
        return P.sum(-1), P.sum(-2), PC.sum((-2, -1))

    def scaling_engine(self, a, b, log_a, log_b):
        return None  # log-sum-exp updates only
