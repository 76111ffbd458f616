r"""``entrokit.solve``: one entry point, one option contract, dispatching by ``method``.

**Common options** (every method accepts them, with one meaning): ``tol`` (L1 marginal
error of the returned plan), ``max_iter``, ``init`` (warm-start potentials ``(f, g)`` or a
previous :class:`~entrokit.OTResult`), ``grad`` (``"implicit"``, ``"envelope"``,
``"unroll"`` where the method supports it), ``eps_scaling`` (``True``, ``False`` or
``"auto"``), ``callback(iteration, error)``, ``check_inputs`` and ``normalize``. Other
options are method-specific and are checked against the method actually run.

**The "auto" rule.** The safe sparse Newton solver ``"ssns"`` for a single problem whose
``eps`` is below ``1e-2`` times the cost range (where Sinkhorn needs thousands of
iterations); ``"sinkhorn"`` otherwise (batches, large ``eps``). Newton works on a float64
copy of the cost, so it also runs on an online :class:`~entrokit.PointCloud`; "auto" picks
it there when that copy is small: about :data:`NEWTON_COPIES` float64 ``n x m`` matrices
within the memory budget of the geometry, or ``n m`` at most :data:`NEWTON_ONLINE_ENTRIES`
(a problem that small fits one tile of the online reductions, which hold such a block
anyway). Larger online clouds, and geometries that never materialise the cost (sharded,
truncated multiscale), go to Sinkhorn. The inputs are validated before the rule reads the
cost.

**Options select the method.** A method-specific option tells "auto" which solvers the
caller wants: the rule's pick is kept when it takes every option given (with its value:
``grad="unroll"`` is Sinkhorn-only), otherwise the first entropic method that takes them
all (``"ssns"``, ``"sns"``, ``"sinkhorn"``), e.g. ``lse_mode=True`` selects Sinkhorn and
``linear_solver="cg"`` SSNS. When no method takes them all, the :class:`~entrokit.InputError`
names the options and the methods that accept each.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

from entrokit._errors import InputError
from entrokit._result import OTResult
from entrokit._threads import small_problem_threads
from entrokit._validation import (
    check_positive,
    check_solver_options,
    refused_values,
    solver_options_of,
)
from entrokit.problem import make_problem
from entrokit.solvers._io import numpy_in_out

__all__ = ["solve", "METHODS", "COMMON_OPTIONS", "register_method", "auto_method", "NEWTON_COPIES",
           "NEWTON_ONLINE_ENTRIES"]

# name -> "module:function"; solvers are imported lazily
METHODS: dict[str, str] = {
    "sinkhorn": "entrokit.solvers.sinkhorn:sinkhorn",
    "sns": "entrokit.solvers.newton:sns",
    "ssns": "entrokit.solvers.newton:ssns",
    # quadratic / sparsity-constrained / entropic OT by (semi-)dual ascent; eps = gamma,
    # options reg=, k=, formulation=, sparse_axis=, solver=
    "smooth": "entrokit.solvers.smooth:smooth_ot",
}

_BUILTIN = dict(METHODS)

# the methods "auto" chooses among (they solve the same entropic problem), in its order of
# preference when the options rule out the pick of the cost rule
AUTO_METHODS = ("ssns", "sns", "sinkhorn")
# Newton holds about this many float64 n x m matrices (cost, -C/eps, plan, trial plan, mask)
NEWTON_COPIES = 5
# "auto" uses Newton on an online point cloud of at most this many entries whatever its
# budget (one CPU tile of entrokit.geometry._online: the online path holds such a block)
NEWTON_ONLINE_ENTRIES = 1 << 20

COMMON_OPTIONS = ("tol", "max_iter", "init", "grad", "eps_scaling", "callback", "check_inputs", "normalize")


def register_method(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:function"`` (function signature like :func:`sinkhorn`)."""
    METHODS[name] = target


def _resolve(name: str) -> Callable[..., OTResult]:
    mod, fn = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def _spec_name(name: str | None) -> str:
    """``name`` when the option spec describes it (a built-in entropic method still
    registered under its name), else ``""``."""
    return name if name is not None and METHODS.get(name) == _BUILTIN.get(name) else ""


