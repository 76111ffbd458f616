r"""Sliced Wasserstein distance, with optional Gaussian control variates.

For probability measures :math:`\mu, \nu` on :math:`\mathbb R^d` and :math:`p \ge 1`,

.. math::

    \mathrm{SW}_p(\mu, \nu) = \Big(\mathbb E_{\theta \sim \mathcal U(\mathbb S^{d-1})}
        W_p^p(\theta_\sharp\mu, \theta_\sharp\nu)\Big)^{1/p},

where :math:`\theta_\sharp\mu` is the law of :math:`\langle\theta, X\rangle`,
:math:`X \sim \mu`. The expectation is estimated with :math:`L` directions
:math:`\theta_1, \dots, \theta_L`:
:math:`\bar A = \frac1L \sum_l W_l`, :math:`W_l = W_p^p(\theta_{l\sharp}\mu, \theta_{l\sharp}\nu)`,
and the value returned is :math:`\bar A^{1/p}` (the convention of POT's
``ot.sliced_wasserstein_distance``). For :math:`d = 1` every direction is :math:`\pm 1`, so
the result is exactly :math:`W_p(\mu, \nu)`.

**One-dimensional OT.** Between weighted empirical measures
:math:`\sum_i a_i \delta_{u_i}` and :math:`\sum_j b_j \delta_{v_j}` on the line,

.. math::

    W_p^p = \int_0^1 |F^{-1}(s) - G^{-1}(s)|^p \,\mathrm ds
          = \sum_k (t_k - t_{k-1})\, |F^{-1}(t_k) - G^{-1}(t_k)|^p,

where :math:`F^{-1}, G^{-1}` are the quantile functions (piecewise constant) and
:math:`0 = t_0 < t_1 < \dots` are the merged cumulative weights of both measures. This is
exact for any sizes ``n``, ``m`` and any weights; with uniform weights and ``n == m`` it
reduces to the mean of :math:`|u_{(i)} - v_{(i)}|^p` over the sorted samples. The value is
differentiable with respect to the points (through the sort) and, almost everywhere, with
respect to the weights (through the interval lengths :math:`t_k - t_{k-1}`).

**Control variates** (Nguyen & Ho, *Sliced Wasserstein Estimation with Control
Variates*, ICLR 2024; ``p = 2`` only). Let :math:`m_\mu, m_\nu` be the (weighted) means,
:math:`\Delta = m_\mu - m_\nu` and :math:`\hat\Sigma_\mu, \hat\Sigma_\nu` the (weighted)
covariances. The closed form :math:`W_2^2 = (\Delta m)^2 + (\sigma_1 - \sigma_2)^2` between
1-D Gaussians gives two control variates with known mean (using
:math:`\mathbb E_\theta[\theta\theta^\top] = I/d`):

* ``"lower"``: :math:`G(\theta) = (\theta^\top\Delta)^2`,
  :math:`\mathbb E G = \|\Delta\|^2/d`;
* ``"upper"``: :math:`G(\theta) = (\theta^\top\Delta)^2 + \theta^\top\hat\Sigma_\mu\theta
  + \theta^\top\hat\Sigma_\nu\theta`,
  :math:`\mathbb E G = (\|\Delta\|^2 + \operatorname{tr}\hat\Sigma_\mu
  + \operatorname{tr}\hat\Sigma_\nu)/d`.

On the same :math:`L` directions,

.. math::

    \hat\alpha = \frac{\frac1L\sum_l (W_l - \bar A)(G_l - \mathbb E G)}
                      {\frac1L\sum_l (G_l - \mathbb E G)^2},\qquad
    \hat Z = \bar A - \hat\alpha\Big(\frac1L\sum_l G_l - \mathbb E G\Big),

and the value returned is :math:`\max(\hat Z, 0)^{1/2}`. Estimating :math:`\hat\alpha` on
the same directions adds an :math:`O(1/L)` bias to :math:`\hat Z` (as in the paper); by
Cauchy-Schwarz the correction never exceeds the empirical standard deviation of the
:math:`W_l`. The extra cost is :math:`O(L(n+m))` next to the :math:`O(L(n+m)d)`
projections and the sorts. The known mean :math:`\mathbb E G` assumes directions uniform
on the sphere, which is what the default draw produces.

*Gradients.* The estimate is differentiated as a whole, :math:`\hat\alpha` included (as in
the reference code). For ``"lower"``, :math:`G` scales like :math:`\|\Delta\|^2`, so the
correction :math:`\hat\alpha(\bar G - \mathbb E G)` depends on the direction of
:math:`\Delta` only and its gradient grows like :math:`1/\|\Delta\|` when the two means
nearly coincide (the value stays bounded). ``"upper"`` keeps the variance terms in
:math:`G` and does not have this behaviour; prefer it (or plain Monte Carlo) when the means
are matched, e.g. at the end of a gradient flow.

**Numerics.** Both clouds are centred at their means before projection and the
projected mean difference :math:`\theta^\top\Delta` is added back inside the 1-D
differences; this is the same function, but keeps float32 accurate for clouds far from the
origin and gives the control-variate statistics without extra matrix products.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._validation import (
    as_float_tensor,
    check_choice,
    check_generator,
    check_nonneg_finite,
    check_positive_int,
    check_same_dtype_device,
    is_array_like,
    match_half_masses,
    reject_meta,
    upcast_half,
)

__all__ = ["sliced_wasserstein", "random_projections", "CONTROL_VARIATES"]

CONTROL_VARIATES = ("lower", "upper")


def _check_p(p: Any) -> float:
    """``p`` must be a finite real >= 1; returned as ``float``."""
    if isinstance(p, torch.Tensor) and p.numel() == 1:
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a real number >= 1, got {type(p).__name__} {p!r}; pass e.g. p=2.")
    p = float(p)
    if not math.isfinite(p) or p < 1:
        raise InputError(
            f"p must be a finite real >= 1 (W_p is not a distance for p < 1), got {p!r}; "
            "pass p=1 or p=2."
        )
    return p


def _check_control_variate(control_variate: Any, p: float) -> None:
    if control_variate is None:
        return
    check_choice(control_variate, "control_variate", (None, *CONTROL_VARIATES))
    if p != 2.0:
        raise InputError(
            f"control_variate={control_variate!r} needs p=2 (the control variates come from "
            f"the closed-form W_2 between Gaussians), got p={p:g}. Pass p=2, or "
            "control_variate=None for other p."
        )


def random_projections(
    n_projections: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Draw ``n_projections`` directions uniformly on the unit sphere :math:`\mathbb S^{d-1}`.

    Normalised standard Gaussian vectors. The draw happens on the generator's device (CPU
    when ``generator`` is None and ``device`` is None) and is then moved to ``device``, so a
    seeded CPU generator gives the same directions whatever device the data live on.

    Args:
        n_projections: ``L``, an int >= 1.
        d: dimension, an int >= 1.
        generator: optional :class:`torch.Generator`; None uses the global RNG.
        dtype: floating dtype of the result.
        device: device of the result (default: the generator's device, or CPU).

    Returns:
        ``[L, d]`` tensor with unit rows.

    Example:
        >>> import torch
        >>> th = random_projections(5, 3, generator=torch.Generator().manual_seed(0))
        >>> th.shape, bool(torch.allclose(th.norm(dim=1), torch.ones(5)))
        (torch.Size([5, 3]), True)
    """
    n_projections = check_positive_int(n_projections, "n_projections")
    d = check_positive_int(d, "d")
    check_generator(generator)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype (directions are unit vectors), got {dtype!r}; "
            "pass e.g. dtype=torch.float32."
        )
    draw_device = generator.device if generator is not None else (device if device is not None else "cpu")
    g = torch.randn(n_projections, d, generator=generator, dtype=dtype, device=draw_device)
    g = g / g.norm(dim=-1, keepdim=True)
    return g if device is None else g.to(device)


