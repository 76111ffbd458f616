r"""``entrokit.solve``: one entry point, dispatching by ``method``.

The ``"auto"`` rule picks the safe sparse Newton solver ``"ssns"``
(:func:`entrokit.sinkhorn_newton`) for a single dense problem with ``eps`` below 1e-2 times the cost range (where
Sinkhorn needs thousands of iterations) and ``"sinkhorn"`` otherwise (batches, online
point clouds, large eps).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import check_positive

__all__ = ["solve", "METHODS", "register_method"]

# name -> "module:function"; solvers are imported lazily
METHODS: dict[str, str] = {
    "sinkhorn": "entrokit.solvers.sinkhorn:sinkhorn",
    "sns": "entrokit.solvers.newton:sns",
    "ssns": "entrokit.solvers.newton:ssns",
    # quadratic / sparsity-constrained / entropic OT by (semi-)dual ascent; eps = gamma,
    # options reg=, k=, formulation=, sparse_axis=, solver=
    "smooth": "entrokit.solvers.smooth:smooth_ot",
}


def register_method(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:function"`` (function signature like :func:`sinkhorn`)."""
    METHODS[name] = target


def _resolve(name: str) -> Callable[..., OTResult]:
    mod, fn = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def _auto_method(a, b, cost, eps) -> str:
    from entrokit.geometry import as_geometry

    if "ssns" not in METHODS:
        return "sinkhorn"
    geom = as_geometry(cost)
    if geom.batched or geom.is_online:
        return "sinkhorn"
    if eps < 1e-2 * float(geom.cost_range().max()):
        return "ssns"
    return "sinkhorn"


def solve(
    a,
    b,
    cost,
    *,
    eps: float,
    method: str = "auto",
    tol: float = 1e-6,
    max_iter: int | None = None,
    **options: Any,
) -> OTResult:
    r"""Solve entropic OT :math:`\min_P \langle C,P\rangle + \varepsilon\mathrm{KL}(P\|a\otimes b)`.

    Args:
        a, b: weights ``[n]``, ``[m]`` (or with a leading batch axis).
        cost: ``[n, m]`` tensor or a geometry (:class:`~entrokit.PointCloud`).
        eps: regularization strength.
        method: a key of :data:`METHODS` or ``"auto"`` (see the module docstring).
        tol: L1 marginal-error tolerance.
        max_iter: iteration budget (solver-specific default when ``None``).
        **options: passed to the solver (``grad``, ``init``, ``normalize``, ...).
    """
    eps = check_positive(eps, "eps")
    if method == "auto":
        method = _auto_method(a, b, cost, eps)
    if method not in METHODS:
        raise InputError(
            f"unknown method {method!r}; expected 'auto' or one of {sorted(METHODS)}."
        )
    return _resolve(method)(a, b, cost, eps, tol=tol, max_iter=max_iter, **options)
