"""Typed errors and warnings raised by entrokit."""

from __future__ import annotations

__all__ = ["InputError", "ConvergenceWarning"]


class InputError(ValueError):
    """Bad input data or options at a public entry point.

    Messages follow one pattern: what was expected, what came in, and how to fix it.
    Subclasses :class:`ValueError`, so ``except ValueError`` also catches it.
    """


class ConvergenceWarning(UserWarning):
    """A solver stopped before reaching its tolerance.

    The result is still returned, with ``converged=False``; the message names the
    parameter to change (``max_iter``, ``tol``, ``eps``, ...). Filter it with
    ``warnings.simplefilter("ignore", entrokit.ConvergenceWarning)``.
    """
