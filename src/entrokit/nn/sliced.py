r"""Sliced Wasserstein loss as a :class:`torch.nn.Module`.

.. math::

    \mathcal L(x, y) = \mathrm{SW}_p(\mu_x, \nu_y)
    = \Big(\mathbb E_{\theta \sim \mathcal U(\mathbb S^{d-1})}
        W_p^p(\theta_\sharp\mu_x, \theta_\sharp\nu_y)\Big)^{1/p},

estimated with ``n_projections`` fresh random directions at every call, optionally with
the Gaussian control variates of Nguyen & Ho (ICLR 2024). See
:mod:`entrokit.losses.sliced` for the estimators.
"""

from __future__ import annotations

import torch

from entrokit._validation import check_generator, check_positive_int, reject_meta
from entrokit.losses.sliced import (
    _check_control_variate,
    _check_p,
    sliced_wasserstein,
)

__all__ = ["SlicedWassersteinLoss"]


class SlicedWassersteinLoss(torch.nn.Module):
    r"""Module wrapper of :func:`~entrokit.losses.sliced.sliced_wasserstein`.

    Stores the options (checked here, once) and draws new directions at every forward
    call from ``generator`` (or the global RNG).

    Args:
        n_projections: number of random directions ``L`` per call, an int >= 1.
        p: ground-cost exponent, a real >= 1; the loss is :math:`\mathrm{SW}_p`.
        control_variate: None, ``"lower"`` or ``"upper"`` (``p = 2`` only).
        generator: optional :class:`torch.Generator` for the directions; its state advances
            at every call. It is not part of the ``state_dict``.

    Shape:
        - x: ``[n, d]`` or ``[B, n, d]``; y: ``[m, d]`` or ``[B, m, d]``.
        - a, b (optional weights): ``[n]`` / ``[B, n]`` and ``[m]`` / ``[B, m]``.
        - output: scalar, or ``[B]`` for batched inputs.

    Example:
        >>> import torch
        >>> from entrokit.nn.sliced import SlicedWassersteinLoss
        >>> g = torch.Generator().manual_seed(0)
        >>> loss = SlicedWassersteinLoss(n_projections=20, control_variate="lower", generator=g)
        >>> x = torch.randn(64, 3, generator=g, requires_grad=True)
        >>> loss(x, torch.randn(80, 3, generator=g) + 2).backward()
        >>> x.grad.shape
        torch.Size([64, 3])
    """

    def __init__(
        self,
        n_projections: int = 100,
        p: float = 2,
        control_variate: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.n_projections = check_positive_int(n_projections, "n_projections")
        self.p = _check_p(p)
        _check_control_variate(control_variate, self.p)
        self.control_variate = control_variate
        check_generator(generator)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"n_projections={self.n_projections}, p={self.p:g}, control_variate={self.control_variate!r}"

    @reject_meta
    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sliced_wasserstein(
            x, y, n_projections=self.n_projections, p=self.p, control_variate=self.control_variate,
            generator=self.generator, a=a, b=b,
        )
