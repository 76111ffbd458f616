r"""Differentiation modes for entropic OT, shared by every solver with potentials.

The optimality conditions of the dual are

.. math::

    H(f, g; a, b, C) = \begin{pmatrix} P\mathbf 1 - a \\ P^\top \mathbf 1 - b\end{pmatrix} = 0,
    \qquad P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}.

* ``"envelope"`` (Danskin): potentials are treated as constants; the dual objective
  :math:`D(f,g;a,b,C)` evaluated at the optimum has exact first-order gradients
  :math:`\partial D/\partial C = P`, :math:`\partial D/\partial a = f - \varepsilon(1 -
  \sum_j b_j)`, :math:`\partial D/\partial b = g - \varepsilon(1 - \sum_i a_i)`. Only
  ``value`` is differentiated exactly; ``plan`` and ``transport_cost`` see the cost with a
  frozen plan.
* ``"implicit"``: the implicit function theorem gives
  :math:`\mathrm d(f,g) = -J^{-1}\,\partial H/\partial\theta\,\mathrm d\theta` with the
  symmetric positive semi-definite Jacobian
  :math:`J = \varepsilon^{-1}\begin{pmatrix}\mathrm{diag}(P\mathbf 1) & P\\ P^\top &
  \mathrm{diag}(P^\top\mathbf 1)\end{pmatrix}`. Its null space is the gauge direction
  :math:`(\mathbf 1, -\mathbf 1)` (plus rows/columns of zero weight); the adjoint system
  :math:`J\lambda = \bar x` is solved by preconditioned conjugate gradient on the range
  of :math:`J` after projecting :math:`\bar x` onto it, so every gauge-invariant output
  (plan, values, costs) receives exact gradients, and so do ``f`` and ``g`` along
  gauge-invariant directions. The result builder (:mod:`entrokit.solvers._entropic`)
  applies the gauge fix :math:`\langle a, f\rangle = \langle b, g\rangle` after this
  Function, in the graph, so the returned ``f`` and ``g`` have exact derivatives in every
  direction.
* ``"unroll"``: autograd through the log-domain iterations (memory grows with the
  number of iterations).
"""

from __future__ import annotations

from typing import Callable

import torch

from entrokit.geometry import Geometry
from entrokit.solvers._numerics import pcg

__all__ = ["implicit_potentials", "implicit_fixed_point", "entropic_residual", "adjoint_solve", "bipartite_adjoint"]


def bipartite_adjoint(Wv, WTu, r, c, scale: float, mr, mc, rhs_f, rhs_g, *, tol=1e-12, max_iter=None):
    r"""Solve :math:`J\lambda = \bar x` on the range of the bipartite Jacobian
    :math:`J = s^{-1}\begin{pmatrix}\mathrm{diag}(r) & W\\ W^\top & \mathrm{diag}(c)\end{pmatrix}`
    (``r = W1``, ``c = Wᵀ1``) by Jacobi-PCG, batched. ``Wv``/``WTu`` apply ``W``/``Wᵀ``;
    rows/columns with ``mr``/``mc`` = 0 (zero weight) are masked out, and the gauge
    direction :math:`(\mathbf 1, -\mathbf 1)` is projected out of the right-hand side."""
    n = r.shape[-1]

    def J(v):  # J v on the stacked (x, y), rows/columns of zero weight masked
        x, y = v[..., :n], v[..., n:]
        return torch.cat([(r * x + Wv(y)) / scale * mr, (WTu(x) + c * y) / scale * mc], -1)

    bx, by = rhs_f * mr, rhs_g * mc
    z = mr.sum(-1) + mc.sum(-1)
    proj = ((bx * mr).sum(-1) - (by * mc).sum(-1)) / z
    bx = bx - proj.unsqueeze(-1) * mr
    by = by + proj.unsqueeze(-1) * mc
    tiny = torch.finfo(r.dtype).tiny
    inv_diag = torch.cat([
        torch.where((mr > 0) & (r > 0), scale / r.clamp_min(tiny), torch.zeros_like(r)),
        torch.where((mc > 0) & (c > 0), scale / c.clamp_min(tiny), torch.zeros_like(c)),
    ], -1)
    m = c.shape[-1]
    out = pcg(J, torch.cat([bx, by], -1), inv_diag, rtol=tol, max_iter=max_iter or 10 * (n + m))
    return out.x[..., :n], out.x[..., n:]


