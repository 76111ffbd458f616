"""token_entropy and token_logprob_entropy: closed forms, independent references, gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autograd_memory import saved_bytes
from entrokit import InputError
from entrokit.rl import Clamp, TopK, TopP, token_entropy, token_logprob_entropy

NEG = float("-inf")


def categorical_entropy(z: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=z.double()).entropy()


def support_reference(z: torch.Tensor, support) -> torch.Tensor:
    """Slow, obviously correct restricted entropy: one row at a time, a full sort in Python."""
    out = []
    for row in z.double().reshape(-1, z.shape[-1]):
        order = sorted(range(len(row)), key=lambda j: -row[j].item())
        v = len(row)
        if isinstance(support, TopK):
            n = support.k
        elif isinstance(support, Clamp):
            n = max(1, v - math.floor(support.fraction * v))
        else:
            p = torch.softmax(row, 0)
            mass, n = 0.0, 0
            for j in order:
                if mass >= support.p:
                    break
                mass += p[j].item()
                n += 1
        keep = torch.zeros(v, dtype=torch.bool)
        keep[order[:n]] = True
        out.append(categorical_entropy(row.masked_fill(~keep, NEG)))
    return torch.stack(out).reshape(z.shape[:-1])


SUPPORTS = [None, TopK(3), TopP(0.7), Clamp(0.4)]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("chunk", ["auto", 1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_matches_categorical_float64(chunk, temperature, device):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 4).to(device)
    h = token_entropy(z, temperature=temperature, chunk_size=chunk)
    assert h.dtype == torch.float64 and h.shape == (3, 5)
    torch.testing.assert_close(h, categorical_entropy(z / temperature), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6), vocab=st.integers(1, 40), scale=st.floats(0.01, 30.0),
    temperature=st.floats(0.2, 4.0), seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_parity(rows, vocab, scale, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    h = token_entropy(z, temperature=temperature, chunk_size=2)
    ref = categorical_entropy(z / temperature)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-10)
    assert bool((h >= -1e-12).all()) and bool((h <= math.log(vocab) + 1e-10).all())


def test_closed_forms():
    z = torch.zeros(2, 8, dtype=torch.float64)
    torch.testing.assert_close(token_entropy(z), torch.full((2,), math.log(8), dtype=torch.float64))
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(token_entropy(z), torch.tensor([h], dtype=torch.float64))


@pytest.mark.parametrize("support", SUPPORTS[1:], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_supports_match_row_by_row_reference(support, temperature, device):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 6, 23, generator=g, dtype=torch.float64) * 2
    h = token_entropy(z.to(device), support=support, temperature=temperature, chunk_size=5)
    torch.testing.assert_close(h.cpu(), support_reference(z / temperature, support), rtol=0, atol=1e-12)


def test_support_limits():
    z = torch.randn(5, 17, dtype=torch.float64)
    full = token_entropy(z)
    torch.testing.assert_close(token_entropy(z, support=TopK(17)), full)
    torch.testing.assert_close(token_entropy(z, support=TopP(1.0)), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(token_entropy(z, support=Clamp(0.0)), full)
    torch.testing.assert_close(token_entropy(z, support="full"), full)
    assert torch.equal(token_entropy(z, support=TopK(1)), torch.zeros(5, dtype=torch.float64))
    # TopK(2): a two-point distribution, closed form from the two largest logits
    top2 = z.topk(2, -1).values
    p = torch.softmax(top2, -1)
    torch.testing.assert_close(token_entropy(z, support=TopK(2)), -(p * p.log()).sum(-1))


def test_mask_zeroes_rows_and_gradients():
    z = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    h = token_entropy(z, mask=mask)
    n_masked = int((~mask).sum())
    assert torch.equal(h[~mask], torch.zeros(n_masked, dtype=torch.float64))
    torch.testing.assert_close(h[mask], categorical_entropy(z.detach())[mask])
    h.sum().backward()
    assert torch.equal(z.grad[~mask], torch.zeros(n_masked, 9, dtype=torch.float64))
    assert bool((z.grad[mask].abs().sum(-1) > 0).all())
    # integer 0/1 masks are read as booleans
    torch.testing.assert_close(token_entropy(z.detach(), mask=mask.long()), h.detach())


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("support", SUPPORTS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(support, temperature, with_mask):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.rand(3, 4, generator=g) > 0.3 if with_mask else None

    def f(t):
        return token_entropy(t, temperature=temperature, support=support, mask=mask, chunk_size=5)

    assert torch.autograd.gradcheck(f, (z,))


def test_gradient_matches_autograd_of_formula():
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(6, 30, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64)
    (token_entropy(z, temperature=0.8, chunk_size=4) * w).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (categorical_entropy(z2 / 0.8) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=0, atol=1e-12)


def test_gradcheck_with_neg_inf_entries():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    z[:, ::3] = NEG
    zz = z.clone().requires_grad_()
    # gradcheck perturbs every entry; -inf stays -inf, and its analytic gradient is exactly 0
    h = token_entropy(zz, temperature=0.9)
    h.sum().backward()
    assert torch.equal(zz.grad[:, ::3], torch.zeros_like(zz.grad[:, ::3]))
    finite = z[:, 1::3].clone().requires_grad_()

    def f(t):
        full = z.clone()
        full[:, 1::3] = t
        return token_entropy(full, temperature=0.9)

    assert torch.autograd.gradcheck(f, (finite,))


# ----------------------------------------------------------------------------- -inf, fp16, bf16
def test_neg_inf_suite():
    z = torch.tensor(
        [[0.0, 0.0, NEG], [NEG, NEG, NEG], [NEG, 5.0, NEG], [1.0, NEG, 1.0]], requires_grad=True
    )
    h = token_entropy(z)
    torch.testing.assert_close(h.detach(), torch.tensor([math.log(2), 0.0, 0.0, math.log(2)]))
    h.sum().backward()
    assert not torch.isnan(z.grad).any()
    # a row with no finite logit is defined as H = 0 with zero gradient
    assert torch.equal(z.grad[1], torch.zeros(3))
    for support in SUPPORTS[1:]:
        hs = token_entropy(z.detach(), support=support)
        assert not torch.isnan(hs).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_extremes_no_nan(dtype):
    big = torch.finfo(dtype).max
    z = torch.tensor([[big, -big], [big, big], [-big, -big], [0.0, NEG]], dtype=dtype, requires_grad=True)
    h = token_entropy(z)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.detach(), torch.tensor([0.0, math.log(2), math.log(2), 0.0]))
    h.sum().backward()
    assert z.grad.dtype == dtype and not torch.isnan(z.grad).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_accuracy_against_float64(dtype):
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(64, 4096, generator=g) * 3).to(dtype)
    h = token_entropy(z)
    ref = categorical_entropy(z.double())
    assert (h.double() - ref).abs().max().item() < 1e-4  # float32 accumulation
    zz = z.clone().requires_grad_()
    token_entropy(zz).sum().backward()
    zr = z.double().requires_grad_()
    categorical_entropy(zr).sum().backward()
    # the gradient is rounded once to the input dtype
    torch.testing.assert_close(zz.grad.double(), zr.grad, rtol=1e-2, atol=1e-5)


# ----------------------------------------------------------------------------- memory
def test_saves_only_logits_and_row_statistics():
    z = torch.randn(64, 1000, requires_grad=True)
    nbytes, h = saved_bytes(lambda: token_entropy(z, support=TopP(0.9)))
    rows_stats = 64 * 4 * 3 + 64  # lse, H, threshold (float32) and the valid flags
    assert nbytes <= z.numel() * 4 + rows_stats
    assert h.shape == (64,)


def test_noncontiguous_and_numpy_options_accepted():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 6, 20, generator=g, dtype=torch.float64)
    sliced = z[:, :-1]  # what a causal LM's logits look like after dropping the last position
    assert not sliced.is_contiguous()
    torch.testing.assert_close(token_entropy(sliced), categorical_entropy(sliced))
    torch.testing.assert_close(
        token_entropy(z, support=TopK(np.int64(4)), chunk_size=np.int32(2)),
        token_entropy(z, support=TopK(4), chunk_size=2),
    )
    torch.testing.assert_close(token_entropy(z, support=TopP(np.float32(0.5))), token_entropy(z, support=TopP(0.5)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    z = torch.randn(8, 300, dtype=torch.float32)
    torch.testing.assert_close(token_entropy(z.to("cuda")).cpu(), token_entropy(z))


# ----------------------------------------------------------------------------- bad inputs
Z = torch.randn(2, 3, 5)

BAD_ENTROPY_INPUTS = [
    (lambda: token_entropy(Z, mask=torch.ones(2, 4, dtype=torch.bool)), InputError, r"mask has shape \(2, 4\)"),
    (lambda: token_entropy(Z, mask=torch.ones(2, 3)), TypeError, "mask must be boolean"),
    (lambda: token_entropy(Z, mask=torch.full((2, 3), 2)), InputError, "other than 0 and 1"),
    (lambda: token_entropy(Z, temperature=0.0), InputError, "temperature must be a finite number > 0"),
    (lambda: token_entropy(Z, temperature=-1.0), InputError, "temperature must be a finite number > 0"),
    (lambda: token_entropy(Z, temperature="hot"), TypeError, "temperature must be a positive real"),
    (lambda: token_entropy(Z, support=TopP(0.0)), InputError, r"TopP.p must lie in \(0, 1\]"),
    (lambda: token_entropy(Z, support=TopP(1.5)), InputError, r"TopP.p must lie in \(0, 1\]"),
    (lambda: token_entropy(Z, support=Clamp(1.0)), InputError, r"Clamp.fraction must lie in \[0, 1\)"),
    (lambda: token_entropy(Z, support=Clamp(-0.1)), InputError, r"Clamp.fraction must lie in \[0, 1\)"),
    (lambda: token_entropy(Z, support=TopK(0)), InputError, "TopK.k must be an int >= 1"),
    (lambda: token_entropy(Z, support=TopK(2.5)), TypeError, "TopK.k must be an int"),
    (lambda: token_entropy(Z, support=TopK(True)), TypeError, "TopK.k must be an int, got bool"),
    (lambda: token_entropy(Z, support=TopK(6)), InputError, "exceeds the vocabulary size V = 5"),
    (lambda: token_entropy(Z, support="top-p"), TypeError, "support must be None, 'full', TopK"),
    (lambda: token_entropy(Z, chunk_size=0), InputError, "chunk_size must be an int >= 1"),
    (lambda: token_entropy(Z, chunk_size=2.0), TypeError, "chunk_size must be an int"),
    (lambda: token_entropy(torch.ones(2, 5, dtype=torch.int64)), TypeError, "must have a floating dtype"),
    (lambda: token_entropy(torch.ones(2, 5, dtype=torch.complex64)), TypeError, "must have a floating dtype"),
    (lambda: token_entropy(np.zeros((2, 5))), TypeError, "logits must be a torch.Tensor"),
    (lambda: token_entropy(torch.empty(0, 5)), InputError, "logits is empty"),
    (lambda: token_entropy(torch.empty(2, 0)), InputError, "logits is empty"),
    (lambda: token_entropy(torch.tensor(1.0)), InputError, "at least one axis"),
    (lambda: token_entropy(torch.tensor([[0.0, float("nan")]])), InputError, "logits contains NaN"),
    (lambda: token_entropy(torch.tensor([[0.0, float("inf")]])), InputError, "logits contains an infinite"),
    (lambda: token_entropy(torch.empty(2, 5, device="meta")), InputError, "meta tensor"),
    (lambda: token_entropy(Z, mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), InputError, "meta tensor"),
]


@pytest.mark.parametrize("call,err,match", BAD_ENTROPY_INPUTS)
def test_bad_inputs_token_entropy(call, err, match):
    with pytest.raises(err, match=match):
        call()


H = torch.randn(4, 6)
W = torch.randn(10, 6)
LAB = torch.zeros(4, dtype=torch.long)

BAD_HIDDEN_INPUTS = [
    (lambda: token_logprob_entropy(H, torch.randn(10, 5), LAB), InputError, r"weight must have shape \(V, d\)"),
    (lambda: token_logprob_entropy(H, W.double(), LAB), InputError, "must match hidden"),
    (lambda: token_logprob_entropy(H, W, LAB[:3]), InputError, r"labels has shape \(3,\)"),
    (lambda: token_logprob_entropy(H, W, LAB.float()), TypeError, "labels must hold integer token ids"),
    (lambda: token_logprob_entropy(H, W, LAB + 10), InputError, r"labels must lie in \[0, V\)"),
    (lambda: token_logprob_entropy(H, W, LAB - 1), InputError, r"labels must lie in \[0, V\)"),
    (lambda: token_logprob_entropy(H, W, LAB, bias=torch.zeros(9)), InputError, r"bias must be a \(10,\) tensor"),
    (lambda: token_logprob_entropy(H, W, LAB, temperature=0), InputError, "temperature must be a finite number > 0"),
    (lambda: token_logprob_entropy(H.long(), W, LAB), TypeError, "hidden must have a floating dtype"),
    (lambda: token_logprob_entropy(torch.empty(0, 6), W, LAB[:0]), InputError, "hidden is empty"),
    (lambda: token_logprob_entropy(H.masked_fill(H > 1, float("nan")), W, LAB), InputError, "hidden contains NaN"),
    (lambda: token_logprob_entropy(H, W, LAB, chunk_size=0), InputError, "chunk_size must be an int >= 1"),
    (lambda: token_logprob_entropy(H.to("meta"), W, LAB), InputError, "meta tensor"),
]


@pytest.mark.parametrize("call,err,match", BAD_HIDDEN_INPUTS)
def test_bad_inputs_token_logprob_entropy(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ----------------------------------------------------------------------------- hidden states
def _explicit(h, w, labels, bias, temperature):
    z = h.double() @ w.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    return z.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1), categorical_entropy(z)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tiles", [("auto", "auto"), (7, 3), (64, 1)])
def test_logprob_entropy_values(with_bias, temperature, tiles, device):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 9, 12, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(50, 12, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(50, generator=g, dtype=torch.float64).to(device) if with_bias else None
    lab = torch.randint(0, 50, (2, 9), generator=g).to(device)
    lp, ent = token_logprob_entropy(h, w, lab, bias=b, temperature=temperature, chunk_size=tiles[0],
                                    row_chunk_size=tiles[1])
    rlp, rent = _explicit(h, w, lab, b, temperature)
    torch.testing.assert_close(lp, rlp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, rent, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_logprob_entropy_gradcheck(with_bias, temperature):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    lab = torch.randint(0, 23, (7,), generator=g)

    def f(h, w, b):
        return token_logprob_entropy(h, w, lab, bias=b, temperature=temperature, chunk_size=6, row_chunk_size=3)

    assert torch.autograd.gradcheck(f, (h, w, b))


@pytest.mark.parametrize("which", ["entropy", "logp"])
def test_each_output_alone_has_its_gradient(which):
    # a loss on the entropy alone must move hidden and weight (the bug TRL shipped dropped it)
    g = torch.Generator().manual_seed(10)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 30, (6,), generator=g)
    lp, ent = token_logprob_entropy(h, w, lab, chunk_size=7)
    (ent if which == "entropy" else lp).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rlp, rent = _explicit(h2, w2, lab, None, 1.0)
    (rent if which == "entropy" else rlp).sum().backward()
    assert h.grad.abs().max() > 0
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-12)


def test_logprob_entropy_bf16_accuracy_and_grad_dtype():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(32, 64, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(3000, 64, generator=g) * 0.4).to(torch.bfloat16).requires_grad_()
    lab = torch.randint(0, 3000, (32,), generator=g)
    lp, ent = token_logprob_entropy(h, w, lab)
    assert lp.dtype == ent.dtype == torch.float32
    rlp, rent = _explicit(h.detach(), w.detach(), lab, None, 1.0)
    assert (ent.double() - rent).abs().max() < 1e-4
    assert (lp.double() - rlp).abs().max() < 1e-4
    (lp.sum() + ent.sum()).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert not torch.isnan(h.grad).any() and not torch.isnan(w.grad).any()


@pytest.mark.parametrize("bf16_gemm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logprob_entropy_half_tiles_match_float64(monkeypatch, with_bias, bf16_gemm):
    """bfloat16 inputs on tiles that split rows, vocabulary and the hidden axis (float32 copies
    one hidden block at a time, the weight's gradient added once per row block): the values
    and all three gradients against float64 autograd on the same (bf16-exact) inputs, with the
    backward's gradient products in float32 and as bfloat16 GEMMs (forced on either CPU)."""
    from entrokit.rl import entropy as E

    monkeypatch.setattr(E, "_hidden_tiles", lambda *args: (5, 7, 8))  # 3 row blocks, 6 chunks, 3 blocks
    monkeypatch.setattr(E, "_bf16_gemm", lambda *args: bf16_gemm)
    g = torch.Generator().manual_seed(12)
    h = torch.randn(13, 20, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(40, 20, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(40, generator=g)).to(torch.bfloat16).requires_grad_() if with_bias else None
    lab = torch.randint(0, 40, (13,), generator=g)
    gl, ge = torch.randn(13, generator=g), torch.randn(13, generator=g)
    lp, ent = token_logprob_entropy(h, w, lab, bias=b, temperature=0.8)
    (lp * gl + ent * ge).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    rlp, rent = _explicit(h64, w64, lab, b64, 0.8)
    (rlp * gl.double() + rent * ge.double()).sum().backward()
    assert (lp.double() - rlp).abs().max() < 1e-5 and (ent.double() - rent).abs().max() < 1e-5
    # each gradient is within a few bf16 roundings (3 row blocks) of the float64 one; the
    # bfloat16 GEMMs round dz (relative 2^-9) and each chunk's dh product (2^-9) as well, which
    # adds at most 2^-7 |dz| |W| / tau (dh) and 2^-8 |dz|^T |h| / tau (dW) per entry
    z = ((h64.detach() @ w64.detach().t() + (b64.detach() if with_bias else 0.0)) / 0.8).requires_grad_()
    zlp = z.log_softmax(-1).gather(-1, lab[:, None]).squeeze(-1)
    (zlp * gl.double() + categorical_entropy(z) * ge.double()).sum().backward()
    dz = z.grad.abs() / 0.8
    slack = {"h": 2.0**-7 * dz @ w64.detach().abs(), "w": 2.0**-8 * dz.t() @ h64.detach().abs(), "b": 0.0}
    grads = {"h": (h.grad, h64.grad), "w": (w.grad, w64.grad)} | ({"b": (b.grad, b64.grad)} if with_bias else {})
    for name, (got, ref) in grads.items():
        assert got.dtype == torch.bfloat16
        err = (got.double() - ref).abs()
        bound = 3 * 2.0**-8 * ref.abs() + 1e-3 * float(ref.abs().max()) + (slack[name] if bf16_gemm else 0.0)
        assert (err <= bound).all(), (name, float((err - bound).max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "vocab", "d"), [(1024, 32768, 4096), (1024, 151936, 1024), (4096, 151936, 4096),
                                               (256, 50000, 8192), (3, 7, 5)])
def test_hidden_tiles_stay_within_the_memory_budget(dtype, n, vocab, d):
    """The automatic tiles keep their working set (two float32 tiles, and for half inputs the
    row block's float32 gradient, one float32 hidden block of each operand and the backward's
    bfloat16 tile and block product) under 1/28 of the logits (1/48 in float32), or 1 MiB for
    small problems, and never exceed the problem."""
    from entrokit.rl.entropy import _hidden_tiles

    rows, cols, block = _hidden_tiles(n, vocab, d, dtype, torch.device("cpu"))
    assert 1 <= rows <= n and 1 <= cols <= vocab and 1 <= block <= d
    half = dtype == torch.bfloat16
    working = 4 * (2 * rows * cols + ((rows * d + (rows + cols) * block) if half else 0))
    working += 2 * (rows * cols + rows * block) if half else 0
    elem = 2 if half else 4
    assert working <= max(1 << 20, n * vocab * elem // (28 if half else 48))
    if not half:
        assert block == d


def test_bf16_gemm_path_only_for_bfloat16_on_cpu():
    from entrokit.rl.entropy import _bf16_gemm

    cpu = torch.device("cpu")
    assert not _bf16_gemm(torch.float16, cpu) and not _bf16_gemm(torch.float32, cpu)
    assert not _bf16_gemm(torch.bfloat16, torch.device("meta"))
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert _bf16_gemm(torch.bfloat16, cpu) == native


def test_logprob_entropy_bf16_gemm_gradients_stay_near_one_rounding():
    """At a realistic shape (32 vocabulary chunks, one row block) the median relative error of
    the gradients is that of rounding the float64 gradient once to bfloat16 for the float32
    products, and at most 1.75x it for the bfloat16 GEMMs (measured: 1.2x for dh, 1.6x for dW,
    the cost of dz entering the GEMM in bfloat16, as in PyTorch's own bfloat16 backward of a
    linear layer); the values do not change."""
    from entrokit.rl import entropy as E

    g = torch.Generator().manual_seed(3)
    h = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(32768, 256, generator=g) * 0.05).to(torch.bfloat16)
    lab = torch.randint(0, 32768, (64,), generator=g)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    rlp, rent = _explicit(h64, w64, lab, None, 1.0)
    (rlp.sum() + rent.sum()).backward()
    for ref in (h64.grad, w64.grad):
        assert ref.abs().min() > 0
    once = [float(((r.to(torch.bfloat16).double() - r).abs() / r.abs()).median()) for r in (h64.grad, w64.grad)]
    for flag in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(E, "_bf16_gemm", lambda *args, flag=flag: flag)
            lp, ent = token_logprob_entropy(hh, ww, lab)
            (lp.sum() + ent.sum()).backward()
        assert (ent.double() - rent).abs().max() < 1e-5 and (lp.double() - rlp).abs().max() < 1e-5
        for got, ref, base in ((hh.grad, h64.grad, once[0]), (ww.grad, w64.grad, once[1])):
            med = float(((got.double() - ref).abs() / ref.abs()).median())
            assert med <= (1.05 if not flag else 1.75) * base, (flag, med, base)


def test_logprob_entropy_never_saves_logits():
    h = torch.randn(128, 32, requires_grad=True)
    w = torch.randn(4000, 32, requires_grad=True)
    lab = torch.randint(0, 4000, (128,))
    nbytes, _ = saved_bytes(lambda: token_logprob_entropy(h, w, lab))
    inputs = (h.numel() + w.numel()) * 4 + lab.numel() * 8
    assert nbytes <= inputs + 128 * 4 * 2  # the inputs plus (lse, H) per row; no (T, V) tensor


def test_package_exports_resolve():
    import entrokit
    import entrokit.rl as rl

    assert entrokit.rl is rl
    for name in rl.__all__:
        assert getattr(rl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rl.nope  # noqa: B018
