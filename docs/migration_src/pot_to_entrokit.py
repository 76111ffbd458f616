"""
POT → entrokit
==============

``ot.sinkhorn``, ``ot.sinkhorn2``, ``ot.emd2``, ``ot.smooth.smooth_ot_dual`` and
``ot.sliced_wasserstein_distance``, each next to its entrokit call. NumPy in gives NumPy
out, so the POT inputs can be passed unchanged. POT's ``ot.dist`` is the squared Euclidean
cost, as entrokit's ``"sqeuclidean"``.
"""

# %%
# Data shared by every snippet.
import numpy as np
import torch

import entrokit

try:
    import ot
except ImportError:  # POT is in the bench and docs extras
    ot = None
    print("POT is not installed: the POT snippets are shown, not run")

rng = np.random.default_rng(0)
xs, xt = rng.normal(size=(60, 2)), rng.normal(size=(50, 2)) + 1.0
a, b = np.full(60, 1 / 60), np.full(50, 1 / 50)
M = ((xs[:, None, :] - xt[None, :, :]) ** 2).sum(-1)   # = ot.dist(xs, xt)

# %%
# ``ot.sinkhorn``: the entropic plan
# ----------------------------------
# POT's ``reg`` is entrokit's ``eps`` (absolute, in cost units). POT's ``stopThr`` and
# entrokit's ``tol`` measure different errors (see :doc:`/conventions`); both are tight here.
res = entrokit.sinkhorn(a, b, M, eps=0.1, tol=1e-9)
if ot is not None:
    P_pot = ot.sinkhorn(a, b, M, reg=0.1, stopThr=1e-10, numItermax=10000)
    print(f"max |P_pot - P_entrokit| = {np.abs(P_pot - res.plan).max():.1e}")

# %%
# ``ot.sinkhorn2``: the transport cost
# ------------------------------------
# ``sinkhorn2`` returns :math:`\langle M, P\rangle`, which is ``res.transport_cost``;
# ``res.value`` is the regularized objective (it adds :math:`\varepsilon\,\mathrm{KL}`).
if ot is not None:
    w_pot = ot.sinkhorn2(a, b, M, reg=0.1, stopThr=1e-10, numItermax=10000)
    print(f"POT sinkhorn2 = {float(w_pot):.8f}   entrokit transport_cost = {float(res.transport_cost):.8f}")
print(f"entrokit value (regularized objective) = {float(res.value):.8f}")

# %%
# ``ot.emd2``: exact OT
# ---------------------
# entrokit solves regularized OT; the exact cost is its limit as ``eps`` goes to 0. At small
# ``eps``, ``solve(method="auto")`` hands over to the sparse Newton solver.
for rel in (1e-2, 1e-3, 1e-4):
    r = entrokit.solve(a, b, M, eps=rel * M.max(), tol=1e-8)
    line = f"eps = {rel:.0e} x max C: entrokit ({r.method}) {float(r.transport_cost):.6f}"
    if ot is not None:
        line += f"   POT emd2 {ot.emd2(a, b, M):.6f}"
    print(line)

# %%
# ``ot.smooth.smooth_ot_dual``: quadratically-regularized OT
# -----------------------------------------------------------
# POT's ``reg`` with ``reg_type="l2"`` is entrokit's ``gamma`` with ``reg="l2"``. Both plans
# are sparse; entrokit returns a sparse tensor for torch inputs and an array for NumPy ones.
r = entrokit.smooth_ot(a, b, M, reg="l2", gamma=1.0)
P_ek = np.asarray(r.plan)
print(f"entrokit: {np.count_nonzero(P_ek)} nonzeros of {P_ek.size}, marginal error {float(r.marginal_error):.1e}")
if ot is not None:
    P_sm = ot.smooth.smooth_ot_dual(a, b, M, 1.0, reg_type="l2", stopThr=1e-12, numItermax=2000)
    print(f"POT: {np.count_nonzero(P_sm > 1e-12)} nonzeros; max |difference| {np.abs(P_sm - P_ek).max():.1e}")

# %%
# ``ot.sliced_wasserstein_distance``
# ----------------------------------
# Both return :math:`SW_p` itself. POT takes projections as ``(d, L)``, entrokit as
# ``(L, d)``; with the same directions the two agree to rounding.
theta = rng.normal(size=(200, 2))
theta /= np.linalg.norm(theta, axis=1, keepdims=True)
sw = entrokit.sliced_wasserstein(torch.from_numpy(xs), torch.from_numpy(xt), p=2,
                                 projections=torch.from_numpy(theta))
print(f"entrokit SW_2 = {float(sw):.10f}")
if ot is not None:
    sw_pot = ot.sliced_wasserstein_distance(xs, xt, a, b, p=2, projections=theta.T)
    print(f"POT      SW_2 = {float(sw_pot):.10f}")
