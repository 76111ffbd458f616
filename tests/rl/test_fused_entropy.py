"""The fused Triton paths of entrokit.rl.token_entropy / token_logprob_entropy: the kernels under
the Triton interpreter in a subprocess (``tests/rl/interpreted_fused_entropy.py``), the dispatch
rule here, and the public functions on CUDA where a device is present."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrokit.rl import _triton as fused
from entrokit.rl import token_entropy, token_logprob_entropy
from triton_helpers import run_interpreted, sm90_resources

HERE = Path(__file__).resolve().parent


def test_the_interpreted_kernel_tests_pass():
    pytest.importorskip("triton")
    run_interpreted(HERE / "interpreted_fused_entropy.py")


def test_fused_path_is_dispatched_only_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: True)
    assert not fused.use_fused(torch.zeros(2, 3))
    if torch.cuda.is_available():
        assert fused.use_fused(torch.zeros(2, 3, device="cuda"))
        monkeypatch.setenv("ENTROKIT_TRITON", "0")
        assert not fused.use_fused(torch.zeros(2, 3, device="cuda"))


def test_cpu_calls_never_reach_the_kernels(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused path ran on a CPU tensor")

    monkeypatch.setattr(fused, "token_entropy_rows", refuse)
    monkeypatch.setattr(fused, "logprob_entropy_rows", refuse)
    z = torch.randn(3, 5)
    assert token_entropy(z).shape == (3,)
    lp, ent = token_logprob_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))
    assert lp.shape == ent.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "f32", "f64"])
def test_kernels_compile_for_sm90_without_spilling(dtype):
    """The kernels compile for an H100 with the blocks the wrappers pick and keep everything in
    registers (the interpreter checks values, not this)."""
    pytest.importorskip("triton")
    from entrokit.rl import _triton_kernels as K

    io = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}[dtype]
    w = "*fp64" if dtype == torch.float64 else "*fp32"
    bt, bv, bd, warps = fused._FWD_BLOCKS[dtype]
    res = {
        "fwd": sm90_resources(
            K.logprob_entropy_fwd_kernel,
            {"h_ptr": io, "w_ptr": io, "b_ptr": io, "lab_ptr": "*i64", "inv_ptr": w,
             **dict.fromkeys(["m_ptr", "s_ptr", "t_ptr", "zl_ptr"], w)},
            dict(HAS_BIAS=True, BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd, PREC=fused._tf32_prec(dtype), UPCAST=False), warps),
        "dz": sm90_resources(
            K.logprob_entropy_dz_kernel,
            {"z_ptr": w, "lab_ptr": "*i64", **dict.fromkeys(["lse_ptr", "ent_ptr", "gl_ptr", "ge_ptr", "inv_ptr"], w)},
            dict(BLOCK_T=fused.DZ_BLOCKS[0], BLOCK_V=fused.DZ_BLOCKS[1]), fused.DZ_WARPS),
        "entropy": sm90_resources(
            K.entropy_bwd_kernel,
            {"z_ptr": io, "dz_ptr": io, **dict.fromkeys(["lse_ptr", "h_ptr", "g_ptr", "inv_ptr"], w)},
            dict(BLOCK_V=4096), 8),
    }
    assert all(r["STACK"] == 0 for r in res.values()), res


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@CUDA
def test_cuda_token_entropy_matches_the_chunked_path():
    pytest.importorskip("triton")
    z = 4 * torch.randn(64, 5000, device="cuda")
    z[3, :10] = -float("inf")
    mask = torch.ones(64, dtype=torch.bool, device="cuda")
    mask[5] = False
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    h1 = token_entropy(z1, temperature=0.9, mask=mask)  # fused
    h2 = token_entropy(z2, temperature=0.9, mask=mask, support="full", chunk_size=16)
    h1.sum().backward()
    with torch.no_grad():
        ref = token_entropy(z2.detach().cpu(), temperature=0.9, mask=mask.cpu())
    torch.testing.assert_close(h1.cpu(), ref, rtol=0, atol=1e-5)
    h2.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-6)
    assert h1[5] == 0 and bool((z1.grad[5] == 0).all())


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logprob_entropy_matches_the_cpu_path(dtype):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(300, 64, generator=g).to(dtype)
    W = (0.3 * torch.randn(1000, 64, generator=g)).to(dtype)
    lab = torch.randint(0, 1000, (300,), generator=g)
    h_gpu = hid.cuda().requires_grad_()
    lp, ent = token_logprob_entropy(h_gpu, W.cuda(), lab.cuda())
    (lp.sum() + ent.sum()).backward()
    h_cpu = hid.float().requires_grad_()
    lp_c, ent_c = token_logprob_entropy(h_cpu, W.float(), lab)
    (lp_c.sum() + ent_c.sum()).backward()
    torch.testing.assert_close(lp.cpu(), lp_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.cpu(), ent_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_gpu.grad.float().cpu(), h_cpu.grad, rtol=2e-2, atol=2e-2)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 40), splits=st.integers(1, 6), scale=st.floats(0.1, 30.0),
       seed=st.integers(0, 2**16))
def test_merging_vocabulary_splits_is_exact(rows, vocab, splits, scale, seed):
    """The per-split online states (m, s, t, x_label) merge into the full lse, entropy and log-prob."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    lab = torch.randint(0, vocab, (rows,), generator=g)
    bounds = torch.linspace(0, vocab, min(splits, vocab) + 1).round().long().tolist()
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        xs = x[:, lo:hi]
        m = xs.amax(1)
        e = torch.exp(xs - m[:, None])
        inside = (lab >= lo) & (lab < hi)
        zl = torch.where(inside, x.gather(1, lab[:, None]).squeeze(1), torch.zeros(rows, dtype=torch.float64))
        parts.append((m, e.sum(1), (e * (xs - m[:, None])).sum(1), zl))
    lse, ent, logp = fused._merge_splits(*(torch.stack(p) for p in zip(*parts)))
    logq = torch.log_softmax(x, 1)
    torch.testing.assert_close(lse, torch.logsumexp(x, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, -(logq.exp() * logq).sum(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logp, logq.gather(1, lab[:, None]).squeeze(1), rtol=1e-12, atol=1e-12)