def _abs_pow(t: torch.Tensor, p: float) -> torch.Tensor:
    if p == 2.0:
        return t * t
    if p == 1.0:
        return t.abs()
    return t.abs().pow(p)


def _wasserstein_1d_pp(
    u: torch.Tensor,
    v: torch.Tensor,
    shift: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    p: float,
) -> torch.Tensor:
    r""":math:`W_p^p` between the 1-D measures of ``u + shift`` (weights ``a``) and ``v``
    (weights ``b``), batched over the leading axes.

    ``u``: ``[B, L, n]``, ``v``: ``[B, L, m]``, ``shift``: ``[B, L]``, ``a``: ``[B, n]``
    probability weights or None (uniform), ``b``: ``[B, m]`` or None; every leading axis
    may be 1 and broadcasts. Returns ``[B, L]`` (or broadcastable to it).
    """
    n, m = u.shape[-1], v.shape[-1]
    s = shift.unsqueeze(-1)
    if a is None and b is None:
        us = torch.sort(u, dim=-1).values
        vs = torch.sort(v, dim=-1).values
        if n == m:
            return _abs_pow(us + s - vs, p).mean(-1)
        # uniform weights: the merged quantile grid is the same for every direction
        cu = torch.arange(1, n + 1, dtype=u.dtype, device=u.device) / n
        cv = torch.arange(1, m + 1, dtype=u.dtype, device=u.device) / m
        t = torch.sort(torch.cat([cu, cv])).values
        iu = torch.searchsorted(cu, t).clamp_max(n - 1)
        iv = torch.searchsorted(cv, t).clamp_max(m - 1)
        delta = torch.diff(t, prepend=t.new_zeros(1))
        return (delta * _abs_pow(us[..., iu] + s - vs[..., iv], p)).sum(-1)
    B, L = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1], shift.shape)
    u, v = u.expand(B, L, n), v.expand(B, L, m)
    a = u.new_full((B, n), 1.0 / n) if a is None else a.expand(B, n)
    b = v.new_full((B, m), 1.0 / m) if b is None else b.expand(B, m)
    us, pu = torch.sort(u, dim=-1)
    vs, pv = torch.sort(v, dim=-1)
    cu = torch.gather(a.unsqueeze(-2).expand_as(u), -1, pu).cumsum(-1)
    cv = torch.gather(b.unsqueeze(-2).expand_as(v), -1, pv).cumsum(-1)
    t = torch.sort(torch.cat([cu, cv], dim=-1), dim=-1).values
    iu = torch.searchsorted(cu.detach().contiguous(), t.detach().contiguous()).clamp_max(n - 1)
    iv = torch.searchsorted(cv.detach().contiguous(), t.detach().contiguous()).clamp_max(m - 1)
    delta = torch.diff(t, dim=-1, prepend=t.new_zeros(t.shape[:-1] + (1,)))
    qu = torch.gather(us, -1, iu)
    qv = torch.gather(vs, -1, iv)
    return (delta * _abs_pow(qu + s - qv, p)).sum(-1)


