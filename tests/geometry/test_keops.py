"""KeOpsPointCloud: its KeOps reductions equal the torch path (float64, to 1e-10).

KeOps compiles each formula on first use (seconds each, cached in ~/.cache/keops*), so the
tests share few formulas: one lse / plan-sum / plan-cost kernel per cost (both axes use
the same kernel, the cost being symmetric), the bounds kernel and a handful of gradient
kernels. The numerical tests skip only when pykeops is missing, no C++ compiler is found
(KeOps's own rule, :func:`~entrokit.geometry.keops.find_cxx_compiler`), or it cannot
compile here; the module's doctest skips likewise (conftest.py at the root).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import entrokit
from entrokit import InputError, PointCloud
from entrokit.geometry import DenseCost
from entrokit.geometry.keops import KeOpsPointCloud, cxx_compiler, find_cxx_compiler

D = torch.float64
EPS = 0.1
COSTS = [("sqeuclidean", None), ("euclidean", None), ("pnorm", 1.5)]
_PROBED: dict[str, str | None] = {}


def _probe(device: torch.device) -> str | None:
    """``None`` when KeOps compiles and runs a trivial reduction on ``device``, else why not."""
    try:
        from pykeops.torch import LazyTensor

        t = torch.arange(3.0, dtype=D, device=device)
        s = (LazyTensor(t[:, None, None]) * LazyTensor(t[None, :, None])).sum(dim=1)
        assert torch.allclose(s.reshape(-1).cpu(), torch.tensor([0.0, 3.0, 6.0], dtype=D))
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain means "cannot compile"
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture
def kdevice(device):
    """The conftest device, when KeOps is installed and compiles on it (else skip)."""
    pytest.importorskip("pykeops", reason="KeOpsPointCloud needs pykeops: pip install 'entrokit[keops]'")
    compiler, why = cxx_compiler()
    if compiler is None:
        pytest.skip(f"KeOps compiles its kernels with a C++ compiler: {why}")
    key = str(device)
    if key not in _PROBED:
        _PROBED[key] = _probe(device)
    if _PROBED[key] is not None:
        pytest.skip(f"pykeops is installed but cannot compile a kernel on {key}: {_PROBED[key]}")
    return device


def _data(device, batch=(), n=40, m=30, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=gen, dtype=D)
    y = torch.rand(*batch, m, d, generator=gen, dtype=D)
    a = torch.rand(*batch, n, generator=gen, dtype=D) + 0.1
    b = torch.rand(*batch, m, generator=gen, dtype=D) + 0.1
    a[..., 0] = 0.0  # zero weights drop out exactly
    b[..., -1] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    f = 0.1 * torch.randn(*batch, n, generator=gen, dtype=D)
    g = 0.1 * torch.randn(*batch, m, generator=gen, dtype=D)
    return [t.to(device) for t in (x, y, a, b, f, g)]


def _reference_cost(x, y, cost, p):
    """The cost matrix computed independently of both geometries."""
    if cost == "sqeuclidean":
        return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    if cost == "euclidean":
        return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1).sqrt()
    return ((x[..., :, None, :] - y[..., None, :, :]).abs() ** p).sum(-1)


def _batched(*ts):
    """Geometry primitives take batched vectors ``(B, n)``."""
    return [t if t.dim() == 2 else t.unsqueeze(0) for t in ts]


def assert_close(actual, expected, tol=1e-10):
    """Equal to ``tol`` relative to the size of ``expected`` (absolute below 1)."""
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"max |diff| = {err:.3e} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize(("cost", "p"), COSTS, ids=[c for c, _ in COSTS])
def test_softmin_plan_reductions_and_matvec_match_dense(kdevice, cost, p):
    x, y, a, b, f, g = _data(kdevice)
    geom = KeOpsPointCloud(x, y, cost, p=p)
    dense = DenseCost(_reference_cost(x, y, cost, p))
    a, b, f, g = _batched(a, b, f, g)
    for axis, (h, w) in ((1, (g, b)), (0, (f, a))):
        mx, s = geom.lse(h, w.log(), EPS, axis)
        assert mx.shape == s.shape == (1, geom.shape[1 - axis])
        assert not mx.requires_grad
        assert_close(geom.softmin(h, w.log(), EPS, axis), dense.softmin(h, w.log(), EPS, axis))
    for got, want in zip(geom.plan_reduce(f, g, a, b, EPS), dense.plan_reduce(f, g, a, b, EPS)):
        assert_close(got, want)
    for got, want in zip(geom.marginals(f, g, a, b, EPS), dense.marginals(f, g, a, b, EPS)):
        assert_close(got, want)
    assert_close(geom.transport_cost(f, g, a, b, EPS), dense.transport_cost(f, g, a, b, EPS))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(1, geom.shape[1], generator=gen, dtype=D).to(kdevice)
    u = torch.randn(1, geom.shape[0], generator=gen, dtype=D).to(kdevice)
    assert_close(geom.plan_matvec(f, g, a, b, EPS, v, 1), dense.plan_matvec(f, g, a, b, EPS, v, 1))
    assert_close(geom.plan_matvec(f, g, a, b, EPS, u, 0), dense.plan_matvec(f, g, a, b, EPS, u, 0))
    # the torch form of the cost (plans, cost_matrix) is the same cost
    assert_close(geom.cost_matrix(), dense.C)


def test_batched_reductions_and_cost_bounds_match_dense(kdevice):
    x, y, a, b, f, g = _data(kdevice, batch=(3,))
    geom, dense = KeOpsPointCloud(x, y), PointCloud(x, y)
    for axis, (h, w) in ((1, (g, b)), (0, (f, a))):
        assert_close(geom.softmin(h, w.log(), EPS, axis), dense.softmin(h, w.log(), EPS, axis))
    for got, want in zip(geom.plan_reduce(f, g, a, b, EPS), dense.plan_reduce(f, g, a, b, EPS)):
        assert got.shape == want.shape
        assert_close(got, want)
    v = torch.randn_like(b)
    assert_close(geom.plan_matvec(f, g, a, b, EPS, v, 1), dense.plan_matvec(f, g, a, b, EPS, v, 1))
    # k vectors in one pass (as transport_cost_vjp applies P to the points): P y, P^T x
    Py, PTx = geom.plan_matvec(f, g, a, b, EPS, y, 1), geom.plan_matvec(f, g, a, b, EPS, x, 0)
    P = dense.plan(f, g, a, b, EPS)
    assert Py.shape == (3, 40, 3) and PTx.shape == (3, 30, 3)
    assert_close(Py, P @ y)
    assert_close(PTx, P.transpose(-1, -2) @ x)
    lo, hi = geom.cost_bounds()
    assert lo.shape == hi.shape == (3,)
    C = _reference_cost(x, y, "sqeuclidean", None).flatten(-2)
    assert_close(lo, C.amin(-1), 1e-14)
    assert_close(hi, C.amax(-1), 1e-14)
    # the bounds survive reshape/detach, and a non-finite coordinate gives NaN bounds
    carried = geom.reshape_batch((3, 1)).detach().__dict__.get("_bounds")
    assert carried is not None and carried[1][0].shape == (3, 1)
    x_bad = x.clone()
    x_bad[1, 0, 0] = float("inf")
    lo_bad, _ = KeOpsPointCloud(x_bad, y).cost_bounds()
    assert torch.isnan(lo_bad[1]) and torch.isfinite(lo_bad[[0, 2]]).all()


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_sinkhorn_matches_the_dense_path(kdevice, batch):
    x, y, a, b, _, _ = _data(kdevice, batch=batch)
    geom = KeOpsPointCloud(x, y)
    assert geom.is_online and geom.scaling_engine(a, b, a.log(), b.log()) is None
    res = entrokit.sinkhorn(a, b, geom, EPS, tol=1e-12)
    ref = entrokit.sinkhorn(a, b, PointCloud(x, y), EPS, tol=1e-12)
    assert bool(res.converged.all())
    assert_close(res.f, ref.f, 1e-8)
    assert_close(res.g, ref.g, 1e-8)
    assert_close(res.value, ref.value, 1e-10)
    assert_close(res.transport_cost, ref.transport_cost, 1e-10)
    assert_close(res.plan, ref.plan, 1e-10)


def test_sinkhorn_gradients_match_the_dense_path(kdevice):
    x, y, a, b, _, _ = _data(kdevice)
    grads = []
    for make in (KeOpsPointCloud, PointCloud):
        xs = x.clone().requires_grad_(True)
        ys = y.clone().requires_grad_(True)
        entrokit.sinkhorn(a, b, make(xs, ys), EPS, tol=1e-12).value.backward()
        grads.append((xs.grad, ys.grad))
    (gx, gy), (rx, ry) = grads
    assert torch.isfinite(gx).all() and float(gx.abs().max()) > 1e-3
    assert_close(gx, rx, 1e-9)
    assert_close(gy, ry, 1e-9)


def test_reduction_gradients_match_dense_in_points_potentials_and_weights(kdevice):
    x, y, a, b, f, g = _data(kdevice)
    a, b, f, g = _batched(a, b, f, g)
    w = torch.randn(1, x.shape[0], generator=torch.Generator().manual_seed(2), dtype=D).to(kdevice)

    def grads(make):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, f, g, a, b)]
        xs, ys, fs, gs, as_, bs = leaves
        geom = make(xs, ys)
        out = (geom.softmin(gs, b.log(), EPS, 1) * w).sum()
        rows, cols, tc = geom.plan_reduce(fs, gs, as_, bs, EPS)
        out = out + (rows * w).sum() + 0.5 * cols.square().sum() + tc.sum()
        return torch.autograd.grad(out, leaves)

    for got, want in zip(grads(KeOpsPointCloud), grads(PointCloud)):
        assert torch.isfinite(got).all()  # zero weights give finite gradients
        assert_close(got, want, 1e-9)


def test_euclidean_gradient_is_zero_where_points_coincide(kdevice):
    x, y, _, b, _, g = _data(kdevice)
    x = x.clone()
    x[0] = y[0]
    (b, g) = _batched(b, g)
    xs = x.clone().requires_grad_(True)
    KeOpsPointCloud(xs, y, "euclidean").softmin(g, b.log(), EPS, 1).sum().backward()
    xd = x.clone().requires_grad_(True)
    PointCloud(xd, y, "euclidean").softmin(g, b.log(), EPS, 1).sum().backward()
    assert torch.isfinite(xs.grad).all()
    assert_close(xs.grad, xd.grad, 1e-9)


def test_float32_softmin_matches_dense(kdevice):
    x, y, _, b, _, g = (t.float() for t in _data(kdevice, n=200, m=150))
    (b, g) = _batched(b, g)
    got = KeOpsPointCloud(x, y).softmin(g, b.log(), 0.01, 1)
    want = PointCloud(x, y).softmin(g, b.log(), 0.01, 1)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-5


def test_geometry_plumbing_keeps_the_class_and_options():
    x, y, *_ = _data("cpu")
    geom = KeOpsPointCloud(x, y, "pnorm", p=1.5)
    for other in (geom.detach(), geom.reshape_batch((1,)), geom.rebuild(x, y), *geom.self_geometries()):
        assert isinstance(other, KeOpsPointCloud)
        assert (other.cost, other.p) == ("pnorm", 1.5)
    assert geom.reshape_batch((1,)).batch_shape == (1,)
    assert geom.is_online
    assert "pnorm(p=1.5)" in repr(geom)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cost": lambda x, y: torch.cdist(x, y)}, r"Use PointCloud\(x, y, cost\)"),
        ({"cost": "cosine"}, r"'sqeuclidean', 'euclidean', 'pnorm'.*got 'cosine'"),
        ({"cost": "pnorm"}, r"cost='pnorm' needs the exponent p"),
        ({"cost": "pnorm", "p": 0.5}, r"needs a finite exponent p >= 1.*got p=0.5"),
        ({"cost": "pnorm", "p": float("nan")}, r"needs a finite exponent p >= 1"),
        ({"cost": "sqeuclidean", "p": 2.0}, r"only used with cost='pnorm'"),
    ],
    ids=["callable", "unknown", "p-missing", "p-below-1", "p-nan", "p-unused"],
)
def test_bad_options_raise_input_error(kwargs, match):
    x, y, *_ = _data("cpu")
    with pytest.raises(InputError, match=match):
        KeOpsPointCloud(x, y, **kwargs)


def test_bad_points_raise_like_pointcloud():
    x, y, *_ = _data("cpu")
    with pytest.raises(InputError, match="same point dimension"):
        KeOpsPointCloud(x, y[:, :2])


def test_entrokit_does_not_import_pykeops_and_a_missing_pykeops_names_the_extra():
    src = str(Path(__file__).resolve().parents[2] / "src")
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        import torch
        import entrokit, entrokit.geometry, entrokit.geometry.keops
        assert "pykeops" not in sys.modules, "importing entrokit imported pykeops"

        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pykeops", "keopscore"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, _Block())
        try:
            entrokit.geometry.keops.KeOpsPointCloud(torch.rand(3, 2), torch.rand(4, 2))
        except ImportError as exc:
            assert "pip install 'entrokit[keops]'" in str(exc), exc
        else:
            raise AssertionError("expected ImportError")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr



def test_compiler_detection_follows_keops_rule(tmp_path):
    """No compiler on PATH: None and a reason naming what KeOps looks for; $CXX on PATH
    wins; a compiler that fails to run is not a working one."""
    empty = tmp_path / "empty"
    empty.mkdir()
    found, why = find_cxx_compiler({"PATH": str(empty)})
    assert found is None and "no C++ compiler on PATH" in why and "g++" in why
    bindir = tmp_path / "bin"
    bindir.mkdir()
    good, bad = bindir / "mycxx", bindir / "g++"
    good.write_text("#!/bin/sh\necho mycxx 1.0\n")
    bad.write_text("#!/bin/sh\nexit 3\n")
    for f in (good, bad):
        f.chmod(0o755)
    found, why = find_cxx_compiler({"PATH": str(bindir), "CXX": "mycxx"})
    assert found == str(good) and why == ""
    if sys.platform != "darwin":
        found, why = find_cxx_compiler({"PATH": str(bindir)})
        assert found is None and "does not run" in why and "exits 3" in why
