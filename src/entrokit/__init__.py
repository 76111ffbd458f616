"""entrokit: entropy-regularized learning in PyTorch.

Pillar 1, regularized optimal transport: :func:`solve`, :func:`sinkhorn`,
:class:`PointCloud`, :class:`OTResult`; losses: :func:`sinkhorn_divergence`, :func:`sliced_wasserstein`, :func:`monge_gap`. Pillar 2, entropy regularizers for training:
:mod:`entrokit.regularizers`. The subpackages :mod:`entrokit.nn`, :mod:`entrokit.regularizers`
and :mod:`entrokit.distributed` load on first access (``entrokit.regularizers.ELRLoss``).
"""

from entrokit._errors import ConvergenceWarning, InputError
from entrokit._result import OTResult
from entrokit.geometry import DenseCost, Geometry, KeOpsPointCloud, PointCloud, ShardedPointCloud
from entrokit.losses import monge_gap, sinkhorn_divergence, sliced_wasserstein
from entrokit.problem import OTProblem
from entrokit.solvers.multiscale import multiscale_sinkhorn
from entrokit.solvers.newton import sinkhorn_newton
from entrokit.solvers.sinkhorn import sinkhorn
from entrokit.solvers.smooth import smooth_ot
from entrokit.solvers.solve import METHODS, solve

__version__ = "0.1.0"


def __getattr__(name):  # lazy subpackages: `import entrokit` loads none of them
    if name in ("nn", "distributed", "regularizers", "rl"):
        import importlib

        return importlib.import_module(f"entrokit.{name}")
    raise AttributeError(f"module 'entrokit' has no attribute {name!r}")

__all__ = [
    "ConvergenceWarning",
    "DenseCost",
    "Geometry",
    "InputError",
    "METHODS",
    "OTProblem",
    "OTResult",
    "PointCloud",
    "KeOpsPointCloud",
    "ShardedPointCloud",
    "monge_gap",
    "sinkhorn",
    "sinkhorn_divergence",
    "sinkhorn_newton",
    "multiscale_sinkhorn",
    "sliced_wasserstein",
    "smooth_ot",
    "solve",
    "__version__",
]