def _project(theta: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``theta`` ``[L, d]`` or ``[B, L, d]``, ``pts`` ``[1 or B, n, d]`` -> ``[1 or B, L, n]``.

    A single cloud is multiplied as a 2-D matrix so that batched directions never copy it
    once per batch element.
    """
    if pts.shape[0] == 1:
        out = torch.matmul(theta, pts[0].transpose(0, 1))
        return out if out.dim() == 3 else out.unsqueeze(0)
    return torch.matmul(theta, pts.transpose(-1, -2))


def _check_points(t: Any, name: str) -> torch.Tensor:
    t = as_float_tensor(t, name)
    if t.dim() not in (2, 3):
        raise InputError(
            f"{name} must have shape (n, d) or (batch, n, d), got {tuple(t.shape)}. "
            f"For 1-D samples use {name}.unsqueeze(-1); for extra batch axes use "
            f"{name}.reshape(-1, n, d)."
        )
    return t


def _check_finite_points(t: torch.Tensor, name: str) -> None:
    # a finite sum rules out NaN and inf in one reduction; the element-wise test only runs
    # when the sum is not finite (a bad entry, or an overflow of large finite values)
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return
    kind = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
    raise InputError(
        f"{name} contains {kind}; expected finite coordinates. Drop or repair those points "
        f"(e.g. {name}[torch.isfinite({name}).all(-1)])."
    )


def _check_weights(w: Any, name: str, pts: torch.Tensor, pts_name: str) -> torch.Tensor:
    w = as_float_tensor(w, name, like=None if isinstance(w, torch.Tensor) else pts)
    n = pts.shape[-2]
    if w.dim() not in (1, 2) or w.shape[-1] != n:
        raise InputError(
            f"{name} must have shape ({n},) or (batch, {n}) to match {pts_name} of shape "
            f"{tuple(pts.shape)} (one weight per point), got {tuple(w.shape)}."
        )
    return w


def _batch_size(shapes: dict[str, tuple[torch.Size, int]]) -> int | None:
    """Common batch size of the inputs that carry one (None if none does)."""
    found = {k: s[0] for k, (s, core) in shapes.items() if len(s) > core}
    sizes = set(found.values())
    if len(sizes) > 1:
        desc = ", ".join(f"{k}: {v}" for k, v in found.items())
        raise InputError(
            f"batch sizes differ ({desc}); batched inputs must share the leading axis. "
            "Pass unbatched inputs (no leading axis) to share them across the batch."
        )
    return sizes.pop() if sizes else None


def _safe_root(z: torch.Tensor, p: float) -> torch.Tensor:
    """``max(z, 0) ** (1/p)`` with a zero (not NaN) gradient at 0."""
    if p == 1.0:
        return z.clamp_min(0)
    pos = z > 0
    tiny = torch.finfo(z.dtype).tiny
    return torch.where(pos, z.clamp_min(tiny).pow(1.0 / p), z.new_zeros(()))


@reject_meta
def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_projections: int = 100,
    p: float = 2,
    control_variate: str | None = None,
    generator: torch.Generator | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    projections: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Monte Carlo sliced Wasserstein distance :math:`\mathrm{SW}_p` between point clouds.

    See the module docstring for the definition, the exact 1-D transport used on every
    direction and the control-variate estimators.

    Args:
        x: points ``[n, d]`` or ``[B, n, d]`` (tensor, NumPy array or list). float16/bfloat16
            tensors are computed in float32 (half precision keeps ~3 digits, too few for
            sorted differences and cumulative weights) and the result is cast back.
        y: points ``[m, d]`` or ``[B, m, d]``; ``m`` may differ from ``n``.
        n_projections: number of random directions ``L`` (ignored when ``projections`` is
            given).
        p: ground-cost exponent, a real ``>= 1``. The result is
            :math:`(\frac1L\sum_l W_p^p)^{1/p}`.
        control_variate: None (plain Monte Carlo), ``"lower"`` or ``"upper"`` (Gaussian
            control variates; ``p = 2`` only).
        generator: :class:`torch.Generator` for the directions (None: global RNG). The
            draw happens on the generator's device and is moved to ``x``'s device.
        a: weights of ``x``, ``[n]`` or ``[B, n]``, nonnegative (default uniform).
        b: weights of ``y``, ``[m]`` or ``[B, m]``; the total masses of ``a`` and ``b``
            must agree. For a common mass :math:`M \neq 1` the result is
            :math:`M^{1/p}` times the distance between the normalised measures (as POT).
        projections: your own directions ``[L, d]`` (shared by the batch) or ``[B, L, d]``.
            Plain Monte Carlo uses them as given (POT's convention, but rows, not columns:
            pass POT's ``(d, L)`` matrix transposed). With a control variate they must be
            unit vectors, and the closed-form mean of the control variate assumes they are
            uniform on the sphere.
        check_inputs: run the value checks (NaN/inf points, negative weights, masses,
            unit directions), which read tensor values and synchronise the device.
            Shape, dtype and option checks always run.

    Returns:
        :math:`\mathrm{SW}_p` estimate: a 0-d tensor for unbatched inputs, ``[B]`` if any
        input is batched; dtype and device of ``x``. NumPy inputs (``x`` and ``y``) give a
        NumPy array back. Differentiable in ``x``, ``y``, ``a`` and ``b``. The control-variate
        estimate of :math:`\mathrm{SW}_2^2` can fall below 0 when the true value is near 0; it
        is clamped at 0 before the root (gradient 0 there, as for identical clouds).

    Raises:
        TypeError: non-numeric or non-floating inputs, a ``generator`` that
            is not a :class:`torch.Generator`, non-int ``n_projections``.
        InputError: bad shapes (dimension mismatch, weights of the wrong length, batch
            mismatch), NaN/inf points, negative/NaN weights, zero or unequal masses,
            ``p < 1``, ``n_projections < 1``, unknown ``control_variate``, a control variate
            with ``p != 2`` or with non-unit directions.

    Example:
        >>> import torch
        >>> from entrokit.losses.sliced import sliced_wasserstein
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> y = torch.tensor([[2.0], [3.0], [4.0]])
        >>> float(sliced_wasserstein(x, y, p=1))  # d = 1: exactly W_1
        2.5
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 5, generator=g), torch.randn(300, 5, generator=g) + 1
        >>> sw = sliced_wasserstein(x, y, n_projections=50, control_variate="upper", generator=g)
        >>> sw.shape
        torch.Size([])
    """
    numpy_io = (
        is_array_like(x) and is_array_like(y) and not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor)
    )
    n_projections, p = _check_options(n_projections, p, control_variate, generator)
    # float16/bfloat16 tensors: computed in float32, returned in their dtype
    t, out_dtype = upcast_half(x=x, y=y, a=a, b=b, projections=projections)
    a, b = match_half_masses(t["a"], t["b"], out_dtype)
    x, y, a, b, projections = _check_arrays(t["x"], t["y"], a, b, t["projections"])
    ws = {k: w for k, w in (("a", a), ("b", b)) if w is not None}
    B = _batch_size({"x": (x.shape, 2), "y": (y.shape, 2), **{k: (w.shape, 1) for k, w in ws.items()},
                     **({} if projections is None else {"projections": (projections.shape, 2)})})
    # unbatched inputs keep a leading axis of size 1 and broadcast (no copies)
    x, y = (t.unsqueeze(0) if t.dim() == 2 else t for t in (x, y))
    if check_inputs:
        _check_values(x, y, ws, projections, control_variate)
    a, b, mass = _unit_weights(a, b, x, check_inputs)
    theta = projections if projections is not None else random_projections(
        n_projections, x.shape[-1], generator=generator, dtype=x.dtype, device=x.device)
    Z = _estimate(x, y, a, b, theta, p, control_variate) * (1.0 if mass is None else mass)
    out = _safe_root(Z, p)
    out = (out.expand(B) if B is not None else out.reshape(())).to(out_dtype or out.dtype)
    return out.detach().cpu().numpy() if numpy_io else out


