"""Truncated multiscale Sinkhorn (the driver).

The reference is the dense/online Sinkhorn on the same points; the truncation must not
change the answer beyond the stated tolerance, and the certified ``marginal_error`` must
bound the error of the *dense* plan of the returned potentials (recomputed here in
float64 over all pairs).
"""

import functools
import math

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit.geometry import PointCloud
from entrokit.geometry.multiscale import (
    TruncatedPointCloud,
    default_cluster_scale,
    extrapolate_potentials,
    grid_cluster,
)
from entrokit.problem import log_weights
from entrokit.solvers.multiscale import multiscale_sinkhorn
from generators import clouds, weights
from ot_checks import centred_gap, dense_marginal_error

D = torch.float64


# ---------------------------------------------------------------------------------------
# the driver against dense Sinkhorn
# ---------------------------------------------------------------------------------------
CASES = [  # (d, dtype, eps, tol)
    (2, torch.float64, 5e-3, 1e-6),
    (3, torch.float64, 1e-2, 1e-6),
    (2, torch.float32, 5e-3, 1e-4),
    (3, torch.float32, 1e-2, 1e-4),
]


@functools.cache
def dense_reference(d, dtype, eps):
    """The problem in ``dtype`` and its dense float64 Sinkhorn solution (tol 1e-8)."""
    n, m = 2000, 1600
    x, y = clouds(n, m, d, dtype=dtype, seed=d)
    a = weights(n, zeros=(0, 5), dtype=dtype, seed=1)
    b = weights(m, zeros=(3,), dtype=dtype, seed=2)
    ref = entrokit.sinkhorn(a.to(D), b.to(D), PointCloud(x.to(D), y.to(D)), eps, tol=1e-8)
    return x, y, a, b, ref


@pytest.mark.parametrize("d,dtype,eps,tol", CASES, ids=["2d-f64", "3d-f64", "2d-f32", "3d-f32"])
def test_matches_dense_sinkhorn(d, dtype, eps, tol):
    x, y, a, b, ref = dense_reference(d, dtype, eps)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert bool(res.converged) and float(res.marginal_error) <= tol
    assert res.f.shape == a.shape and res.g.shape == b.shape and res.f.dtype == dtype
    # the contract, recomputed over all n m pairs in float64 from the returned potentials
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    # the same solution: potentials up to the additive constant, transport cost, marginals
    gap = (2e-3 if dtype == D else 2e-2) * eps
    assert centred_gap(res.f, ref.f, a > 0) <= gap and centred_gap(res.g, ref.g, b > 0) <= gap
    assert math.isclose(float(res.transport_cost), float(ref.transport_cost), rel_tol=1e-6 if dtype == D else 1e-4)
    row, col = res.marginals()
    assert float((row.to(D) - a.to(D)).abs().sum() + (col.to(D) - b.to(D)).abs().sum()) <= tol
    # the certified error splits into the kept plan's and twice the dropped mass
    info = res.info
    assert info.kept_marginal_error[0] + 2 * info.dropped_mass_bound[0] <= tol
    assert 0.0 < info.kept_fraction[0] < 1.0


def test_coarse_grid_continues_the_schedule_on_the_fine_level():
    """Large clusters (s^2 > eps): the coarse solve stops at s^2 and the fine level runs
    the remaining eps stages, re-truncating at each."""
    eps, tol = 1e-2, 1e-6
    x, y, a, b, ref = dense_reference(3, D, eps)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol, cluster_scale=0.2)
    assert res.info.coarse_eps == pytest.approx(0.04) and res.info.stages == 3
    assert bool(res.converged) and float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    assert centred_gap(res.f, ref.f, a > 0) <= 2e-3 * eps


