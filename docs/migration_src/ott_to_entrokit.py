"""
OTT-JAX → entrokit
==================

``ott.solvers.linear.sinkhorn.Sinkhorn`` on a ``PointCloud`` geometry, and the entrokit call.
OTT-JAX is not installed by any entrokit extra: the OTT snippet below is shown always and
run only where ``ott`` imports (otherwise the page says so).

Correspondences: OTT's ``PointCloud(x, y)`` (squared Euclidean cost) is
``entrokit.PointCloud(x, y)``; OTT's ``epsilon`` is ``eps`` when OTT's
``relative_epsilon`` is off (pass ``epsilon=`` explicitly); ``out.reg_ot_cost`` is
entrokit's ``value``; ``out.matrix`` is ``res.plan``; ``out.f``, ``out.g`` are the
potentials (another gauge: compare plans, or centred potentials).
"""

# %%
import numpy as np
import torch

import entrokit

rng = np.random.default_rng(0)
x, y = rng.normal(size=(60, 2)), rng.normal(size=(50, 2)) + 1.0

res = entrokit.solve(None, None, entrokit.PointCloud(torch.from_numpy(x), torch.from_numpy(y)),
                     eps=0.1, tol=1e-8)
print(f"entrokit: value {float(res.value):.8f}, transport_cost {float(res.transport_cost):.8f}")

# %%
# The OTT-JAX call
# ----------------
try:
    import jax
    import jax.numpy as jnp
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    HAVE_OTT = True
except ImportError:
    HAVE_OTT = False
    print("ott-jax is not installed here: the snippet is shown, not run")

if HAVE_OTT:
    jax.config.update("jax_enable_x64", True)
    geom = pointcloud.PointCloud(jnp.asarray(x), jnp.asarray(y), epsilon=0.1)
    out = sinkhorn.Sinkhorn(threshold=1e-8, max_iterations=10000)(linear_problem.LinearProblem(geom))
    print(f"OTT: reg_ot_cost {float(out.reg_ot_cost):.8f}")
    print(f"max |P_ott - P_entrokit| = {np.abs(np.asarray(out.matrix) - res.plan.numpy()).max():.1e}")