def _check_options(n_projections, p, control_variate, generator) -> tuple[int, float]:
    n_projections = check_positive_int(n_projections, "n_projections")
    p = _check_p(p)
    _check_control_variate(control_variate, p)
    check_generator(generator)
    return n_projections, p


def _check_arrays(x, y, a, b, projections):
    """Shapes, dtypes and devices of the points, weights and directions."""
    x = _check_points(x, "x")
    y = _check_points(y, "y")
    check_same_dtype_device({"x": x, "y": y})
    d = x.shape[-1]
    if y.shape[-1] != d:
        raise InputError(
            f"x and y must live in the same dimension: x has d={d} (shape {tuple(x.shape)}) but "
            f"y has d={y.shape[-1]} (shape {tuple(y.shape)}). Both need shape (..., n, d) with "
            "the same last axis."
        )
    if a is not None:
        a = _check_weights(a, "a", x, "x")
    if b is not None:
        b = _check_weights(b, "b", y, "y")
    ws = {k: t for k, t in (("a", a), ("b", b)) if t is not None}
    if ws:
        check_same_dtype_device({"x": x, **ws})
    if projections is not None:
        projections = as_float_tensor(projections, "projections", like=None if isinstance(projections, torch.Tensor) else x)
        if projections.dim() not in (2, 3) or projections.shape[-1] != d:
            raise InputError(
                f"projections must have shape (L, {d}) or (batch, L, {d}) (one direction per "
                f"row, in the dimension of x), got {tuple(projections.shape)}. POT's (d, L) "
                "matrix must be transposed: projections=P.T."
            )
        check_same_dtype_device({"x": x, "projections": projections})
    return x, y, a, b, projections