def adjoint_solve(
    geom: Geometry,
    f: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    rhs_f: torch.Tensor,
    rhs_g: torch.Tensor,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic adjoint: ``J = eps^{-1} [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]]`` with the plan
    applied by the geometry (:meth:`~entrokit.Geometry.plan_operator`)."""
    Pv, PTu, r, c = geom.plan_operator(f, g, a, b, eps)
    mr, mc = (a > 0).to(f.dtype), (b > 0).to(f.dtype)
    # CG cannot reduce the residual below the rounding of the plan products: asking for
    # more (1e-12 in float32) runs into breakdown on rounding noise and returns a worse x
    tol = max(tol, 100.0 * torch.finfo(f.dtype).eps)
    return bipartite_adjoint(Pv, PTu, r, c, eps, mr, mc, rhs_f, rhs_g, tol=tol, max_iter=max_iter)


AdjointSolver = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Residual = Callable[..., torch.Tensor]


class _ImplicitPotentials(torch.autograd.Function):
    """Identity on the dual variables ``(f, g)`` in forward. Backward solves the adjoint
    system ``J λ = x̄`` with ``adjoint`` and pulls ``-λ`` back through the optimality
    residual ``H(f, g; a, b, geometry) = 0`` (implicit function theorem). Runs only when
    backward reaches ``f``/``g`` or outputs built from them (plan, transport cost). One
    wrapper for every solver: entropic (``H = (P1 - a, Pᵀ1 - b)``) and smooth OT
    (``H = (T1 - a, Tᵀ1 - b)``) differ only in ``residual`` and ``adjoint``."""

    @staticmethod
    def forward(ctx, f, g, residual, adjoint, geom, a, b, n_params, *geom_tensors):
        # the last n_params tensors: what the cost holds (a cost callable's parameters),
        # reached through the residual's graph rather than by a rebuilt geometry
        ctx.residual, ctx.adjoint, ctx.geom, ctx.n_params = residual, adjoint, geom, n_params
        ctx.save_for_backward(f, g, a, b, *geom_tensors)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, gf, gg):
        f, g, a, b, *gt = ctx.saved_tensors
        params, gt = gt[len(gt) - ctx.n_params:], gt[:len(gt) - ctx.n_params]
        needs, p_needs = ctx.needs_input_grad[5:8 + len(gt)], ctx.needs_input_grad[8 + len(gt):]
        needs = (*needs[:2], *needs[3:])  # n_params is not differentiable
        if not any(needs) and not any(p_needs):
            return (None,) * (8 + len(gt) + len(params))
        gf = torch.zeros_like(f) if gf is None else gf
        gg = torch.zeros_like(g) if gg is None else gg
        with torch.no_grad():
            geom_d = ctx.geom.rebuild(*[t.detach() for t in gt])
            lam_f, lam_g = ctx.adjoint(geom_d, f, g, a.detach(), b.detach(), gf, gg)
        leaves = [t.detach().requires_grad_(need) for t, need in zip([a, b, *gt], needs)]
        with torch.enable_grad():
            geom = ctx.geom.rebuild(*leaves[2:])
            H = ctx.residual(geom, f, g, leaves[0], leaves[1])
            lam = torch.cat([lam_f.to(f.dtype), lam_g.to(g.dtype)], -1)
            wanted = [t for t in leaves if t.requires_grad] + [p for p, need in zip(params, p_needs) if need]
            grads = torch.autograd.grad(H, wanted, grad_outputs=-lam, allow_unused=True)
        it = iter(grads)
        out = [next(it) if t.requires_grad else None for t in leaves]
        p_out = [next(it) if need else None for need in p_needs]
        return (None, None, None, None, None, out[0], out[1], None, *out[2:], *p_out)


def implicit_fixed_point(geom: Geometry, f, g, a, b, *, residual: Residual, adjoint: AdjointSolver):
    """``(f, g)`` carrying implicit gradients for any dual whose optimality residual is
    ``residual(geom, f, g, a, b) -> (B, n + m)`` and whose adjoint system is solved by
    ``adjoint(geom, f, g, a, b, rhs_f, rhs_g) -> (λ_f, λ_g)``."""
    params = geom.cost_params() if hasattr(geom, "cost_params") else ()
    return _ImplicitPotentials.apply(f.detach(), g.detach(), residual, adjoint, geom, a, b, len(params),
                                     *geom.tensors(), *params)


def entropic_residual(eps: float) -> Residual:
    """``H = (P1 - a, Pᵀ1 - b)`` of the entropic dual, through the geometry."""

    def residual(geom, f, g, a, b):
        row, col = geom.marginals(f, g, a, b, eps)
        return torch.cat([row - a, col - b], -1)

    return residual


def implicit_potentials(geom: Geometry, f, g, a, b, eps: float, *, adjoint: AdjointSolver | None = None):
    """Return ``(f, g)`` carrying implicit-function-theorem gradients to ``a, b`` and the
    cost. ``adjoint(geom, f, g, a, b, eps, rhs_f, rhs_g) -> (λ_f, λ_g)`` solves the adjoint
    system on the range of ``J`` (default :func:`adjoint_solve`; the Newton solvers pass
    their sparse-Hessian solver)."""
    solver = adjoint or adjoint_solve

    def entropic_adjoint(geom, f, g, a, b, rhs_f, rhs_g):
        return solver(geom, f, g, a, b, eps, rhs_f, rhs_g)

    return implicit_fixed_point(geom, f, g, a, b, residual=entropic_residual(eps), adjoint=entropic_adjoint)