def test_truncation_is_re_expanded_or_reported(monkeypatch):
    """A kept set chosen too small (a 4 tol budget) is enlarged after the solve; with no
    second round allowed, the result says converged=False instead of changing silently."""
    import entrokit.solvers.multiscale as ms

    eps, tol = 1e-2, 1e-6
    x, y, a, b, ref = dense_reference(3, D, eps)
    monkeypatch.setattr(ms, "DROP_PLAN", 4.0)
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert res.info.rounds == 2 and bool(res.converged)
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    assert centred_gap(res.f, ref.f, a > 0) <= 2e-3 * eps
    with pytest.warns(entrokit.ConvergenceWarning, match="multiscale_sinkhorn did not converge"):
        bad = multiscale_sinkhorn(a, b, x, y, eps, tol=tol, max_rounds=1)
    assert not bool(bad.converged) and float(bad.marginal_error) > tol
    assert bad.info.dropped_mass_bound[0] > tol / 8
    # the certified bound really bounds the dense plan's error
    assert float(dense_marginal_error(bad, x, y, a, b, eps)) <= float(bad.marginal_error)


def test_batched_equals_per_problem_and_padding_is_inert():
    """B=3 problems with per-problem clusters and zero-weight padding: each equals its
    own solve, and padding points do not change the real points' potentials."""
    n, m, eps, tol = 700, 600, 5e-3, 1e-6
    x, y = clouds(n, m, 2, batch=(3,), seed=7)
    x[1] = 0.5 * x[1] + 0.3  # another scale: another grid
    y[2] = y[2] * torch.tensor([1.0, 0.2], dtype=D)  # elongated
    a = weights(n, batch=(3,), seed=8)
    b = weights(m, batch=(3,), seed=9)
    # problem 0 is padded: its last 150 source points weigh 0 and sit at the origin
    a[0, -150:] = 0.0
    a[0] /= a[0].sum()
    x[0, -150:] = 0.0
    res = multiscale_sinkhorn(a, b, x, y, eps, tol=tol)
    assert res.f.shape == (3, n) and res.g.shape == (3, m) and bool(res.converged.all())
    for k in range(3):
        one = multiscale_sinkhorn(a[k], b[k], x[k], y[k], eps, tol=tol)
        assert centred_gap(res.f[k], one.f, a[k] > 0) <= 1e-3 * eps and centred_gap(res.g[k], one.g) <= 1e-3 * eps
        assert math.isclose(float(res.transport_cost[k]), float(one.transport_cost), rel_tol=1e-6)
        assert float(dense_marginal_error(one, x[k], y[k], a[k], b[k], eps)) <= tol
    assert bool((dense_marginal_error(res, x, y, a, b, eps) <= tol).all())
    real = multiscale_sinkhorn(a[0, :-150], b[0], x[0, :-150], y[0], eps, tol=tol)
    assert centred_gap(res.f[0, :-150], real.f) <= 1e-3 * eps and centred_gap(res.g[0], real.g) <= 1e-3 * eps
    # the padding points' potentials are finite soft-mins
    assert bool(torch.isfinite(res.f).all())


def test_original_order_is_restored():
    x, y = clouds(600, 500, 3, seed=11)
    p = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    q = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    res = multiscale_sinkhorn(None, None, x, y, 1e-2, tol=1e-7)
    res_p = multiscale_sinkhorn(None, None, x[p], y[q], 1e-2, tol=1e-7)
    assert torch.allclose(res_p.f, res.f[p], atol=1e-7) and torch.allclose(res_p.g, res.g[q], atol=1e-7)


