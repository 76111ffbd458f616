"""Smooth and sparsity-constrained OT (package): see :mod:`entrokit.solvers.smooth.api`.

Layout: ``objectives`` (dual / semi-dual and compact top-k evaluators), ``newton``,
``lbfgs``, ``adam`` (optimisers), ``api`` (:func:`smooth_ot`, :func:`smooth_ot_problem`)
and ``result`` (the one result builder).
"""

from entrokit.solvers.smooth.api import FORMULATIONS, SOLVERS, smooth_ot, smooth_ot_problem

__all__ = ["smooth_ot", "smooth_ot_problem", "FORMULATIONS", "SOLVERS"]
