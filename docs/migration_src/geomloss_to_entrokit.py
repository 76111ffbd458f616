"""
GeomLoss → entrokit
===================

``geomloss.SamplesLoss("sinkhorn", p=2, blur=..., scaling=...)`` and its entrokit
counterparts. GeomLoss's cost is :math:`\\|x-y\\|^p/p` (half the squared distance for
``p=2``) with :math:`\\varepsilon = \\mathrm{blur}^p`, so its loss is
``0.5 * entrokit.sinkhorn_divergence(x, y, eps=2 * blur**2)``;
:class:`entrokit.nn.SinkhornLoss` takes GeomLoss's parameters and does the mapping.
GeomLoss runs a fixed eps-schedule (``scaling``): it agrees with entrokit's converged value
as far as that schedule has converged, so a slower schedule agrees better.
"""

# %%
import torch

import entrokit
from entrokit.nn import SinkhornLoss

try:
    from geomloss import SamplesLoss
except ImportError:  # GeomLoss is in the bench and docs extras
    SamplesLoss = None
    print("GeomLoss is not installed: its snippets are shown, not run")

g = torch.Generator().manual_seed(0)
x = torch.randn(300, 3, dtype=torch.float64, generator=g)
y = torch.randn(400, 3, dtype=torch.float64, generator=g) + 0.5
blur = 0.1

# %%
# ``SamplesLoss("sinkhorn", p=2, blur=blur)``
# -------------------------------------------
ours = SinkhornLoss(p=2, blur=blur)(x, y)
by_hand = 0.5 * entrokit.sinkhorn_divergence(x, y, eps=2 * blur**2)
print(f"entrokit SinkhornLoss          {float(ours):.8f}")
print(f"0.5 * sinkhorn_divergence      {float(by_hand):.8f}")
if SamplesLoss is not None:
    for scaling in (0.5, 0.9, 0.99):
        theirs = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, backend="tensorized")(x, y)
        print(f"GeomLoss scaling={scaling:<5}        {float(theirs):.8f}   "
              f"relative difference {abs(float(theirs) - float(ours)) / float(ours):.1e}")

# %%
# Gradients in the points
# -----------------------
# entrokit's gradient is exact at the converged potentials; GeomLoss differentiates its
# schedule's last step. The printed number is how far apart the two are on this problem.
xg = x.clone().requires_grad_(True)
(grad_ours,) = torch.autograd.grad(SinkhornLoss(p=2, blur=blur)(xg, y), xg)
if SamplesLoss is not None:
    xg2 = x.clone().requires_grad_(True)
    (grad_theirs,) = torch.autograd.grad(
        SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.99, backend="tensorized")(xg2, y), xg2)
    err = (grad_ours - grad_theirs).norm() / grad_ours.norm()
    print(f"relative difference of the gradients: {float(err):.1e}")
