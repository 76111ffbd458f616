"""Optional dependencies: matplotlib, tqdm and scikit-learn live in the ``cli`` extra.

``pip install entrokit`` needs only torch, numpy and scipy. Modules that use an optional
package import it inside the function that needs it, through :func:`require`, so that
``import entrokit`` and the solvers work without it and a missing package gives one clear
message naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA", "require"]

EXTRA = "cli"
_PIP_NAMES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn", "ot": "pot"}


def require(module: str, feature: str, *, extra: str = EXTRA) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) or raise an ``ImportError`` naming
    the extra that provides it (``cli`` unless told)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        pip = _PIP_NAMES.get(top, top)
        raise ImportError(
            f"{feature} needs the optional package {pip!r}, which is not installed. Install the "
            f"extra with: pip install 'entrokit[{extra}]' (or pip install {pip})."
        ) from exc
