r"""``entrokit.solve``: one entry point, one option contract, dispatching by ``method``.

**Common options** (every method accepts them, with one meaning): ``tol`` (L1 marginal
error of the returned plan), ``max_iter``, ``init`` (warm-start potentials ``(f, g)`` or a
previous :class:`~entrokit.OTResult`), ``grad`` (``"implicit"``, ``"envelope"``,
``"unroll"`` where the method supports it), ``eps_scaling`` (``True``, ``False`` or
``"auto"``), ``callback(iteration, error)``, ``check_inputs`` and ``normalize``. Other
options are method-specific and are checked against the method actually run.

**The "auto" rule.** The safe sparse Newton solver ``"ssns"`` for a single dense problem
whose ``eps`` is below ``1e-2`` times the cost range (where Sinkhorn needs thousands of
iterations); ``"sinkhorn"`` otherwise (batches, online point clouds, large ``eps``). The
inputs are validated before the rule reads the cost.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._validation import check_positive
from entrokit.problem import make_problem
from entrokit.solvers._io import numpy_in_out

__all__ = ["solve", "METHODS", "COMMON_OPTIONS", "register_method", "auto_method"]

# name -> "module:function"; solvers are imported lazily
METHODS: dict[str, str] = {
    "sinkhorn": "entrokit.solvers.sinkhorn:sinkhorn",
    "sns": "entrokit.solvers.newton:sns",
    "ssns": "entrokit.solvers.newton:ssns",
    # quadratic / sparsity-constrained / entropic OT by (semi-)dual ascent; eps = gamma,
    # options reg=, k=, formulation=, sparse_axis=, solver=
    "smooth": "entrokit.solvers.smooth:smooth_ot",
}

COMMON_OPTIONS = ("tol", "max_iter", "init", "grad", "eps_scaling", "callback", "check_inputs", "normalize")


def register_method(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:function"`` (function signature like :func:`sinkhorn`)."""
    METHODS[name] = target


def _resolve(name: str) -> Callable[..., OTResult]:
    mod, fn = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def _accepted_options(fn) -> set[str] | None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        target = getattr(fn, "__wrapped_solver__", None)
        # the forwarding wrapper fixes the variant itself
        return _accepted_options(target) - {"variant"} if target is not None else None
    return {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def auto_method(problem, eps: float) -> tuple[str, str]:
    """The method ``"auto"`` picks for a validated problem, and why."""
    geom = problem.geometry
    if "ssns" not in METHODS:
        return "sinkhorn", "no Newton solver is registered"
    if geom.batched:
        return "sinkhorn", "the problem is batched (Sinkhorn solves a batch in one loop)"
    if geom.is_online:
        return "sinkhorn", "the cost is an online point cloud (Newton needs the dense matrix)"
    rng = float(geom.cost_range().max())
    if eps < 1e-2 * rng:
        return "ssns", f"eps={eps:g} is below 1e-2 x the cost range {rng:.3g} (Sinkhorn would need thousands of iterations)"
    return "sinkhorn", f"eps={eps:g} is at least 1e-2 x the cost range {rng:.3g}"


@numpy_in_out
def solve(
    a,
    b,
    cost,
    *,
    eps: float | None = None,
    method: str = "auto",
    tol: float = 1e-6,
    max_iter: int | None = None,
    normalize: bool = False,
    check_inputs: bool = True,
    **options: Any,
) -> OTResult:
    r"""Solve entropic OT :math:`\min_P \langle C,P\rangle + \varepsilon\mathrm{KL}(P\|a\otimes b)`
    (or, with ``method="smooth"``, quadratic / sparsity-constrained OT of strength ``eps``).

    Args:
        a, b: weights ``[..., n]``, ``[..., m]``; ``None`` means uniform. Tensors, NumPy
            arrays or lists (NumPy in gives NumPy out).
        cost: ``[..., n, m]`` tensor or array, or a geometry (:class:`~entrokit.PointCloud`).
        eps: regularization strength (required). With ``method="smooth"`` it is the
            strength :math:`\gamma` of :func:`~entrokit.smooth_ot`, and ``gamma=`` may be
            passed instead of it (``solve(a, b, C, method="smooth", gamma=0.1)``); both
            together must be equal.
        method: a key of :data:`METHODS` or ``"auto"`` (module docstring).
        tol: L1 marginal-error tolerance of the returned plan.
        max_iter: iteration budget (method-specific default when ``None``).
        normalize: rescale ``a`` and ``b`` to unit mass.
        check_inputs: run the value checks once, here.
        **options: the common options (``init``, ``grad``, ``eps_scaling``, ``callback``)
            and the chosen method's own.

    Raises:
        InputError: unknown method, an option the method does not take (the message names
            the method ``auto`` picked and why), or bad inputs.

    Example:
        >>> import entrokit
        >>> res = entrokit.solve(None, None, [[0.0, 1.0], [1.0, 0.0]], eps=0.1)
        >>> res.method, bool(res.converged)
        ('sinkhorn', True)
    """
    if eps is None and method == "smooth" and options.get("gamma") is not None:
        eps = options["gamma"]  # smooth_ot's own name for the strength
    if eps is None:
        hint = " (or gamma=, its strength)" if method == "smooth" else ""
        if "gamma" in options and method != "smooth":
            hint = "; gamma= is the strength of method='smooth' only"
        raise InputError(f"solve needs eps, the regularization strength; pass e.g. eps=0.01{hint}.")
    eps = check_positive(eps, "eps")
    if method != "auto" and method not in METHODS:
        raise InputError(f"unknown method {method!r}; expected 'auto' or one of {sorted(METHODS)}.")
    problem = make_problem(a, b, cost, normalize=normalize, check_inputs=check_inputs)
    why = None
    if method == "auto":
        method, why = auto_method(problem, eps)
    fn = _resolve(method)
    accepted = _accepted_options(fn)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            picked = f"method='auto' picked {method!r} because {why}; " if why else f"method={method!r} "
            raise InputError(
                f"{picked}it does not take the option(s) {', '.join(map(repr, unknown))}. "
                f"Its options are: {', '.join(sorted(accepted))}. Pass method= explicitly to "
                "choose the solver whose options you set."
            )
    return fn(problem.a, problem.b, problem.geometry, eps, tol=tol, max_iter=max_iter,
              check_inputs=False, **options)
