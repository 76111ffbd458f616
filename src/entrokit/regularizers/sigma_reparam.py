r"""σReparam: spectral reparameterisation of linear layers (Zhai et al., ICML 2023).

Every weight is used as

.. math::

    \hat W = \frac{\gamma}{\sigma(W)}\, W ,

with :math:`\sigma(W)` the spectral norm estimated by power iteration and :math:`\gamma` a
learned scalar. Following the reference code (apple/ml-sigma-reparam, ``vision/layers.py``):

* the power-iteration vector :math:`u` is a persistent buffer, initialised to the top right
  singular vector from an exact SVD, and :math:`\gamma` is initialised to the exact
  :math:`\sigma(W_0)`, so :math:`\hat W = W` at initialisation;
* each *training* forward does one step without gradient,
  :math:`v \leftarrow W u/\lVert W u\rVert`, :math:`u \leftarrow W^\top v/\lVert W^\top v\rVert`,
  and :math:`\sigma = v^\top W u` is computed *with* gradient w.r.t. :math:`W`;
* in eval mode no state changes: :math:`\sigma = \lVert W u\rVert` with the stored :math:`u`
  (the reference code also takes an unsaved extra step in eval; the two agree once the
  iteration has converged).

Capping :math:`\lVert \hat W_Q \hat W_K^\top\rVert_2 \le \gamma_Q\gamma_K` bounds the attention
logits, which puts a floor under the attention entropy and prevents entropy collapse
(the paper's lower bound on attention entropy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError

__all__ = [
    "spectral_norm_step",
    "SigmaReparamLinear",
    "SigmaReparam",
    "convert_to_sigma_reparam",
]


def spectral_norm_step(
    weight: torch.Tensor, u: torch.Tensor, *, update: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One power-iteration step and the differentiable spectral-norm estimate.

    Args:
        weight: ``(out, in)`` matrix (higher-rank weights are flattened to ``(out, -1)``).
        u: ``(in,)`` unit vector from the previous step.
        update: do the step (training); if False return :math:`\lVert W u\rVert` and ``u``.

    Returns:
        ``(sigma, u_new)``: scalar :math:`v^\top W u` (gradient flows to ``weight`` only) and
        the new right vector (no gradient).
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(u, torch.Tensor):
        raise TypeError(
            f"weight and u must be torch.Tensors, got {type(weight).__name__} and {type(u).__name__}."
        )
    if weight.ndim < 2:
        raise InputError(
            f"weight must be a matrix (out, in) or a higher-rank weight, got shape "
            f"{tuple(weight.shape)}."
        )
    w = weight.reshape(weight.shape[0], -1)
    if u.shape != (w.shape[1],):
        raise InputError(
            f"u must have shape ({w.shape[1]},) (one entry per input feature of weight "
            f"{tuple(weight.shape)}), got {tuple(u.shape)}; start from a random unit vector, e.g. "
            f"F.normalize(torch.randn({w.shape[1]}), dim=0)."
        )
    with torch.no_grad():
        v = F.normalize(w.detach() @ u, dim=0)
        if update:
            u = F.normalize(w.detach().t() @ v, dim=0)
    return torch.einsum("o,oi,i->", v, w, u), u


def _svd_init(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().reshape(weight.shape[0], -1)
    _, s, vh = torch.linalg.svd(w.to(torch.float64) if w.dtype != torch.float64 else w, full_matrices=False)
    return s[0].to(weight.dtype), vh[0].to(weight.dtype)


class _SigmaReparamMixin:
    u: torch.Tensor
    sigma: torch.Tensor
    gamma: nn.Parameter
    training: bool

    def _init_sigma_state(self, weight: torch.Tensor) -> None:
        s0, u0 = _svd_init(weight)
        self.register_buffer("u", u0.clone())  # type: ignore[attr-defined]
        self.register_buffer("sigma", s0.clone().reshape(()))  # type: ignore[attr-defined]
        self.gamma = nn.Parameter(s0.clone().reshape(()))  # γ₀ = σ(W₀) ⇒ Ŵ = W at init

    def _reparam_weight(self, weight: torch.Tensor) -> torch.Tensor:
        sigma, u = spectral_norm_step(weight, self.u, update=self.training)
        if self.training:
            with torch.no_grad():
                self.u.copy_(u)
                self.sigma.copy_(sigma.detach())
        return weight * (self.gamma / sigma)

    @property
    def effective_spectral_norm(self) -> torch.Tensor:
        """|γ|: the spectral norm of Ŵ once the power iteration has converged."""
        return self.gamma.detach().abs()


class SigmaReparamLinear(_SigmaReparamMixin, nn.Linear):
    r"""Drop-in ``nn.Linear`` with σReparam: :math:`y = x \hat W^\top + b`, :math:`\hat W = (\gamma/\sigma(W)) W`.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        init_std: if not None, re-initialise ``weight`` with a truncated normal of this std
            (reference code: 0.02 × gain); None keeps PyTorch's default ``nn.Linear`` init.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.

    State:
        ``gamma`` (parameter, scalar), buffers ``u`` ``(in_features,)`` and ``sigma`` (last
        σ estimate). All go into ``state_dict``.

    Examples:
        >>> lin = SigmaReparamLinear(16, 8)
        >>> lin(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if init_std is not None:
            if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not (
                math.isfinite(init_std) and init_std > 0
            ):
                raise InputError(
                    f"init_std must be a finite number > 0 or None, got {init_std!r}; use e.g. "
                    "init_std=0.02, or None to keep nn.Linear's default initialisation."
                )
            with torch.no_grad():
                nn.init.trunc_normal_(self.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        self._init_sigma_state(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SigmaReparamLinear:
        """Build from an existing ``nn.Linear``, copying its weight and bias (Ŵ = W)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}.")
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype, init_std=None)
        with torch.no_grad():
            new.weight.copy_(w)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new._init_sigma_state_replace()
        return new

    def _init_sigma_state_replace(self) -> None:
        s0, u0 = _svd_init(self.weight)
        with torch.no_grad():
            self.u.copy_(u0)
            self.sigma.copy_(s0)
            self.gamma.copy_(s0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self._reparam_weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sigma_reparam=True"


class SigmaReparam(_SigmaReparamMixin, nn.Module):
    r"""Wrap an existing ``nn.Linear`` (sharing its parameters) with σReparam.

    ``SigmaReparam(lin)(x) == F.linear(x, (γ/σ(W)) W, b)`` where ``W, b`` are ``lin``'s own
    parameters; γ starts at σ(W), so the wrapped layer computes exactly what ``lin`` did.

    Args:
        module: the ``nn.Linear`` to wrap.

    Shape:
        Same as ``module``.
    """

    def __init__(self, module: nn.Linear) -> None:
        super().__init__()
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"SigmaReparam wraps nn.Linear, got {type(module).__name__}; for other layers "
                "apply spectral_norm_step to their weight yourself."
            )
        self.module = module
        self._init_sigma_state(module.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def reparametrized_weight(self) -> torch.Tensor:
        """Ŵ using the stored ``u`` (no power step, no state change)."""
        sigma, _ = spectral_norm_step(self.module.weight, self.u, update=False)
        return self.module.weight * (self.gamma / sigma)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self._reparam_weight(self.module.weight), self.module.bias)


def convert_to_sigma_reparam(
    model: nn.Module, *, exclude: Iterable[str] = (), wrap: bool = False
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) by a σReparam layer; returns ``model``.

    Weights are kept, so the converted model computes the same function at conversion time.
    Linear layers owned by ``nn.MultiheadAttention`` are skipped (it reads ``out_proj.weight``
    directly, bypassing the submodule's forward); use a custom attention block to reparameterise
    those.

    Args:
        model: module to convert.
        exclude: qualified names (as in ``named_modules``) to leave unchanged.
        wrap: use :class:`SigmaReparam` wrappers instead of :class:`SigmaReparamLinear`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if isinstance(model, nn.Linear):
        raise InputError(
            "model is itself an nn.Linear; convert it with SigmaReparamLinear.from_linear(model)."
        )
    excluded = set(exclude)

    def visit(parent: nn.Module, prefix: str) -> None:
        if isinstance(parent, (nn.MultiheadAttention, SigmaReparam)):
            return
        for cname, child in list(parent.named_children()):
            q = f"{prefix}.{cname}" if prefix else cname
            if q in excluded:
                continue
            if type(child) is nn.Linear:
                setattr(parent, cname, SigmaReparam(child) if wrap else SigmaReparamLinear.from_linear(child))
            else:
                visit(child, q)

    visit(model, "")
    return model
