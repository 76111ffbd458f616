"""The cost objects: each tile against an independent formula, the closed-form transport-cost
gradient against autograd, the name resolution, and a new cost as one test-only class that
runs through every point-cloud backend."""

import pytest
import torch

import entrokit
from entrokit import DenseCost, InputError, PointCloud
from entrokit.geometry import _online
from entrokit.geometry.costs import Cost, CostCallable, Euclidean, PNorm, SqEuclidean, resolve_cost

F64 = torch.float64


def clouds(n=23, m=17, d=3, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*batch, n, d, generator=g, dtype=F64) + 5.0,
            0.8 * torch.rand(*batch, m, d, generator=g, dtype=F64) + 5.1)


def _pairwise(x, y):
    return x.unsqueeze(-2) - y.unsqueeze(-3)  # (..., n, m, d), the reference's temporary


@pytest.mark.parametrize("cost,ref", [
    (SqEuclidean(), lambda x, y: _pairwise(x, y).pow(2).sum(-1)),
    (Euclidean(), lambda x, y: _pairwise(x, y).pow(2).sum(-1).sqrt()),
    (PNorm(1.0), lambda x, y: _pairwise(x, y).abs().sum(-1)),
    (PNorm(1.5), lambda x, y: _pairwise(x, y).abs().pow(1.5).sum(-1)),
    (PNorm(2.0), lambda x, y: _pairwise(x, y).pow(2).sum(-1)),
], ids=["sqeuclidean", "euclidean", "pnorm1", "pnorm1.5", "pnorm2"])
def test_cost_matrix_equals_the_pairwise_formula_and_is_differentiable(cost, ref):
    x, y = clouds()
    torch.testing.assert_close(cost(x, y), ref(x, y), rtol=1e-12, atol=1e-12)
    # far from the origin the expansion stays exact to the clouds' radius (centred first)
    torch.testing.assert_close(cost(x + 1e6, y + 1e6), ref(x, y), rtol=0, atol=1e-8)
    xs, ys = clouds(n=5, m=4, d=2, batch=())
    xs.requires_grad_()
    ys.requires_grad_()
    assert torch.autograd.gradcheck(cost, (xs, ys))
    assert cost.symmetric and cost.translation_invariant and cost.parameter_free
    torch.testing.assert_close(cost.tile_t(y, x), cost.tile(x, y).transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_sqeuclidean_transport_cost_vjp_equals_autograd_at_a_fixed_plan():
    x, y = clouds(n=9, m=7, d=2)
    P = torch.rand(2, 9, 7, generator=torch.Generator().manual_seed(2), dtype=F64)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = torch.autograd.grad((SqEuclidean()(xg, yg) * P).sum(), (xg, yg))
    got = SqEuclidean().transport_cost_vjp(x, y, lambda V: P @ V, lambda U: P.transpose(-1, -2) @ U,
                                           P.sum(-1), P.sum(-2))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError, match="no closed-form transport-cost gradient"):
        Euclidean().transport_cost_vjp(x, y, None, None, None, None)


def test_names_resolve_once_and_bad_names_raise():
    assert isinstance(resolve_cost("sqeuclidean"), SqEuclidean)
    assert isinstance(resolve_cost("euclidean"), Euclidean)
    assert resolve_cost("pnorm", 1.5).p == 1.5
    own = PNorm(3.0)
    assert resolve_cost(own) is own
    wrapped = resolve_cost(lambda u, v: torch.cdist(u, v))
    assert isinstance(wrapped, CostCallable) and not wrapped.parameter_free
    with pytest.raises(InputError, match="got 'cosine'"):
        resolve_cost("cosine")
    with pytest.raises(InputError, match="needs the exponent p"):
        resolve_cost("pnorm")
    with pytest.raises(InputError, match=r"finite exponent p >= 1.*p=0.5"):
        PNorm(0.5)
    with pytest.raises(InputError, match="only used with cost='pnorm'"):
        resolve_cost("euclidean", 2.0)
    with pytest.raises(TypeError, match="a string, a Cost or a callable"):
        resolve_cost(3)
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        PointCloud(*clouds(), lambda u, v: 1.0).cost_matrix()
    assert SqEuclidean().has_keops and not CostCallable(torch.cdist).has_keops