def test_truncation_keeps_a_small_fraction_in_3d():
    """20k points per side in 3-D: the driver's truncation, built from the coarse solve,
    keeps a small fraction of the n m pairs; its soft-mins are exact on the kept blocks."""
    n = m = 20000
    eps, tol = 1e-3, 1e-4
    x, y = clouds(n, m, 3, dtype=torch.float32, seed=5)
    x3, y3 = x[None], y[None]
    a3 = torch.full((1, n), 1.0 / n)
    s = default_cluster_scale(x3, y3, a3, a3)
    cx, cy = grid_cluster(x3, a3, s), grid_cluster(y3, a3, s)
    coarse = entrokit.sinkhorn(cx.weights.double(), cy.weights.double(),
                               PointCloud(cx.centroids.double(), cy.centroids.double()), eps,
                               tol=1e-3, eps_scaling=True, grad="envelope", check_inputs=False)
    f, g = extrapolate_potentials(x3, y3, cx, cy, coarse.f, coarse.g, eps)
    geom = TruncatedPointCloud.from_potentials(x3, y3, f, g, eps, a=a3, b=a3, mass_budget=tol / 32,
                                               clusters=(cx, cy))
    assert float(geom.kept_fraction) < 0.1  # far fewer than n m pairs
    bound = float(geom.dropped_mass_bound(f, g, a3, a3, eps))
    assert bound <= tol / 32
    # 64 rows against all 20k columns in float64: the truncated soft-min is the dense one
    # restricted to the kept blocks, and the dropped part is within the bound
    rows = torch.arange(0, n, n // 64)
    C = ((x[rows, None].double() - y[None].double()) ** 2).sum(-1)
    kept = geom.keep[0][cx.labels[0, rows]][:, cy.labels[0]]
    z = (g.double() - C) / eps + math.log(1.0 / m)
    want = -eps * torch.logsumexp(z.masked_fill(~kept, -float("inf")), -1)
    got = geom.softmin(g, log_weights(a3), eps, 1)[0, rows].double()
    assert float((got - want).abs().max()) <= 1e-3 * eps  # float32 rounding of the exponents
    dropped = (torch.exp(z + f[0, rows, None].double() / eps) / n * ~kept).sum()
    assert float(dropped) <= bound
@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_gradients_match_dense(grad):
    """Gradients of the truncated solve (through the kept blocks) equal the dense ones:
    value (envelope theorem) and transport cost plus a potential term (implicit)."""
    x, y = clouds(240, 200, 2, seed=2)
    a = weights(240, seed=3)
    eps = 5e-3
    probe = torch.linspace(0.0, 1.0, 240, dtype=D)

    def loss(res):
        if grad == "envelope":
            return res.value
        return res.transport_cost + 1e-2 * (res.f * probe).sum()

    xr, ar = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    gx, ga = torch.autograd.grad(loss(multiscale_sinkhorn(ar, None, xr, y, eps, tol=1e-10, grad=grad)), (xr, ar))
    xd, ad = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    gxd, gad = torch.autograd.grad(loss(entrokit.sinkhorn(ad, None, PointCloud(xd, y), eps, tol=1e-10, grad=grad)),
                                   (xd, ad))
    assert torch.allclose(gx, gxd, atol=1e-7 * float(gxd.abs().max()))
    assert torch.allclose(ga, gad, atol=1e-7 * float(gad.abs().max()))


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------
class TestBadInputs:
    x, y = clouds(50, 40, 2)

    def test_dimension_above_three(self):
        x4, y4 = clouds(50, 40, 4)
        with pytest.raises(InputError, match=r"needs d <= 3; got d=4.*PointCloud\(x, y, chunk_size"):
            multiscale_sinkhorn(None, None, x4, y4, 1e-2)

    @pytest.mark.parametrize("bad,what", [(float("nan"), "NaN"), (float("inf"), "infinite")])
    def test_non_finite_points(self, bad, what):
        x = self.x.clone()
        x[3, 1] = bad
        with pytest.raises(InputError, match=f"x contains (an )?{what}.*expected finite coordinates"):
            multiscale_sinkhorn(None, None, x, self.y, 1e-2)
        y = self.y.clone()
        y[0, 0] = bad
        with pytest.raises(InputError, match=f"y contains (an )?{what}.*expected finite coordinates"):
            multiscale_sinkhorn(None, None, self.x, y, 1e-2)

    @pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "5", True])
    def test_bad_truncate(self, value):
        with pytest.raises(InputError, match=r"truncate must be a finite number > 0.*truncate=5.0"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, truncate=value)

    @pytest.mark.parametrize("value", [0.0, -0.1, float("inf"), "auto"])
    def test_bad_cluster_scale(self, value):
        with pytest.raises(InputError, match=r"cluster_scale must be a finite number > 0.*or None"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, cluster_scale=value)

    def test_mismatched_shapes(self):
        with pytest.raises(InputError, match=r"weights do not match the points: expected a of shape \(50,\)"):
            multiscale_sinkhorn(torch.full((49,), 1 / 49, dtype=D), None, self.x, self.y, 1e-2)
        with pytest.raises(InputError, match="same point dimension"):
            multiscale_sinkhorn(None, None, self.x, clouds(40, 40, 3)[1], 1e-2)
        with pytest.raises(InputError, match="batch axes of x and y differ"):
            multiscale_sinkhorn(None, None, self.x.expand(2, 50, 2), self.y.expand(3, 40, 2), 1e-2)
        with pytest.raises(InputError, match=r"shapes \(\.\.\., n, d\)"):
            multiscale_sinkhorn(None, None, self.x[:, 0], self.y[:, 0], 1e-2)

    def test_bad_options_and_weights(self):
        with pytest.raises(InputError, match="does not unroll"):
            multiscale_sinkhorn(None, None, self.x, self.y, 1e-2, grad="unroll")
        with pytest.raises(InputError, match="total masses differ"):
            multiscale_sinkhorn(torch.full((50,), 0.03, dtype=D), None, self.x, self.y, 1e-2)
        with pytest.raises(InputError, match="eps must be a finite number > 0"):
            multiscale_sinkhorn(None, None, self.x, self.y, -1.0)