def _check_values(x, y, ws: dict, projections, control_variate) -> None:
    """The value checks (they read tensor values): finite points, weights and directions,
    unit directions for a control variate."""
    _check_finite_points(x, "x")
    _check_finite_points(y, "y")
    for k, t in ws.items():
        check_nonneg_finite(t, k)
    if projections is None:
        return
    if not bool(torch.isfinite(projections).all()):
        raise InputError("projections contain NaN or inf; expected finite directions.")
    if control_variate is not None:
        nrm = projections.norm(dim=-1)
        tol = 1e-4 if projections.dtype == torch.float32 else 1e-8
        if bool(((nrm - 1).abs() > tol).any()):
            raise InputError(
                f"control_variate={control_variate!r} needs unit directions (the control "
                "variate's mean uses E[theta theta^T] = I/d on the unit sphere), but "
                f"projection norms range over [{nrm.min().item():.4g}, {nrm.max().item():.4g}]. "
                "Normalise them: projections / projections.norm(dim=-1, keepdim=True)."
            )


def _check_equal_masses(sa, sb, x: torch.Tensor) -> None:
    for k, s in (("a", sa), ("b", sb)):
        if s is not None and bool((s <= 0).any()):
            raise InputError(
                f"weights {k} have zero total mass; expected a positive sum (at least one "
                "weight > 0)."
            )
    one = torch.ones((), dtype=x.dtype, device=x.device)
    ma = sa if sa is not None else one
    mb = sb if sb is not None else one
    rtol = 1e-5 if x.dtype == torch.float32 else 1e-8
    gap = ((ma - mb).abs() / torch.maximum(ma, mb)).reshape(-1)
    if bool((gap > rtol).any()):
        i = int(gap.argmax())
        ma_i = ma.reshape(-1)[i if ma.numel() > 1 else 0].item()
        mb_i = mb.reshape(-1)[i if mb.numel() > 1 else 0].item()
        raise InputError(
            f"total masses differ: sum(a)={ma_i:.10g} vs sum(b)={mb_i:.10g} (relative gap "
            f"{gap[i].item():.2e} > {rtol:g}; a missing weight vector counts as uniform "
            "with mass 1). Sliced OT compares measures of equal mass: rescale both, "
            "e.g. a = a / a.sum(-1, keepdim=True) and b = b / b.sum(-1, keepdim=True)."
        )


