"""The result builder of the entropic solvers: the returned potentials, gauge fix
included, have exact gradients (implicit = unroll = finite differences), dense and online."""

import pytest
import torch

import entrokit
from cost_only import CostOnly
from entrokit import PointCloud
from generators import random_problem

D = torch.float64
KW = dict(tol=1e-13, max_iter=100_000)


def _directions(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=D), torch.randn(m, generator=gen, dtype=D)


# scalar outputs of the potentials: single entries and random, *uncentred* directions
# (the gauge fix <a, f> = <b, g> is part of what is differentiated)
OUTPUTS = {
    "f[0]": lambda r, u, v: r.f[0],
    "g[-1]": lambda r, u, v: r.g[-1],
    "<f,u>+<g,v>": lambda r, u, v: (r.f * u).sum() + (r.g * v).sum(),
}


def _fd(fn, h=1e-5):
    return (fn(h) - fn(-h)) / (2 * h)


@pytest.mark.parametrize("out", OUTPUTS)
def test_potential_gradients_wrt_cost_match_unroll_and_finite_differences(out):
    a, b, C = random_problem(10, 9, seed=7)
    dC = torch.randn(10, 9, generator=torch.Generator().manual_seed(1), dtype=D)
    u, v = _directions(10, 9, seed=2)
    sel = OUTPUTS[out]
    derivs = {}
    for grad in ("implicit", "unroll"):
        Cm = C.clone().requires_grad_(True)
        (gC,) = torch.autograd.grad(sel(entrokit.sinkhorn(a, b, Cm, 0.1, grad=grad, **KW), u, v), Cm)
        derivs[grad] = (gC * dC).sum()
    fd = _fd(lambda h: sel(entrokit.sinkhorn(a, b, C + h * dC, 0.1, **KW), u, v))
    # the gauge fix used to be applied outside the graph: f[0] was -0.504 against -0.457
    torch.testing.assert_close(derivs["implicit"], derivs["unroll"], atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(derivs["implicit"], fd, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_gradcheck_potentials_wrt_cost(grad):
    a, b, C = random_problem(4, 5, seed=1, zeros=True)
    C.requires_grad_(True)

    def fn(C):
        res = entrokit.sinkhorn(a, b, C, 0.2, grad=grad, **KW)
        return res.f, res.g

    assert torch.autograd.gradcheck(fn, (C,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_gradcheck_potentials_wrt_weights(grad):
    # masses m*softmax: the mass direction moves the gauge constant too
    _, _, C = random_problem(4, 3, seed=2)
    th = torch.randn(4, dtype=D, requires_grad=True)
    ph = torch.randn(3, dtype=D, requires_grad=True)
    mass = torch.tensor(1.5, dtype=D, requires_grad=True)

    def fn(th, ph, mass):
        res = entrokit.sinkhorn(mass * th.softmax(0), mass * ph.softmax(0), C, 0.2, grad=grad, **KW)
        return res.f, res.g

    assert torch.autograd.gradcheck(fn, (th, ph, mass), eps=1e-6, atol=1e-6)


def test_newton_potential_gradients_match_finite_differences():
    """The Newton solvers pass their own adjoint solver; the gauge fix is the same."""
    a, b, C = random_problem(12, 10, seed=3)
    dC = torch.randn(12, 10, generator=torch.Generator().manual_seed(4), dtype=D)
    u, v = _directions(12, 10, seed=5)
    sel = OUTPUTS["<f,u>+<g,v>"]
    Cm = C.clone().requires_grad_(True)
    res = entrokit.sinkhorn_newton(a, b, Cm, 0.05, tol=1e-12)
    (gC,) = torch.autograd.grad(sel(res, u, v), Cm)
    fd = _fd(lambda h: sel(entrokit.sinkhorn_newton(a, b, C + h * dC, 0.05, tol=1e-12), u, v))
    torch.testing.assert_close((gC * dC).sum(), fd, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3], ids=["dense", "online-4-chunks"])
@pytest.mark.parametrize("out", [*OUTPUTS, "transport_cost"])
def test_point_cloud_gradients_implicit_unroll_and_finite_differences(chunk, out):
    """Online with 11 rows in tiles of 3: the autograd reductions run over 4 row chunks
    (dropping the column sums of all but the last chunk put the implicit gradient of
    ``transport_cost`` 0.28 away from -0.048)."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(11, 2, generator=gen, dtype=D)
    y0 = torch.randn(9, 2, generator=gen, dtype=D)
    dx, dy = torch.randn(11, 2, generator=gen, dtype=D), torch.randn(9, 2, generator=gen, dtype=D)
    u, v = _directions(11, 9, seed=6)
    sel = OUTPUTS.get(out, lambda r, u, v: r.transport_cost)

    def solve(x, y, grad="implicit"):
        geom = PointCloud(x, y, chunk_size=chunk)
        assert geom.is_online == (chunk is not None)
        return entrokit.sinkhorn(None, None, geom, 0.5, grad=grad, **KW)

    derivs = {}
    for grad in ("implicit", "unroll"):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        gx, gy = torch.autograd.grad(sel(solve(x, y, grad), u, v), (x, y))
        derivs[grad] = (gx * dx).sum() + (gy * dy).sum()
    fd = _fd(lambda h: sel(solve(x0 + h * dx, y0 + h * dy), u, v))
    torch.testing.assert_close(derivs["implicit"], derivs["unroll"], atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(derivs["implicit"], fd, atol=1e-8, rtol=1e-6)


class _CountingChecks(CostOnly):
    def __init__(self, U, V, calls):
        super().__init__(U, V)
        self.calls = calls

    def reshape_batch(self, batch_shape):  # keeps its type (and its check) in the solver
        n, m = self.shape
        return _CountingChecks(self.U.reshape(*batch_shape, n, -1), self.V, self.calls)

    def check_grad_mode(self, grad, a, b):
        self.calls.append(grad)
        if grad == "unroll":
            raise entrokit.InputError("this geometry cannot unroll")


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "solve"])
def test_gradient_mode_is_checked_once_before_solving(solver):
    a, b, C = random_problem(6, 5, seed=12)
    calls = []
    geom = _CountingChecks(C, torch.eye(5, dtype=D), calls)
    fn = getattr(entrokit, solver)
    kw = dict(eps=0.1) if solver == "solve" else {}
    args = (a, b, geom) if solver == "solve" else (a, b, geom, 0.1)
    fn(*args, grad="implicit", **kw)
    assert calls == ["implicit"]
    if solver != "sinkhorn_newton":  # Newton has no unrolled mode
        with pytest.raises(entrokit.InputError, match="cannot unroll"):
            fn(*args, grad="unroll", **kw)
        assert calls == ["implicit", "unroll"]  # raised before any iteration


def _saved_entries(fn):
    """Largest number of entries among the tensors autograd saves while ``fn`` runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, max(sizes)


@pytest.mark.parametrize("grad", ["implicit", "envelope"])
def test_point_cloud_value_builds_no_n_by_m_graph(grad):
    # the envelope value's gradient is the geometry's closed-form VJP, computed in
    # backward: forward saves nothing of size n x m (and transport_cost's graph is built
    # only when backward reaches it); the gradient still matches finite differences
    gen = torch.Generator().manual_seed(0)
    n, m = 40, 30
    x = torch.rand(n, 2, generator=gen, dtype=D, requires_grad=True)
    y = torch.rand(m, 2, generator=gen, dtype=D)
    a = torch.full((n,), 1 / n, dtype=D, requires_grad=True)
    b = torch.full((m,), 1 / m, dtype=D)
    res, largest = _saved_entries(lambda: entrokit.sinkhorn(a, b, PointCloud(x, y), 0.1, grad=grad, **KW))
    assert largest < n * m
    gx, ga = torch.autograd.grad(res.value, (x, a))
    dx = torch.randn(n, 2, generator=gen, dtype=D)
    da = torch.randn(n, generator=gen, dtype=D)
    da = da - da.mean()  # keeps the masses equal

    def value(h):
        return entrokit.sinkhorn(a.detach() + h * da, b, PointCloud(x.detach() + h * dx, y), 0.1, **KW).value

    torch.testing.assert_close((gx * dx).sum() + (ga * da).sum(), _fd(value), rtol=1e-6, atol=1e-10)


def test_deferred_gradients_are_once_differentiable():
    a, b, C = random_problem(6, 5, seed=3)
    C.requires_grad_()
    res = entrokit.sinkhorn(a, b, C, 0.5, **KW)
    (g,) = torch.autograd.grad(res.value, C, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), C)
