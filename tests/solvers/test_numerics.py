"""The shared numerical parts (solvers/_numerics.py) against dense references."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from entrokit.solvers._numerics import (
    DenseBlock,
    SparseBlock,
    armijo_backtracking,
    continuation_schedule,
    pcg,
    solve_bipartite,
)

D = torch.float64


def _spd(B, d, seed, dtype=D, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, d, d, generator=g, dtype=D))
    ev = torch.logspace(0, math.log10(cond), d, dtype=D).expand(B, d)
    A = Q @ torch.diag_embed(ev) @ Q.mT
    return A.to(dtype), torch.randn(B, d, generator=g, dtype=D).to(dtype)


# ------------------------------------------------------------------------------ PCG
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pcg_matches_dense_solve_batched(dtype):
    A, rhs = _spd(3, 12, 0, dtype)
    inv_diag = 1.0 / torch.diagonal(A, dim1=-2, dim2=-1)
    rtol = 1e-10 if dtype == D else 1e-5
    out = pcg(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), rhs, inv_diag, rtol=rtol, max_iter=200)
    ref = torch.linalg.solve(A.double(), rhs.double())
    assert out.x.dtype == dtype and out.converged.all()
    assert torch.allclose(out.x.double(), ref, rtol=0, atol=1e-8 if dtype == D else 1e-3)
    assert (out.n_iter > 0).all() and (out.n_iter <= 60).all()
    assert (out.residual <= rtol).all()


def test_pcg_iteration_count_is_exact_for_few_eigenvalues():
    # CG terminates in (number of distinct eigenvalues) steps: a diagonal with 3 values
    d = torch.tensor([[1.0, 2.0, 5.0, 1.0, 2.0, 5.0, 5.0, 1.0]], dtype=D)
    rhs = torch.arange(1.0, 9.0, dtype=D).unsqueeze(0)
    out = pcg(lambda v: d * v, rhs, torch.ones_like(d), rtol=1e-12, max_iter=50)
    assert int(out.n_iter[0]) == 3
    assert torch.allclose(out.x, rhs / d, atol=1e-12)
    # the Jacobi preconditioner makes it exact in one step
    out = pcg(lambda v: d * v, rhs, 1.0 / d, rtol=1e-12, max_iter=50)
    assert int(out.n_iter[0]) == 1


def test_pcg_mask_warm_start_and_per_problem_counts():
    A, rhs = _spd(3, 10, 1, cond=1e3)
    mv = lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    inv_diag = 1.0 / torch.diagonal(A, dim1=-2, dim2=-1)
    active = torch.tensor([True, False, True])
    out = pcg(mv, rhs, inv_diag, rtol=1e-10, max_iter=200, active=active)
    assert int(out.n_iter[1]) == 0 and torch.equal(out.x[1], torch.zeros(10, dtype=D))
    ref = torch.linalg.solve(A, rhs)
    assert torch.allclose(out.x[[0, 2]], ref[[0, 2]], atol=1e-8)
    # an easy problem stops early while a hard one goes on
    easy = torch.eye(10, dtype=D).expand(1, 10, 10)
    A2 = torch.cat([easy, A[:1]])
    out = pcg(lambda v: (A2 @ v.unsqueeze(-1)).squeeze(-1), rhs[:2], torch.ones(2, 10, dtype=D), rtol=1e-10,
              max_iter=200)
    assert int(out.n_iter[0]) == 1 and int(out.n_iter[1]) > 1
    # a warm start at the solution needs no iteration; a zero right-hand side neither
    out = pcg(mv, rhs, inv_diag, rtol=1e-8, max_iter=200, x0=ref)
    assert (out.n_iter == 0).all() and out.converged.all()
    out = pcg(mv, torch.zeros_like(rhs), inv_diag, rtol=1e-8, max_iter=200)
    assert (out.n_iter == 0).all() and out.converged.all() and (out.x == 0).all()
    # single problem (fast path): same answer and a positive count
    one = pcg(lambda v: (A[:1] @ v.unsqueeze(-1)).squeeze(-1), rhs[:1], inv_diag[:1], rtol=1e-10, max_iter=200)
    assert torch.allclose(one.x[0], ref[0], atol=1e-8) and int(one.n_iter[0]) > 0


def test_pcg_reports_failure():
    A, rhs = _spd(1, 30, 2, cond=1e8)
    mv = lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    out = pcg(mv, rhs, torch.ones_like(rhs), rtol=1e-14, max_iter=3)
    assert not bool(out.converged[0]) and int(out.n_iter[0]) == 3
    nan = pcg(lambda v: v * float("nan"), rhs, torch.ones_like(rhs), rtol=1e-8, max_iter=10)
    assert not bool(nan.converged[0])


@pytest.mark.parametrize("B", [1, 2])  # the single-problem loop and the batched one
def test_pcg_stops_at_a_zero_curvature_with_a_finite_iterate(B):
    # A = diag(1, 0): b with a component in the null space; the second step meets p^T A p = 0
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=D)).expand(B, 2, 2)
    rhs = torch.tensor([[1.0, 1e-3]], dtype=D).expand(B, 2).clone()
    out = pcg(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), rhs, torch.ones_like(rhs), rtol=1e-12, max_iter=10)
    assert bool(torch.isfinite(out.x).all()) and not bool(out.converged.any())


# ---------------------------------------------------------------------- line search
def test_armijo_per_problem_steps_and_mask():
    # F_k(x) = 0.5 c_k x^2 from x = 1 along d = -F'(x) = -c_k: Armijo accepts t <= 2(1 - c1)/c_k
    curv = torch.tensor([1.0, 4.0, 16.0, 1.0], dtype=D)
    x = torch.ones(4, 1, dtype=D)
    d = -curv.unsqueeze(-1) * x

    def F(z):
        return 0.5 * curv * (z**2).sum(-1)

    def trial(t):
        z = x + t.unsqueeze(-1) * d
        return F(z), (z,)

    active = torch.tensor([True, True, True, False])
    slope = (curv.unsqueeze(-1) * x * d).sum(-1)
    out = armijo_backtracking(trial, F(x), slope, (x,), active, step=1.0, c1=0.1)
    assert out.accepted.tolist() == [True, True, True, False]
    assert out.step[:3].tolist() == [1.0, 0.25, 0.0625]  # first halving that meets Armijo
    assert torch.equal(out.state[0][3], x[3])  # inactive: untouched
    assert torch.allclose(out.state[0][:3, 0], 1.0 - out.step[:3] * curv[:3])
    assert torch.allclose(out.value[:3], F(out.state[0])[:3])


def test_armijo_rejects_non_finite_and_reports_failure():
    x = torch.zeros(2, 1, dtype=D)

    def trial(t):
        F_t = torch.where(t > 1e-3, torch.full_like(t, float("nan")), -t)
        return F_t, (x + t.unsqueeze(-1),)

    out = armijo_backtracking(trial, torch.zeros(2, dtype=D), -torch.ones(2, dtype=D), (x,),
                              torch.tensor([True, True]), max_backtracks=5)
    assert not out.accepted.any() and torch.equal(out.state[0], x)
    out = armijo_backtracking(trial, torch.zeros(2, dtype=D), -torch.ones(2, dtype=D), (x,),
                              torch.tensor([True, True]), max_backtracks=12)
    assert out.accepted.all() and (out.step <= 1e-3).all()
    # an extra acceptance rule
    out = armijo_backtracking(lambda t: (torch.ones_like(t), (x,)), torch.zeros(2, dtype=D),
                              -torch.ones(2, dtype=D), (x,), torch.tensor([True, True]),
                              also_accept=lambda F_t, s: torch.tensor([True, False]))
    assert out.accepted.tolist() == [True, False]


# ----------------------------------------------------------------- bipartite system
def _bipartite(B, n, m, seed, density=0.5, dtype=D):
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(B, n, m, generator=g, dtype=D) * (torch.rand(B, n, m, generator=g, dtype=D) < density)
    r, c = W.sum(-1), W.sum(-2)  # Laplacian-like: diagonally dominant, PSD
    p, q = torch.randn(B, n, generator=g, dtype=D), torch.randn(B, m, generator=g, dtype=D)
    return W.to(dtype), r.to(dtype), c.to(dtype), p.to(dtype), q.to(dtype)


def _dense_reference(W, r, c, shift, p, q):
    B, n, m = W.shape
    out = []
    for k in range(B):
        s = float(shift[k]) if torch.is_tensor(shift) else shift
        M = torch.zeros(n + m, n + m, dtype=D)
        M[:n, :n] = torch.diag(r[k].double() + s)
        M[n:, n:] = torch.diag(c[k].double() + s)
        M[:n, n:] = W[k].double()
        M[n:, :n] = W[k].double().T
        out.append(torch.linalg.solve(M, torch.cat([p[k], q[k]]).double()))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["dense", "direct", "cg", "auto"])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_bipartite_solver_matches_dense_solve(method, layout):
    W, r, c, p, q = _bipartite(3, 9, 7, 3)
    shift = torch.tensor([1e-3, 1e-1, 1.0], dtype=D)
    if layout == "dense":
        block = DenseBlock(W)
    else:
        batch, rows, cols = (W != 0).nonzero(as_tuple=True)
        block = SparseBlock(batch, rows, cols, W[batch, rows, cols], W.shape)
    x, y, n_iter, ok = solve_bipartite(block, r, c, shift, p, q, method=method, rtol=1e-13, max_iter=500)
    ref = _dense_reference(W, r, c, shift, p, q)
    assert ok.all()
    assert torch.allclose(torch.cat([x, y], -1), ref, atol=1e-9, rtol=1e-9)
    if method == "cg":
        assert (n_iter > 0).all() and (n_iter <= 7 + 2).all()  # Schur system has size m = 7
    else:
        assert (n_iter == 1).all()


def test_bipartite_solver_float32_scalar_shift_and_mask():
    W, r, c, p, q = _bipartite(2, 6, 5, 4, dtype=torch.float32)
    active = torch.tensor([False, True])
    for method in ("dense", "cg"):
        x, y, _, ok = solve_bipartite(DenseBlock(W), r, c, 0.5, p, q, method=method, rtol=1e-6, active=active)
        assert x.dtype == torch.float32 and ok.all()
        ref = _dense_reference(W, r, c, 0.5, p, q)
        assert torch.allclose(torch.cat([x, y], -1)[1].double(), ref[1], atol=1e-4)
        assert (y[0] == 0).all()  # masked problem: zero column block


# ------------------------------------------------------------------------- schedule
def test_continuation_schedule_even():
    s = continuation_schedule(1e-3, 1.0, 0.25, even=True)
    assert s[0] == 1.0 and s[-1] == 1e-3
    ratios = [x / y for x, y in zip(s, s[1:])]
    assert all(1.0 < q <= 4.0 + 1e-12 for q in ratios)
    assert max(ratios) - min(ratios) < 1e-9  # geometric
    assert len(s) == math.ceil(math.log(1e3, 4)) + 1
    assert continuation_schedule(1.0, 3.0, 0.25, even=True) == [1.0]  # within a factor 1/decay
    assert continuation_schedule(1.0, 16.0, 0.25, even=True) == [16.0, 4.0, 1.0]


def test_continuation_schedule_sinkhorn_rule():
    # no stage within a factor 1/decay of the target: the last jump is in (1/decay, 1/decay^2]
    s = continuation_schedule(0.3, 1.0, 0.5)
    assert s == [1.0, 0.3]
    for target in (1e-3, 0.07, 0.2499, 0.25):
        s = continuation_schedule(target, 1.0, 0.5)
        assert s[-1] == target and all(x * 0.5 > target for x in s[:-1])
        assert all(x / y == 2.0 for x, y in zip(s[:-2], s[1:-1]))
        assert 2.0 < s[-2] / target <= 4.0 if len(s) > 1 else True
    assert continuation_schedule(1.0, 0.5, 0.5) == [1.0]
    assert continuation_schedule(1.0, 2.0, 0.5) == [1.0]
    with pytest.raises(ValueError, match="decay"):
        continuation_schedule(1.0, 10.0, 1.5)


# ------------------------------------------------------- single-problem fast paths
def test_armijo_single_problem_path_takes_the_batched_steps():
    # the B = 1 path (Python floats) accepts the same step as the batched loop
    curv = torch.tensor([1.0, 4.0, 16.0], dtype=D)
    x = torch.ones(3, 1, dtype=D)
    d = -curv.unsqueeze(-1) * x
    batched = armijo_backtracking(
        lambda t: (0.5 * curv * ((x + t.unsqueeze(-1) * d) ** 2).sum(-1), (x + t.unsqueeze(-1) * d,)),
        0.5 * curv, -curv, (x,), torch.ones(3, dtype=torch.bool), c1=0.1,
    )
    for k in range(3):
        ck, xk, dk = curv[k:k + 1], x[k:k + 1], d[k:k + 1]
        one = armijo_backtracking(
            lambda t, ck=ck, xk=xk, dk=dk: (0.5 * ck * ((xk + t.unsqueeze(-1) * dk) ** 2).sum(-1),
                                            (xk + t.unsqueeze(-1) * dk,)),
            0.5 * ck, -ck, (xk,), torch.ones(1, dtype=torch.bool), c1=0.1,
        )
        assert bool(one.accepted[0]) and float(one.step[0]) == float(batched.step[k])
        assert torch.equal(one.state[0], batched.state[0][k:k + 1])
    # no acceptable step: the current state comes back, not accepted
    x1 = torch.zeros(1, 1, dtype=D)
    out = armijo_backtracking(lambda t: (torch.full_like(t, float("nan")), (x1 + 1,)), torch.zeros(1, dtype=D),
                              -torch.ones(1, dtype=D), (x1,), torch.ones(1, dtype=torch.bool), max_backtracks=3)
    assert not bool(out.accepted[0]) and torch.equal(out.state[0], x1) and float(out.step[0]) == 2.0**-4
    # the extra acceptance rule is honoured on the single path too
    out = armijo_backtracking(lambda t: (torch.ones_like(t), (x1 + 1,)), torch.zeros(1, dtype=D),
                              -torch.ones(1, dtype=D), (x1,), torch.ones(1, dtype=torch.bool),
                              also_accept=lambda F_t, s: torch.tensor([True]))
    assert bool(out.accepted[0]) and float(out.step[0]) == 1.0


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("shift", [0.3, "tensor"])
def test_bipartite_cg_single_problem_matches_dense_solve(layout, shift):
    W, r, c, p, q = _bipartite(1, 11, 8, 5)
    s = torch.tensor([0.3], dtype=D) if shift == "tensor" else shift
    if layout == "dense":
        block = DenseBlock(W)
    else:
        batch, rows, cols = (W != 0).nonzero(as_tuple=True)
        block = SparseBlock(batch, rows, cols, W[batch, rows, cols], W.shape)
    x, y, n_iter, ok = solve_bipartite(block, r, c, s, p, q, method="cg", rtol=1e-13, max_iter=500)
    ref = _dense_reference(W, r, c, 0.3, p, q)
    assert bool(ok[0]) and 0 < int(n_iter[0]) <= 8 + 2
    assert torch.allclose(torch.cat([x, y], -1), ref, atol=1e-10, rtol=1e-10)
    # a stalled solve (iteration cap) is reported, not returned as a solution
    _, _, n_iter, ok = solve_bipartite(block, r, c, 1e-12, p, q, method="cg", rtol=1e-14, max_iter=1)
    assert not bool(ok[0]) and int(n_iter[0]) == 1


def _mapping_flags(addr: int) -> list[str] | None:
    """VmFlags of the mapping holding ``addr`` (None off Linux); ``hg`` marks MADV_HUGEPAGE."""
    try:
        with open("/proc/self/smaps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def _kernel_records_huge_page_advice() -> bool:
    """Whether ``madvise(MADV_HUGEPAGE)`` on a fresh anonymous mapping succeeds and shows as
    ``hg`` in its VmFlags here (a Linux kernel with transparent huge pages; not a sandbox
    that ignores the advice)."""
    import ctypes
    import mmap

    if not sys.platform.startswith("linux"):
        return False
    m = mmap.mmap(-1, 8 << 20)
    view = ctypes.c_char.from_buffer(m)
    try:
        start = -(-ctypes.addressof(view) // (1 << 21)) * (1 << 21)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(2 << 20), 14) != 0:
            return False
        flags = _mapping_flags(start)
        return flags is not None and "hg" in flags
    finally:
        del view
        m.close()


def test_large_buffer_is_an_ordinary_tensor_advised_to_use_huge_pages(monkeypatch):
    from entrokit.solvers._numerics import large_buffer

    small = large_buffer(torch.zeros(3, 4, dtype=torch.float32))
    assert small.shape == (3, 4) and small.dtype == torch.float32 and small.is_contiguous()
    # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so the buffer is a fresh
    # mapping even late in a long process (a smaller one may reuse already-touched heap pages)
    like = torch.empty(1, 8192, 1024, dtype=torch.float64)
    big = large_buffer(like)
    assert big.shape == like.shape and big.dtype == like.dtype and big.is_contiguous()
    big.fill_(0.5)
    assert float(big.sum()) == 0.5 * big.numel()
    # madvise splits the mapping: the advised part starts at the first 2 MiB boundary. Whether
    # the kernel then finds free 2 MiB frames depends on the machine's fragmentation, so the
    # test checks what the library controls: the advice is recorded on the mapping (where the
    # kernel records advice at all)
    if _kernel_records_huge_page_advice():
        assert "hg" in _mapping_flags(-(-big.data_ptr() // (1 << 21)) * (1 << 21))

    # a buffer under 4 MiB is left to the allocator: no advice. Checked on the calls, not on
    # the mapping: malloc may place a small buffer in heap pages that an earlier, larger
    # buffer had advised, which is the allocator's history, not this call's advice
    from entrokit.solvers import _numerics

    if _numerics._madvise:
        calls = []

        def spy(start, length, advice, _real=_numerics._madvise):
            calls.append((start, length, advice))
            return _real(start, length, advice)

        monkeypatch.setattr(_numerics, "_madvise", spy)
        large_buffer(torch.empty(1000, dtype=torch.float64))
        large_buffer(torch.empty((2 << 20) // 8 * 2 - 1, dtype=torch.float64))  # 8 bytes under 4 MiB
        assert calls == []
        again = large_buffer(like)
        lo = -(-again.data_ptr() // (1 << 21)) * (1 << 21)
        hi = (again.data_ptr() + again.numel() * 8) // (1 << 21) * (1 << 21)
        assert calls == [(lo, hi - lo, 14)]


def test_released_buffer_is_reused_once_and_only_when_it_fits():
    from entrokit.solvers import _numerics
    from entrokit.solvers._numerics import large_buffer, release_buffer

    _numerics._pool.clear()
    first = large_buffer(torch.empty(1, 300, 200, dtype=torch.float64))
    release_buffer(first)
    again = large_buffer(torch.empty(1, 100, 200, dtype=torch.float64))  # smaller: a view of it
    assert again.shape == (1, 100, 200) and again.data_ptr() == first.data_ptr()
    assert large_buffer(torch.empty(1, 100, 200, dtype=torch.float64)).data_ptr() != first.data_ptr()  # one slot
    release_buffer(again)
    other = large_buffer(torch.empty(1, 100, 200, dtype=torch.float32))  # another dtype: fresh memory
    assert other.data_ptr() != again.data_ptr() and other.dtype == torch.float32
    release_buffer(torch.empty(5 << 20, dtype=torch.float64))  # 40 MiB: not kept
    assert not _numerics._pool
