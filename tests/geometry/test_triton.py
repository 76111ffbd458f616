"""The fused Triton kernels (entrokit.geometry._triton): the dispatch rule and its errors here,
the kernels themselves under the Triton interpreter in a subprocess
(``tests/geometry/interpreted_triton.py``: ``TRITON_INTERPRET=1`` must be set before triton is
imported, so it cannot share this process), and on CUDA where a device is present."""

from pathlib import Path

import pytest
import torch

import entrokit
from entrokit import InputError, PointCloud
from entrokit.geometry import _triton
from triton_helpers import run_interpreted, sm90_resources

HERE = Path(__file__).resolve().parent


def test_the_interpreted_kernel_tests_pass():
    pytest.importorskip("triton")
    run_interpreted(HERE / "interpreted_triton.py")


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.rand(5, 2)
    if _triton.available():
        with pytest.raises(InputError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
            PointCloud(x, x, kernel="triton")
    else:
        with pytest.raises(InputError, match="needs the optional package 'triton'"):
            PointCloud(x, x, kernel="triton")


@pytest.mark.parametrize("cost", ["euclidean", "pnorm"])
def test_triton_kernel_takes_only_the_squared_euclidean_cost(cost):
    x = torch.rand(5, 2)
    with pytest.raises(InputError, match="squared-Euclidean cost only"):
        PointCloud(x, x, cost, p=1.5 if cost == "pnorm" else None, kernel="triton")


def test_kernel_and_allow_tf32_are_validated():
    x = torch.rand(5, 2)
    with pytest.raises(InputError, match="kernel must be one of .*'triton'"):
        PointCloud(x, x, kernel="fused")
    with pytest.raises(InputError, match="allow_tf32 must be True or False"):
        PointCloud(x, x, allow_tf32="yes")


def test_auto_picks_the_kernel_only_for_squared_euclidean_on_cuda(monkeypatch):
    monkeypatch.setattr(_triton, "available", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _triton.use_triton("auto", cuda, "sqeuclidean")
    assert not _triton.use_triton("auto", cpu, "sqeuclidean")
    assert not _triton.use_triton("auto", cuda, "euclidean")
    assert not _triton.use_triton("compile", cuda, "sqeuclidean")
    assert _triton.use_triton("triton", cpu, "sqeuclidean")
    monkeypatch.setenv("ENTROKIT_TRITON", "0")
    assert not _triton.use_triton("auto", cuda, "sqeuclidean")


def test_auto_falls_back_to_the_tiles_when_a_launch_fails(monkeypatch):
    monkeypatch.setattr(_triton, "_failed", False)

    def broken():
        raise RuntimeError("no compiler")

    with pytest.warns(RuntimeWarning, match="fused Triton kernel failed.*ENTROKIT_TRITON=0"):
        assert _triton.run_or_fallback("auto", broken, lambda: "tiles") == "tiles"
    assert _triton._failed
    with pytest.raises(RuntimeError, match="no compiler"):
        _triton.run_or_fallback("triton", broken, lambda: "tiles")
    monkeypatch.setattr(_triton, "_failed", False)

    def bad_input():
        raise InputError("a potential of shape (3,) does not match")

    with pytest.raises(InputError, match="does not match"):
        _triton.run_or_fallback("auto", bad_input, lambda: "tiles")
    assert not _triton._failed


def test_the_fused_functions_reject_other_costs_and_mismatched_potentials(monkeypatch):
    monkeypatch.setattr(_triton, "check_usable", lambda device: None)
    x = torch.rand(2, 5, 3)
    with pytest.raises(InputError, match="cost 'sqeuclidean' or 'inner'"):
        _triton.lse_pairs(x, x, torch.zeros(2, 5), 0.1, cost="euclidean")
    with pytest.raises(InputError, match=r"potential of shape \(3, 5\) does not match"):
        _triton.lse_pairs(x, x, torch.zeros(3, 5), 0.1)


# every block configuration _blocks can choose, by (dtype, d, rows) on a 132-SM H100
SM90_CASES = [(torch.float32, 3, 1 << 14), (torch.float32, 3, 1 << 17), (torch.float32, 32, 1 << 17),
              (torch.float32, 32, 1 << 14), (torch.float32, 64, 1 << 14), (torch.float64, 3, 1 << 14),
              (torch.float64, 20, 1 << 14)]


@pytest.mark.parametrize("dtype,d,rows", SM90_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_compile_for_sm90_without_spilling(monkeypatch, dtype, d, rows):
    """The kernels compile for an H100 in the configurations the wrappers pick, with the widest
    vector block, and keep everything in registers (the interpreter checks values, not this)."""
    pytest.importorskip("triton")
    from entrokit.geometry import _triton_kernels as K

    monkeypatch.setattr(_triton, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    t = "*fp64" if dtype == torch.float64 else "*fp32"
    precs = ["ieee"] + (["tf32"] if dtype == torch.float32 else [])
    for prec in precs:
        bm, bn, bd, one_d, small, warps = _triton._blocks(cuda, dtype, d, rows, prec)
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_D=one_d, PREC=prec, SMALL_D=small)
        lse = sm90_resources(K.lse_kernel, dict.fromkeys(["x_ptr", "y_ptr", "a_ptr", "b_ptr", "mx_ptr", "s_ptr"], t),
                             dict(blocks, HAS_A=True), warps)
        plan = sm90_resources(K.plan_kernel, dict.fromkeys(["x_ptr", "y_ptr", "a_ptr", "b_ptr", "v_ptr", "out_ptr"], t),
                              dict(blocks, BLOCK_K=_triton._block_k(cuda, 64, one_d), HAS_V=True), warps)
        assert lse["STACK"] == 0 and plan["STACK"] == 0, (prec, lse, plan)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_clouds(n, m, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, n, 3, generator=g, dtype=torch.float64)
    y = 0.8 * torch.rand(2, m, 3, generator=g, dtype=torch.float64) + 0.1
    return x.to("cuda", dtype), y.to("cuda", dtype)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_kernel_matches_the_tiles(dtype):
    pytest.importorskip("triton")
    x, y = _cuda_clouds(1000, 777, dtype)
    fused = PointCloud(x, y, online=True, kernel="triton")
    tiles = PointCloud(x, y, online=True, kernel="eager")
    assert PointCloud(x, y, online=True)._backend.fused  # "auto" picks it on CUDA
    h = torch.randn(2, 777, device="cuda", dtype=dtype)
    log_w = torch.full_like(h, -6.0)
    log_w[:, 5] = -float("inf")
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(fused.softmin(h, log_w, 0.01, 1), tiles.softmin(h, log_w, 0.01, 1), rtol=0, atol=tol)
    a = torch.full((2, 1000), 1e-3, device="cuda", dtype=dtype)
    b = torch.full((2, 777), 1 / 777, device="cuda", dtype=dtype)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    v = torch.randn(2, 777, 20, device="cuda", dtype=dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fused.plan_matvec(f, g, a, b, 0.05, v, 1), tiles.plan_matvec(f, g, a, b, 0.05, v, 1),
                               rtol=rtol, atol=rtol * 1e-3)
    for u, w in zip(fused.marginals(f, g, a, b, 0.05), tiles.marginals(f, g, a, b, 0.05)):
        torch.testing.assert_close(u, w, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.cuda
@CUDA
def test_cuda_sinkhorn_with_the_kernel_converges_and_matches_the_tiles():
    pytest.importorskip("triton")
    x, y = _cuda_clouds(2048, 2048, torch.float32)
    a = torch.full((2, 2048), 1 / 2048, device="cuda")
    res = {k: entrokit.sinkhorn(a, a, PointCloud(x, y, online=True, kernel=k), 0.02, tol=1e-4)
           for k in ("triton", "eager")}
    assert bool(res["triton"].converged.all())
    torch.testing.assert_close(res["triton"].transport_cost, res["eager"].transport_cost, rtol=1e-4, atol=0)