def _unit_weights(a, b, x: torch.Tensor, check_inputs: bool):
    """``(a, b, mass)``: the weights rescaled to unit mass, flattened to ``(., n)``, and
    their common mass (``None`` when both are uniform)."""
    if a is None and b is None:
        return None, None, None
    sa = a.sum(-1) if a is not None else None
    sb = b.sum(-1) if b is not None else None
    if check_inputs:
        _check_equal_masses(sa, sb, x)
    if a is not None:
        a = (a / sa.unsqueeze(-1)).reshape(-1, a.shape[-1])
    if b is not None:
        b = (b / sb.unsqueeze(-1)).reshape(-1, b.shape[-1])
    return a, b, sa if sa is not None else sb


def _second_moments(u, v, xc, yc, a, b):
    """Per direction, the projected variances ``(vx, vy)`` and the total variances
    ``(tx, ty)`` of the centred clouds (the upper control variate's terms)."""
    vx = (u * u).mean(-1) if a is None else (u * u * a.unsqueeze(-2)).sum(-1)
    vy = (v * v).mean(-1) if b is None else (v * v * b.unsqueeze(-2)).sum(-1)
    tx = (xc * xc).sum(-1).mean(-1) if a is None else ((xc * xc).sum(-1) * a).sum(-1)
    ty = (yc * yc).sum(-1).mean(-1) if b is None else ((yc * yc).sum(-1) * b).sum(-1)
    return vx + vy, tx + ty


def _estimate(x, y, a, b, theta, p: float, control_variate):
    r"""The Monte Carlo estimate of :math:`\mathrm{SW}_p^p` for unit-mass weights
    (module docstring): centre, project, transport in 1-D, and the control variate."""
    # leading axes below are 1 or B and broadcast
    mx = x.mean(-2) if a is None else (a.unsqueeze(-1) * x).sum(-2)  # [., d]
    my = y.mean(-2) if b is None else (b.unsqueeze(-1) * y).sum(-2)
    xc = x - mx.unsqueeze(-2)  # [., n, d]
    yc = y - my.unsqueeze(-2)
    delta = mx - my  # [., d]
    u = _project(theta, xc)  # [., L, n]
    v = _project(theta, yc)  # [., L, m]
    if theta.dim() == 2:
        s = delta @ theta.T  # [., L]: theta^T (m_x - m_y)
    else:
        s = torch.matmul(theta, delta.unsqueeze(-1)).squeeze(-1)
    W = _wasserstein_1d_pp(u, v, s, a, b, p)  # [., L]
    A = W.mean(-1)
    if control_variate is None:
        return A
    G = s * s
    EG = (delta * delta).sum(-1)
    if control_variate == "upper":
        var_proj, var_total = _second_moments(u, v, xc, yc, a, b)
        G, EG = G + var_proj, EG + var_total
    EG = EG / x.shape[-1]
    dG = G - EG.unsqueeze(-1)
    var_g = (dG * dG).mean(-1)
    cov = ((W - A.unsqueeze(-1)) * dG).mean(-1)
    fin = torch.finfo(x.dtype)
    floor = (fin.eps * EG) ** 2 + fin.tiny
    alpha = cov / (var_g + floor)
    return A - alpha * dG.mean(-1)