class Skewed(Cost):
    r"""A test-only cost, :math:`c(x, y) = \sum_k (x_k - 2 y_k)^2 + s\,x_1`: neither symmetric
    nor translation invariant, with a parameter ``s`` of its own. Only :meth:`tile`."""

    name = "skewed"

    def __init__(self, s):
        self.s = s

    def tile(self, x, y):
        out = self.s * x[..., :, :1]
        for k in range(x.shape[-1]):
            out = out + (x[..., :, k].unsqueeze(-1) - 2.0 * y[..., :, k].unsqueeze(-2)) ** 2
        return out


def _reference(x, y, s):
    return (x.unsqueeze(-2) - 2.0 * y.unsqueeze(-3)).pow(2).sum(-1) + s * x[..., :, :1]


@pytest.fixture
def small_tiles(monkeypatch):
    """A tile table of 8 columns: the pass runs over several row *and* column blocks."""
    monkeypatch.setitem(_online.TILES, "cpu", (40, 8))


def test_a_new_cost_is_one_class_and_runs_on_every_backend(small_tiles):
    x, y = clouds(n=21, m=19, d=2, batch=(2,))
    s = torch.tensor(0.3, dtype=F64)
    dense, online = PointCloud(x, y, Skewed(s), online=False), PointCloud(x, y, Skewed(s), chunk_size=5)
    torch.testing.assert_close(dense.cost_matrix(), _reference(x, y, s), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    f, h = 0.1 * torch.randn(2, 21, generator=g, dtype=F64), 0.1 * torch.randn(2, 19, generator=g, dtype=F64)
    a, b = torch.rand(2, 21, generator=g, dtype=F64), torch.rand(2, 19, generator=g, dtype=F64)
    for axis, (hh, w) in ((1, (h, b)), (0, (f, a))):
        torch.testing.assert_close(online.softmin(hh, w.log(), 0.2, axis), dense.softmin(hh, w.log(), 0.2, axis),
                                   rtol=0, atol=1e-12)
    for u, v in zip(online.plan_reduce(f, h, a, b, 0.2), dense.plan_reduce(f, h, a, b, 0.2)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    lo, hi = online.cost_bounds()
    C = _reference(x, y, s).flatten(-2)
    torch.testing.assert_close((lo, hi), (C.amin(-1), C.amax(-1)), rtol=0, atol=1e-12)
    # a whole solve: potentials and the gradient in the points and the cost's own parameter
    out = []
    for on in (False, True):
        xg, yg, sg = x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()
        geom = PointCloud(xg, yg, Skewed(sg), online=on, chunk_size=5 if on else None)
        res = entrokit.sinkhorn(None, None, geom, 0.5, tol=1e-11)
        assert bool(res.converged.all())
        out.append((res.f, res.g, res.transport_cost, *torch.autograd.grad(res.value.sum(), (xg, yg, sg))))
    for u, v in zip(*out):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-8)


def test_the_online_plan_of_a_cost_with_a_parameter_has_the_gradients_of_autograd(small_tiles):
    x, y = clouds(n=11, m=13, d=2, batch=())
    s = torch.tensor(0.3, dtype=F64, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    f, h = 0.1 * torch.randn(11, generator=g, dtype=F64), 0.1 * torch.randn(13, generator=g, dtype=F64)
    a, b = torch.rand(11, generator=g, dtype=F64), torch.rand(13, generator=g, dtype=F64)
    ins = [t.clone().requires_grad_() for t in (x, y, f, h, a, b)]
    V = torch.randn(13, 2, generator=g, dtype=F64)
    got = PointCloud(ins[0], ins[1], Skewed(s), chunk_size=3).plan_reduce(*ins[2:], 0.4)
    got = (*got, PointCloud(ins[0], ins[1], Skewed(s), chunk_size=3).plan_matvec(*ins[2:], 0.4, V, 1))
    P = torch.exp((ins[2].unsqueeze(-1) + ins[3] - _reference(ins[0], ins[1], s)) / 0.4) * ins[4].unsqueeze(-1) * ins[5]
    want = (P.sum(-1), P.sum(-2), (P * _reference(ins[0], ins[1], s)).sum(), P @ V)
    weights = [torch.randn(t.shape, generator=g, dtype=F64) for t in want]
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(sum((u * w).sum() for u, w in zip(got, weights)), [*ins, s])
    g_want = torch.autograd.grad(sum((u * w).sum() for u, w in zip(want, weights)), [*ins, s])
    for u, v in zip(g_got, g_want):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cost,kw", [("sqeuclidean", {}), ("euclidean", {}), ("pnorm", {"p": 1.5})])
def test_online_plan_sums_in_one_pass_over_row_and_column_blocks(small_tiles, cost, kw):
    """Row sums, column sums and <C, P> (for the squared Euclidean cost from P [1, y]),
    accumulated in float64 from float32 entries and rounded entries, equal the dense path's;
    and the custom backward of the online plan over several row and column blocks."""
    x, y = clouds(n=30, m=26, d=2)
    g = torch.Generator().manual_seed(5)
    f, h = 0.1 * torch.randn(2, 30, generator=g, dtype=F64), 0.1 * torch.randn(2, 26, generator=g, dtype=F64)
    a, b = torch.rand(2, 30, generator=g, dtype=F64), torch.rand(2, 26, generator=g, dtype=F64)
    b[0, 3] = 0.0
    dense, online = PointCloud(x, y, cost, online=False, **kw), PointCloud(x, y, cost, chunk_size=7, **kw)
    for opts in ({}, {"accumulate": F64}, {"accumulate": F64, "round_to": torch.float32}):
        for u, v in zip(online.plan_reduce(f, h, a, b, 0.1, **opts), dense.plan_reduce(f, h, a, b, 0.1, **opts)):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    x32, y32 = x.float(), y.float()
    for u, v in zip(PointCloud(x32, y32, cost, chunk_size=7, **kw).plan_reduce(
                        f.float(), h.float(), a.float(), b.float(), 0.1, accumulate=F64),
                    PointCloud(x32, y32, cost, online=False, **kw).plan_reduce(
                        f.float(), h.float(), a.float(), b.float(), 0.1, accumulate=F64)):
        torch.testing.assert_close(u, v, rtol=2e-6, atol=1e-9)
    ins = [t.clone().requires_grad_() for t in (x, y, f, h, a, b)]
    w = [torch.randn(s, generator=g, dtype=F64) for s in ((2, 30), (2, 26), (2,))]

    def grads(online_):
        geom = PointCloud(ins[0], ins[1], cost, chunk_size=7 if online_ else None, online=online_, **kw)
        out = geom.plan_reduce(*ins[2:], 0.1)
        return torch.autograd.grad(sum((u * v).sum() for u, v in zip(out, w)), ins)

    for u, v in zip(grads(True), grads(False)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("online", [False, True])
def test_parameter_of_a_cost_class_gets_the_envelope_gradients(online):
    # d<C, P>/ds at the frozen plan is <dC/ds, P> = sum_i P_i. x_i1 (grad="envelope"), and the
    # value's derivative (envelope theorem) is the same sum: independent closed forms
    x, y = clouds(n=11, m=9, d=2, batch=())
    s = torch.tensor(0.3, dtype=F64, requires_grad=True)
    # the points need no gradient, only the cost's own parameter
    geom = PointCloud(x, y, Skewed(s), online=online, chunk_size=4 if online else None)
    res = entrokit.sinkhorn(None, None, geom, 0.5, tol=1e-12, grad="envelope")
    expected = (res.plan.detach() * x[:, :1]).sum()
    (d_tc,) = torch.autograd.grad(res.transport_cost, s)
    (d_value,) = torch.autograd.grad(res.value, s)
    torch.testing.assert_close(d_tc, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d_value, expected, rtol=1e-9, atol=1e-12)

def _weighted_cost(w):
    r"""A cost callable holding a parameter: :math:`\sum_k w_k (x_k - y_k)^2` by the
    expansion (no ``n x m x d`` temporary)."""
    def cost(xs, ys):
        return ((xs.pow(2) * w).sum(-1, keepdim=True) - 2 * (xs * w) @ ys.mT
                + (ys.pow(2) * w).sum(-1).unsqueeze(-2))
    return cost


def _weighted_reference(x, y, w):
    return (_pairwise(x, y).pow(2) * w).sum(-1)


def test_the_leaves_a_cost_callable_holds_are_found_through_its_graph():
    x, y = clouds(n=4, m=3, d=3, batch=())
    raw = torch.randn(3, dtype=F64, requires_grad=True)
    w = torch.nn.functional.softplus(raw)  # not a leaf: the leaf behind it is found
    assert _online.cost_leaves(CostCallable(_weighted_cost(w)), x, y) == (raw,)
    assert _online.cost_leaves(CostCallable(_weighted_cost(w.detach())), x, y) == ()
    assert _online.cost_leaves(SqEuclidean(), x, y) == ()
    with torch.no_grad():
        assert _online.cost_leaves(CostCallable(_weighted_cost(w)), x, y) == ()


@pytest.mark.parametrize("points_grad", [True, False], ids=["points-and-w", "w-only"])
def test_online_reductions_of_a_cost_callable_gradcheck_in_the_points_and_its_parameter(small_tiles, points_grad):
    """plan_reduce, plan_matvec (both axes) and the soft-min of a cost callable with a
    parameter ``w``: float64 gradcheck in the points and ``w`` (over several row and column
    blocks), and the values and gradients of the dense path (an independent graph)."""
    x, y = clouds(n=9, m=7, d=3, batch=(2,), seed=6)
    g = torch.Generator().manual_seed(7)
    f, h = 0.1 * torch.randn(2, 9, generator=g, dtype=F64), 0.1 * torch.randn(2, 7, generator=g, dtype=F64)
    a, b = torch.rand(2, 9, generator=g, dtype=F64), torch.rand(2, 7, generator=g, dtype=F64)
    V, U = torch.randn(2, 7, 2, generator=g, dtype=F64), torch.randn(2, 9, 2, generator=g, dtype=F64)
    w0 = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    x, y = x - 5.0, y - 5.0  # the expansion's cancellation at the clouds' own scale

    def outputs(online, x, y, w):
        geom = PointCloud(x, y, _weighted_cost(w), online=online, chunk_size=4 if online else None)
        return (*geom.plan_reduce(f, h, a, b, 0.3), geom.plan_matvec(f, h, a, b, 0.3, V, 1),
                geom.plan_matvec(f, h, a, b, 0.3, U, 0), geom.softmin(h, b.log(), 0.3, 1),
                geom.softmin(f, a.log(), 0.3, 0), geom.marginals(f, h, a, b, 0.3)[0])

    def flat(x, y, w):
        return torch.cat([t.flatten() for t in outputs(True, x, y, w)])

    args = (x.clone().requires_grad_(points_grad), y.clone().requires_grad_(points_grad),
            w0.clone().requires_grad_())
    if points_grad:
        assert torch.autograd.gradcheck(flat, args)
    else:
        assert torch.autograd.gradcheck(lambda w: flat(args[0], args[1], w), (args[2],))
    wanted = [t for t in args if t.requires_grad]
    weights = [torch.randn(t.shape, generator=g, dtype=F64) for t in outputs(False, *args)]
    got, ref = outputs(True, *args), outputs(False, *args)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(sum((u * c).sum() for u, c in zip(got, weights)), wanted)
    g_ref = torch.autograd.grad(sum((u * c).sum() for u, c in zip(ref, weights)), wanted)
    for u, v in zip(g_got, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def _geometry(kind, x, y, w):
    if kind == "reference":
        return DenseCost(_weighted_reference(x, y, w))
    online = kind == "online"
    return PointCloud(x, y, _weighted_cost(w), online=online, chunk_size=5 if online else None)


def test_a_solve_with_a_cost_callable_gives_its_parameter_the_dense_gradient(small_tiles):
    """The whole online solve (``backward()``, as a training loop calls it): ``w.grad`` and
    the points' gradients of the value and the transport cost (implicit, and frozen-plan),
    equal the dense path's and those of the pairwise reference as a :class:`DenseCost`."""
    x, y = clouds(n=16, m=12, d=3, batch=(), seed=8)
    x, y = x - 5.0, y - 5.0
    out = []
    for kind in ("dense", "online", "reference"):
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        w = torch.tensor([1.0, 0.5, 2.0], dtype=F64, requires_grad=True)
        res = entrokit.sinkhorn(None, None, _geometry(kind, xg, yg, w), 0.5, tol=1e-11)
        assert bool(res.converged)
        (res.value + res.transport_cost).backward()  # the potentials' implicit gradient reaches w too
        frozen = entrokit.sinkhorn(None, None, _geometry(kind, xg, yg, w), 0.5, tol=1e-11, grad="envelope")
        out.append((res.value, res.transport_cost, w.grad, xg.grad, yg.grad,
                    *torch.autograd.grad(frozen.transport_cost, (w, xg, yg))))
    for other in out[1:]:
        for u, v in zip(out[0], other):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-8)