def _accepted_options(fn, name: str | None = None) -> set[str] | None:
    """The options a method takes: from the option spec for the entropic solvers
    (:data:`~entrokit._validation.SOLVER_OPTIONS`), from the signature otherwise."""
    spec = solver_options_of(_spec_name(name))
    if spec is not None:
        return spec - {"variant"}  # the method fixes the variant itself
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        target = getattr(fn, "__wrapped_solver__", None)
        # the forwarding wrapper fixes the variant itself
        return _accepted_options(target) - {"variant"} if target is not None else None
    return {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _refused_values(fn, name: str | None = None) -> dict[str, tuple]:
    """Option values a solver takes in its signature but refuses (``grad="unroll"`` for Newton)."""
    target = getattr(fn, "__wrapped_solver__", fn)
    return {**getattr(target, "__refused_options__", {}), **refused_values(_spec_name(name))}


def _takes(name: str, options: dict) -> bool:
    """Whether method ``name`` accepts every option (and value) in ``options``."""
    fn = _resolve(name)
    accepted = _accepted_options(fn, name)
    if accepted is not None and not set(options) <= accepted:
        return False
    refused = _refused_values(fn, name)
    return not any(k in refused and _in(options[k], refused[k]) for k in options)


def _in(value, choices) -> bool:
    try:
        return value in choices
    except TypeError:  # unhashable / odd values: the solver's own check reports them
        return False


def _newton_fits(geom) -> bool:
    """Whether Newton's float64 copy of an online cost is small enough for "auto"."""
    from entrokit.geometry import PointCloud, memory_budget

    if not isinstance(geom, PointCloud):  # sharded / truncated: no dense copy by design
        return False
    n, m = geom.shape
    entries = n * m * math.prod(geom.batch_shape)
    budget = geom.memory_budget or memory_budget()
    return entries <= NEWTON_ONLINE_ENTRIES or NEWTON_COPIES * 8 * entries <= budget


def auto_method(problem, eps: float) -> tuple[str, str]:
    """The method ``"auto"`` picks for a validated problem by its cost, and why."""
    geom = problem.geometry
    if "ssns" not in METHODS:
        return "sinkhorn", "no Newton solver is registered"
    # a problem flattened by with_batch() is batched when its user's shape is
    batched = geom.batched if problem.user_batch_shape is None else problem.user_batch_shape != ()
    if batched:
        return "sinkhorn", "the problem is batched (Sinkhorn solves a batch in one loop)"
    if geom.is_online and not _newton_fits(geom):
        return "sinkhorn", (
            "the cost is online and too large for Newton's float64 copy "
            f"({NEWTON_COPIES} x n m x 8 bytes above the memory budget)"
        )
    rng = float(geom.cost_range().max())
    if eps < 1e-2 * rng:
        return "ssns", f"eps={eps:g} is below 1e-2 x the cost range {rng:.3g} (Sinkhorn would need thousands of iterations)"
    return "sinkhorn", f"eps={eps:g} is at least 1e-2 x the cost range {rng:.3g}"


def _auto_with_options(problem, eps: float, options: dict) -> tuple[str, str]:
    """``auto_method``, then the options: the pick is kept if it takes them all, else the
    first of :data:`AUTO_METHODS` that does (module docstring)."""
    method, why = auto_method(problem, eps)
    if not options or _takes(method, options):
        return method, why
    given = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    for name in AUTO_METHODS:
        if name in METHODS and _takes(name, options):
            return name, f"{given} is taken by {name!r} and not by {method!r} (the cost rule's pick: {why})"
    per_option = []
    for key in sorted(options):
        takers = [name for name in METHODS if _takes(name, {key: options[key]})]
        per_option.append(f"{key}={options[key]!r}: {', '.join(map(repr, takers)) or 'no method'}")
    raise InputError(
        f"method='auto' found no method that takes all of {given}. Methods accepting each: "
        f"{'; '.join(per_option)}. Drop or change an option, or pass method= explicitly."
    )


@numpy_in_out
@small_problem_threads
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
        method, why = _auto_with_options(problem, eps, options)
    fn = _resolve(method)
    accepted = _accepted_options(fn, method)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            picked = f"method='auto' picked {method!r} because {why}; " if why else f"method={method!r} "
            raise InputError(
                f"{picked}it does not take the option(s) {', '.join(map(repr, unknown))}. "
                f"Its options are: {', '.join(sorted(accepted))}. Pass method= explicitly to "
                "choose the solver whose options you set."
            )
    internal = getattr(fn, "__problem_solver__", None) if _spec_name(method) else None
    if internal is not None:  # the validated problem goes straight to the solver
        if solver_options_of(method) is None:  # the solver checks its own options
            return internal(problem, eps, tol=tol, max_iter=max_iter, **options)
        return internal(problem, eps, **check_solver_options(method, tol=tol, max_iter=max_iter, **options))
    return fn(problem.a, problem.b, problem.geometry, eps, tol=tol, max_iter=max_iter,
              check_inputs=False, **options)
