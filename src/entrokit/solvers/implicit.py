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
  gauge-invariant directions.
* ``"unroll"``: autograd through the log-domain iterations (memory grows with the
  number of iterations).
"""

from __future__ import annotations

import torch

from entrokit.geometry import Geometry
from entrokit.solvers._numerics import pcg

__all__ = ["implicit_potentials", "adjoint_solve"]


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
    """Solve ``J [x; y] = [rhs_f; rhs_g]`` on the range of ``J`` by Jacobi-PCG (batched)."""
    n, m = geom.shape
    if geom.is_online:

        def Pv(v):
            return geom.plan_matvec(f, g, a, b, eps, v, axis=1)

        def PTu(u):
            return geom.plan_matvec(f, g, a, b, eps, u, axis=0)

        r = Pv(torch.ones_like(g))
        c = PTu(torch.ones_like(f))
    else:
        P = geom.plan(f, g, a, b, eps)

        def Pv(v):
            return torch.matmul(P, v.unsqueeze(-1)).squeeze(-1)

        def PTu(u):
            return torch.matmul(u.unsqueeze(-2), P).squeeze(-2)

        r, c = P.sum(-1), P.sum(-2)
    mr, mc = (a > 0).to(f.dtype), (b > 0).to(f.dtype)

    def J(v):  # J v on the stacked (x, y), rows/columns of zero weight masked
        x, y = v[..., :n], v[..., n:]
        return torch.cat([(r * x + Pv(y)) / eps * mr, (PTu(x) + c * y) / eps * mc], -1)

    # project the right-hand side onto range(J): remove the gauge component (1, -1)
    bx, by = rhs_f * mr, rhs_g * mc
    z = mr.sum(-1) + mc.sum(-1)
    proj = ((bx * mr).sum(-1) - (by * mc).sum(-1)) / z
    bx = bx - proj.unsqueeze(-1) * mr
    by = by + proj.unsqueeze(-1) * mc
    tiny = torch.finfo(r.dtype).tiny
    inv_diag = torch.cat([
        torch.where(mr > 0, eps / r.clamp_min(tiny), torch.zeros_like(r)),
        torch.where(mc > 0, eps / c.clamp_min(tiny), torch.zeros_like(c)),
    ], -1)
    out = pcg(J, torch.cat([bx, by], -1), inv_diag, rtol=tol, max_iter=max_iter or 10 * (n + m))
    return out.x[..., :n], out.x[..., n:]


class _ImplicitPotentials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, g, eps, geom, a, b, *geom_tensors):
        ctx.eps, ctx.geom = eps, geom
        ctx.save_for_backward(f, g, a, b, *geom_tensors)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, gf, gg):
        f, g, a, b, *gt = ctx.saved_tensors
        eps = ctx.eps
        if gf is None:
            gf = torch.zeros_like(f)
        if gg is None:
            gg = torch.zeros_like(g)
        with torch.no_grad():
            geom_d = ctx.geom.rebuild(*[t.detach() for t in gt])
            lam_f, lam_g = adjoint_solve(geom_d, f, g, a.detach(), b.detach(), eps, gf, gg)
        needs = ctx.needs_input_grad[4:]
        leaves = [t.detach().requires_grad_(need) for t, need in zip([a, b, *gt], needs)]
        if not any(needs):
            return (None,) * (6 + len(gt))
        with torch.enable_grad():
            geom = ctx.geom.rebuild(*leaves[2:])
            row, col, _ = geom.plan_reduce(f, g, leaves[0], leaves[1], eps)
            H = torch.cat([row - leaves[0], col - leaves[1]], -1)
            lam = torch.cat([lam_f, lam_g], -1)
            wanted = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad(H, wanted, grad_outputs=-lam, allow_unused=True)
        it = iter(grads)
        out = [next(it) if t.requires_grad else None for t in leaves]
        return (None, None, None, None, *out)


def implicit_potentials(geom: Geometry, f, g, a, b, eps: float):
    """Return ``(f, g)`` carrying implicit-function-theorem gradients to ``a, b`` and the cost."""
    return _ImplicitPotentials.apply(f.detach(), g.detach(), eps, geom, a, b, *geom.tensors())
