"""Building an :class:`~entrokit.OTResult` from entropic potentials (shared by all
entropic solvers: Sinkhorn, Newton)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from entrokit._errors import ConvergenceWarning
from entrokit._result import OTResult
from entrokit.problem import OTProblem
from entrokit.solvers.implicit import implicit_potentials

__all__ = ["entropic_result", "warn_not_converged", "GRAD_MODES"]

GRAD_MODES = ("envelope", "implicit", "unroll")


def entropic_result(
    problem: OTProblem,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    *,
    grad: str,
    n_iter: torch.Tensor,
    converged: torch.Tensor,
    errors: torch.Tensor,
    method: str,
    user_batched: bool,
    info: Mapping[str, Any] | None = None,
) -> OTResult:
    """Assemble the result for a *batched* problem and squeeze the batch axis back if the
    user's problem was unbatched.

    ``f, g`` must be detached for ``grad in {"envelope", "implicit"}`` and carry the
    unrolled graph for ``grad="unroll"``.
    """
    geom, a, b = problem.geometry, problem.a, problem.b
    if grad == "implicit":
        f, g = implicit_potentials(geom, f, g, a, b, eps)
    # fix the gauge (f + c, g - c) so that <a, f> = <b, g>: results do not depend on the
    # engine, the initialisation or the solver that produced them
    shift = ((a * f).sum(-1) - (b * g).sum(-1)) / (a.sum(-1) + b.sum(-1))
    f = f - shift.unsqueeze(-1)
    g = g + shift.unsqueeze(-1)
    info = dict(info or {})
    pre = info.pop("reduce", None)
    needs_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (f, g, a, b, *geom.tensors())
    )
    if pre is not None and not needs_graph:
        row, col, tc = pre  # computed by the solver from its kernel, no extra pass
    else:
        row, col, tc = geom.plan_reduce(f, g, a, b, eps)
    mass = row.sum(-1)
    value = (a * f).sum(-1) + (b * g).sum(-1) - eps * (mass - a.sum(-1) * b.sum(-1))
    with torch.no_grad():
        merr = (row - a).abs().sum(-1) + (col - b).abs().sum(-1)
    f_out, g_out = f, g
    if grad == "envelope":
        # the potentials are constants; tc differentiates with a frozen plan
        f_out, g_out = f.detach(), g.detach()

    def plan_fn(geom=geom, f=f_out, g=g_out, a=a, b=b):
        P = geom.plan(f, g, a, b, eps)
        if grad == "envelope":
            P = P.detach()
        return P.squeeze(0) if squeeze else P

    squeeze = not user_batched
    sq = (lambda t: t.squeeze(0)) if squeeze else (lambda t: t)
    user_problem = problem.squeeze_batch() if squeeze else problem
    return OTResult(
        f=sq(f_out),
        g=sq(g_out),
        value=sq(value),
        transport_cost=sq(tc),
        marginal_error=sq(merr),
        n_iter=sq(n_iter),
        converged=sq(converged),
        errors=errors[:, 0] if squeeze else errors,
        problem=user_problem,
        eps=eps,
        method=method,
        grad=grad,
        info=info,
        plan_fn=plan_fn,
    )


def warn_not_converged(converged: torch.Tensor, merr: torch.Tensor, tol: float, method: str, hint: str) -> None:
    """Emit one ConvergenceWarning when any problem did not converge."""
    if bool(converged.all()):
        return
    k = int((~converged).sum())
    tot = converged.numel()
    warnings.warn(
        f"{method} did not converge for {k} of {tot} problem(s): marginal error "
        f"{float(merr.max()):.3e} > tol={tol:g}. {hint}",
        ConvergenceWarning,
        stacklevel=4,
    )