@pytest.mark.parametrize("n", [300, 1000])
def test_one_dimensional_points_converge_with_the_defaults(n):
    """d = 1: the extrapolated potentials are nearly a fixed point in f alone, so a first
    check on the unsymmetric pair stopped the fine solve after one sweep (certified error
    ~1e-5, converged=False on every seed). Each fine solve now starts from g = softmin(f)."""
    eps, tol = 1e-2, 1e-6
    x, y = clouds(n, n, 1, seed=n)
    a, b = weights(n, seed=1), weights(n, seed=2)
    res = multiscale_sinkhorn(a, b, x, y, eps)
    assert bool(res.converged) and float(res.marginal_error) <= tol
    assert float(dense_marginal_error(res, x, y, a, b, eps)) <= tol
    ref = entrokit.sinkhorn(a, b, PointCloud(x, y), eps, tol=1e-8)
    assert centred_gap(res.f, ref.f) <= 2e-3 * eps


def test_result_built_under_inference_mode_is_usable_afterwards():
    """plan / apply of a result made in torch.inference_mode() write into the geometry's
    workspaces outside it (RuntimeError: Inplace update to inference tensor, before)."""
    eps = 1e-2
    x, y = clouds(300, 200, 2, seed=3)
    with torch.inference_mode():
        res = multiscale_sinkhorn(None, None, x, y, eps)
    ref = multiscale_sinkhorn(None, None, x, y, eps)
    P = res.plan
    torch.testing.assert_close(P, ref.plan)
    v = torch.linspace(0.0, 1.0, 200, dtype=D)
    torch.testing.assert_close(res.apply(v), P @ v)
    row, col = res.marginals()
    torch.testing.assert_close(row, P.sum(-1))


def test_block_entries_must_be_a_positive_int():
    x, y = clouds(50, 40, 2)
    with pytest.raises(InputError, match="block_entries must be an int >= 1, got 0"):
        multiscale_sinkhorn(None, None, x, y, 1e-2, block_entries=0)
    with pytest.raises(TypeError, match="block_entries must be an int >= 1"):
        multiscale_sinkhorn(None, None, x, y, 1e-2, block_entries=2.5)


def test_one_convergence_warning_per_call():
    """float32 at a tol it cannot certify: the certification of the kept plan and the final
    verdict were two ConvergenceWarnings; now one, carrying both reasons."""
    import warnings

    x, y = clouds(300, 300, 1, seed=0, dtype=torch.float32)
    x, y = x * 1e6, y * 1e6  # coordinates 1e6 (eps in squared units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = multiscale_sinkhorn(None, None, x, y, 1e9)
    conv = [w for w in caught if issubclass(w.category, entrokit.ConvergenceWarning)]
    assert not bool(res.converged)
    assert len(conv) == 1 and "multiscale_sinkhorn did not converge" in str(conv[0].message)
