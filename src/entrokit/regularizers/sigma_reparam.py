r"""σReparam: spectral reparameterisation of linear and 2-d convolution layers (Zhai et al., ICML 2023).

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
* a zero weight has :math:`\sigma = 0`; there :math:`\gamma/\sigma` is taken as 1, so
  :math:`\hat W = W = 0` (no NaN) and the weight receives the plain layer's gradient until it
  is non-zero (the power-iteration vector is kept meanwhile);
* in eval mode no state changes: :math:`\sigma = \lVert W u\rVert` with the stored :math:`u`
  (the reference code also takes an unsaved extra step in eval; the two agree once the
  iteration has converged).
* the power iteration and :math:`\sigma` run in (at least) float32 with autocast switched
  off, so under ``torch.autocast`` (bfloat16/float16) :math:`u` and :math:`\sigma` keep
  float32 accuracy (the reference has an ``FP32SpectralNormedWeight`` wrapper for the same
  purpose). The layer's own matmul/convolution still runs in the autocast dtype.

**Conv2d.** A convolution weight of shape ``(out, in/groups, kh, kw)`` is normalised by the
spectral norm of its *flattened* matrix ``W.reshape(out, in/groups*kh*kw)``, the
definition of the reference code (its ``SNConv2d`` is an ``SNLinear`` with
``in_features = in*kh*kw`` whose weight is viewed as a kernel). This is the largest
singular value of the kernel matrix, not the operator norm of the convolution acting on
images (the two coincide for 1x1 kernels).

**Re-initialisation.** The reference recipe (``convert_to_sn`` in ``vision/layers.py``)
*replaces* every Linear/Conv2d by a freshly built layer: weight
:math:`\sim\mathcal N(0, (0.02\,g)^2)` through ``nn.init.trunc_normal_`` with its default
bounds :math:`[-2, 2]` (absolute, so practically untruncated), with gain :math:`g` per
layer type, and the bias of a new ``nn.Linear`` (:math:`\mathcal U(\pm 1/\sqrt{\text{fan}_{in}})`).
:func:`convert_to_sigma_reparam` keeps the trained weights by default and does this with
``reinit=True``.

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
from entrokit._validation import (
    check_layer_input,
    check_positive,
    no_autocast,
    reject_meta,
    working_dtype,
)

__all__ = [
    "spectral_norm_step",
    "SigmaReparamLinear",
    "SigmaReparamConv2d",
    "SigmaReparam",
    "convert_to_sigma_reparam",
]


def spectral_norm_step(
    weight: torch.Tensor, u: torch.Tensor, *, update: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One power-iteration step and the differentiable spectral-norm estimate.

    With :math:`W` the weight flattened to ``(out, -1)``:
    :math:`v = Wu/\lVert Wu\rVert`, :math:`u' = W^\top v/\lVert W^\top v\rVert` (no gradient)
    and :math:`\sigma = v^\top W u'` (gradient w.r.t. ``weight``;
    :math:`\partial\sigma/\partial W = v u'^\top`).

    The step runs with autocast switched off, in float32 for float32/float16/bfloat16
    weights (float64 for float64), so ``torch.autocast`` never lowers its precision.

    Args:
        weight: ``(out, in)`` matrix; higher-rank weights (e.g. a Conv2d kernel
            ``(out, in/groups, kh, kw)``) are flattened to ``(out, -1)``.
        u: ``(in,)`` unit vector from the previous step (``in`` = flattened input size).
        update: do the step (training); if False return :math:`\lVert W u\rVert` and ``u``.

    Returns:
        ``(sigma, u_new)``: scalar :math:`\sigma` in the compute dtype (float32 or float64;
        gradient flows to ``weight`` only) and the new right vector in that dtype (no
        gradient).
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(u, torch.Tensor):
        raise TypeError(
            f"weight and u must be torch.Tensors, got {type(weight).__name__} and {type(u).__name__}."
        )
    if weight.device.type == "meta" or u.device.type == "meta":
        raise InputError("weight and u must hold values (not meta tensors); materialise the module first.")
    if weight.numel() == 0:
        raise InputError(f"weight is empty (shape {tuple(weight.shape)}): the spectral norm needs at least one entry.")
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
    cdt = working_dtype(weight.dtype)
    with no_autocast():
        wc = w.to(cdt)  # differentiable cast; a no-op for float32/float64 weights
        with torch.no_grad():
            uc = u.detach().to(cdt)
            v = F.normalize(wc.detach() @ uc, dim=0)
            if update:
                new = F.normalize(wc.detach().t() @ v, dim=0)
                # a zero weight gives u' = 0: keep u, so the iteration resumes once W != 0
                uc = torch.where(new.abs().sum() > 0, new, uc)
        sigma = torch.einsum("o,oi,i->", v, wc, uc)
    return sigma, uc


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
        if weight.numel() == 0:
            raise InputError(
                f"σReparam needs a weight with at least one entry, got shape {tuple(weight.shape)} "
                "(a zero in_features/out_features or channel count): the spectral norm of an empty "
                "matrix is undefined. Use sizes >= 1, or a plain nn.Linear / nn.Conv2d for an empty layer."
            )
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
        # gamma / sigma is a 0-dim float32 (or float64) factor; the product keeps weight's dtype.
        # sigma = 0 (a zero weight): the factor is 1, so W_hat = W = 0 and the weight gets the
        # plain layer's gradient until it is non-zero (gamma / 0 would give NaN outputs)
        positive = sigma > 0
        safe = torch.where(positive, sigma, torch.ones_like(sigma))
        factor = torch.where(positive, self.gamma / safe, torch.ones_like(sigma))
        return weight * factor.to(weight.dtype)

    def _init_weight(self, init_std: Any, layer: str) -> None:
        """End of a layer's ``__init__``: the reference re-initialisation of ``weight``
        (``init_std``; ``None`` keeps PyTorch's), then u, σ and γ from it."""
        if init_std is not None:
            _reference_weight_init(self.weight, _check_init_std(init_std, layer))  # type: ignore[attr-defined]
        self._init_sigma_state(self.weight)  # type: ignore[attr-defined]

    @classmethod
    def _copy_of(cls, layer: nn.Module, base: type, config: Any) -> Any:
        """A new layer with the configuration ``config(layer)`` whose weight and bias are
        copies of those of ``layer`` (an instance of ``base``), so Ŵ = W."""
        if not isinstance(layer, base):
            raise TypeError(f"expected nn.{base.__name__}, got {type(layer).__name__}.")
        w = layer.weight
        new = cls(**config(layer), bias=layer.bias is not None, device=w.device, dtype=w.dtype, init_std=None)
        with torch.no_grad():
            new.weight.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new._reset_sigma_state(new.weight)
        return new

    def _reset_sigma_state(self, weight: torch.Tensor) -> None:
        """u, σ and γ from an exact SVD of ``weight`` (so Ŵ = W again)."""
        s0, u0 = _svd_init(weight)
        with torch.no_grad():
            self.u.copy_(u0)
            self.sigma.copy_(s0)
            self.gamma.copy_(s0)

    @property
    def effective_spectral_norm(self) -> torch.Tensor:
        """|γ|: the spectral norm of Ŵ once the power iteration has converged."""
        return self.gamma.detach().abs()


class SigmaReparamLinear(_SigmaReparamMixin, nn.Linear):
    r"""Drop-in ``nn.Linear`` with σReparam: :math:`y = x \hat W^\top + b`, :math:`\hat W = (\gamma/\sigma(W)) W`.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        init_std: if not None, re-initialise ``weight`` as the reference ``SNLinear`` does,
            ``nn.init.trunc_normal_(weight, std=init_std)`` (default bounds ±2, absolute;
            reference: 0.02 × gain); None keeps PyTorch's default ``nn.Linear`` init.

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
        self._init_weight(init_std, "nn.Linear")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SigmaReparamLinear:
        """Build from an existing ``nn.Linear``, copying its weight and bias (Ŵ = W)."""
        return cls._copy_of(linear, nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features))

    @reject_meta
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_layer_input(input, self.weight, type(self).__name__, features=self.in_features)
        return F.linear(input, self._reparam_weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sigma_reparam=True"


class SigmaReparamConv2d(_SigmaReparamMixin, nn.Conv2d):
    r"""Drop-in ``nn.Conv2d`` with σReparam: the kernel is used as :math:`\hat W = (\gamma/\sigma(W))\,W`.

    :math:`\sigma(W)` is the spectral norm of the flattened kernel
    ``W.reshape(out_channels, in_channels // groups * kh * kw)`` (the reference definition,
    see the module docstring), estimated by one power step per training forward.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype: as for ``nn.Conv2d``.
        init_std: if not None, re-initialise ``weight`` as the reference ``SNConv2d`` does,
            ``nn.init.trunc_normal_(weight, std=init_std)`` (reference: 0.02 × gain); None
            keeps PyTorch's default ``nn.Conv2d`` init.

    Shape:
        As ``nn.Conv2d``: input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)``.

    State:
        ``gamma`` (parameter, scalar), buffers ``u`` ``(in_channels // groups * kh * kw,)``
        and ``sigma``.

    Examples:
        >>> conv = SigmaReparamConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
            device=device, dtype=dtype,
        )
        self._init_weight(init_std, "nn.Conv2d")

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> SigmaReparamConv2d:
        """Build from an existing ``nn.Conv2d``, copying its weight and bias (Ŵ = W)."""
        return cls._copy_of(conv, nn.Conv2d, lambda m: dict(
            in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
        ))

    @reject_meta
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_layer_input(input, self.weight, type(self).__name__, features=self.in_channels, ranks=(3, 4))
        return self._conv_forward(input, self._reparam_weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sigma_reparam=True"


class SigmaReparam(_SigmaReparamMixin, nn.Module):
    r"""Wrap an existing ``nn.Linear`` or ``nn.Conv2d`` (sharing its parameters) with σReparam.

    ``SigmaReparam(lin)(x) == F.linear(x, (γ/σ(W)) W, b)`` where ``W, b`` are ``lin``'s own
    parameters (for a Conv2d, its own convolution with the kernel ``(γ/σ(W)) W``, σ of the
    flattened kernel); γ starts at σ(W), so the wrapped layer computes exactly what the
    module did.

    Args:
        module: the ``nn.Linear`` or ``nn.Conv2d`` to wrap.

    Shape:
        Same as ``module``.
    """

    def __init__(self, module: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(
                f"SigmaReparam wraps nn.Linear or nn.Conv2d, got {type(module).__name__}; for "
                "other layers apply spectral_norm_step to their weight yourself."
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

    @reject_meta
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = self._reparam_weight(self.module.weight)
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(input, w, self.module.bias)
        return F.linear(input, w, self.module.bias)


def _check_init_std(value: Any, layer: str) -> float:
    return check_positive(value, "init_std", example=f"init_std=0.02, or None to keep {layer}'s default initialisation")


def _check_gain(value: Any, name: str) -> float:
    return check_positive(value, name, example=f"{name}=1.0 (the reference re-initialises with std 0.02 * {name})")


def _reference_weight_init(weight: torch.Tensor, std: float) -> None:
    """``trunc_normal_(weight, std=std)`` with PyTorch's default bounds [-2, 2], as the reference."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, std=std)


def _reference_bias_init(bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    """The bias of a freshly built ``nn.Linear``/``nn.Conv2d``: U(±1/sqrt(fan_in))."""
    if bias is None:
        return
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        nn.init.uniform_(bias, -bound, bound)


def convert_to_sigma_reparam(
    model: nn.Module,
    *,
    exclude: Iterable[str] = (),
    wrap: bool = False,
    include_conv2d: bool = True,
    reinit: bool = False,
    linear_init_gain: float = 1.0,
    conv_init_gain: float = 1.0,
) -> nn.Module:
    r"""Replace every ``nn.Linear`` and ``nn.Conv2d`` in ``model`` (in place) by a σReparam layer.

    Returns ``model``. By default the weights are kept, so the converted model computes the
    same function at conversion time (γ = σ(W) ⇒ Ŵ = W).

    With ``reinit=True`` every converted layer is re-initialised as the reference recipe
    (``convert_to_sn``, which builds new layers) does: weight
    ``nn.init.trunc_normal_(std=0.02 * gain)`` (default bounds ±2; gain
    ``linear_init_gain`` for Linear and ``conv_init_gain`` for Conv2d, the reference's
    ``linear_init_gain``/``conv_init_gain``), bias drawn as for a new layer,
    :math:`\mathcal U(\pm 1/\sqrt{\text{fan}_{in}})`, then u, σ and γ from the SVD of the new
    weight. The draws use the global torch RNG (seed it with ``torch.manual_seed``).

    Linear layers owned by ``nn.MultiheadAttention`` are skipped (it reads ``out_proj.weight``
    directly, bypassing the submodule's forward); use a custom attention block to reparameterise
    those. Only exact ``nn.Linear`` / ``nn.Conv2d`` instances are converted (not subclasses).

    Args:
        model: module to convert.
        exclude: qualified names (as in ``named_modules``) to leave unchanged.
        wrap: use :class:`SigmaReparam` wrappers instead of :class:`SigmaReparamLinear` /
            :class:`SigmaReparamConv2d`.
        include_conv2d: also convert ``nn.Conv2d`` (the reference converts Linear and Conv2d).
        reinit: re-initialise the converted layers as the reference recipe does.
        linear_init_gain, conv_init_gain: gains of the re-initialisation std (``reinit=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if isinstance(model, nn.Linear):
        raise InputError(
            "model is itself an nn.Linear; convert it with SigmaReparamLinear.from_linear(model)."
        )
    if isinstance(model, nn.Conv2d):
        raise InputError(
            "model is itself an nn.Conv2d; convert it with SigmaReparamConv2d.from_conv2d(model)."
        )
    for name, flag in (("wrap", wrap), ("include_conv2d", include_conv2d), ("reinit", reinit)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}.")
    gains = {
        nn.Linear: _check_gain(linear_init_gain, "linear_init_gain"),
        nn.Conv2d: _check_gain(conv_init_gain, "conv_init_gain"),
    }
    excluded = set(exclude)
    targets: tuple[type, ...] = (nn.Linear, nn.Conv2d) if include_conv2d else (nn.Linear,)

    def convert(child: nn.Module) -> nn.Module:
        kind = type(child)
        if reinit:
            _reference_weight_init(child.weight, 0.02 * gains[kind])
            _reference_bias_init(child.bias, child.weight)
        if wrap:
            return SigmaReparam(child)
        if kind is nn.Linear:
            return SigmaReparamLinear.from_linear(child)
        return SigmaReparamConv2d.from_conv2d(child)

    def visit(parent: nn.Module, prefix: str) -> None:
        if isinstance(parent, (nn.MultiheadAttention, SigmaReparam)):
            return
        for cname, child in list(parent.named_children()):
            q = f"{prefix}.{cname}" if prefix else cname
            if q in excluded:
                continue
            if type(child) in targets:
                setattr(parent, cname, convert(child))
            else:
                visit(child, q)

    visit(model, "")
    return model
