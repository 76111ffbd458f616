"""``SinkhornLoss``: GeomLoss's parameters mapped onto the Sinkhorn divergence, and its errors."""

import geomloss
import pytest
import torch

from entrokit import InputError, sinkhorn_divergence
from entrokit.nn import SinkhornLoss
from generators import gaussian_clouds as _clouds


@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_loss_matches_geomloss(p):
    x, y, a, b = _clouds(n=40, m=35, d=3, seed=3)
    blur = 0.3
    ours = SinkhornLoss(p=p, blur=blur, tol=1e-12, max_iter=100_000)(a, x, b, y)
    # GeomLoss stops after a fixed schedule; near scaling=1 it has converged to ~1e-7 here
    ref = geomloss.SamplesLoss("sinkhorn", p=p, blur=blur, scaling=0.999, debias=True, backend="tensorized")(a, x, b, y)
    # GeomLoss's p=1 cost is sqrt(max(|x-y|^2, 1e-8)): a 1e-4 floor on the self-costs' diagonal
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7 if p == 2 else 1e-4)
    # the explicit mapping onto entrokit's conventions
    eps, cost, half = (2 * blur**2, "sqeuclidean", 0.5) if p == 2 else (blur, "euclidean", 1.0)
    direct = half * sinkhorn_divergence(x, y, a=a, b=b, eps=eps, cost=cost, tol=1e-12, max_iter=100_000)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-12)


def test_bad_options_and_calls():
    x, y, a, _ = _clouds()
    with pytest.raises(InputError, match="p must be 1 or 2"):
        SinkhornLoss(p=3)
    with pytest.raises(InputError, match="unbalanced"):
        SinkhornLoss(reach=1.0)
    with pytest.raises(InputError, match="scaling"):
        SinkhornLoss(scaling=1.0)
    with pytest.raises(TypeError, match="loss\\(x, y\\) or loss\\(a, x, b, y\\)"):
        SinkhornLoss()(x, y, a)
