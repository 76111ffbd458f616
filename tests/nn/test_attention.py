"""Sinkhorn (Sinkformer) attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from autograd_memory import saved_bytes
from entrokit import ConvergenceWarning, InputError
from entrokit.nn import attention
from entrokit.nn.attention import (
    SinkhornAttention,
    sinkhorn_attention,
    sinkhorn_attention_with_weights,
)

D = torch.float64


def qkv(*shape_q, S=None, Ev=None, seed=0, dtype=D, requires_grad=False):
    *lead, T, E = shape_q
    S = T if S is None else S
    Ev = E if Ev is None else Ev
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, T, E, generator=g, dtype=dtype)
    k = torch.randn(*lead, S, E, generator=g, dtype=dtype)
    v = torch.randn(*lead, S, Ev, generator=g, dtype=dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def sinkformer_reference(scores, n_it, eps=1.0):
    """Sinkformer's loop (sinkformers/vit_pytorch/sinkhorn.py), typed from its update:
    alternating half-steps on M = (-C + u_i + v_j)/eps from u = v = 0, C = -scores,
    marginals 1/T and 1/S; the plan is multiplied by T."""
    C = -scores
    T, S = C.shape[-2:]
    u = torch.zeros(C.shape[:-1], dtype=C.dtype)
    v = torch.zeros(*C.shape[:-2], S, dtype=C.dtype)

    def M():
        return (-C + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps

    for i in range(n_it):
        if i % 2 == 0:
            u = eps * (math.log(1.0 / T) - torch.logsumexp(M(), dim=-1)) + u
        else:
            v = eps * (math.log(1.0 / S) - torch.logsumexp(M().transpose(-2, -1), dim=-1)) + v
    return torch.exp(M()) * T


def flat_grads(*ts):
    return torch.cat([t.grad.flatten() for t in ts])


# -- n_iter = 1 is softmax attention ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_one_iteration_is_sdpa(dtype, mask):
    q, k, v = qkv(2, 3, 6, 4, S=9, Ev=5, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    kw = {}
    if mask == "bool":
        m = torch.rand(2, 3, 6, 9, generator=g) > 0.3
        m[..., 0] = True  # every query keeps a key (SDPA returns NaN rows otherwise)
        kw["attn_mask"] = m
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, 3, 6, 9, generator=g, dtype=dtype)
    elif mask == "causal":
        kw["is_causal"] = True
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == D else dict(atol=2e-6, rtol=1e-5)
    for grad in ("unroll", "implicit"):
        out = sinkhorn_attention(q, k, v, n_iter=1, grad=grad, **kw)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw), **tol)


def test_one_iteration_gradient_is_sdpa_gradient():
    q, k, v = qkv(2, 2, 5, 3, S=7, requires_grad=True)
    w = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(3), dtype=D)
    (sinkhorn_attention(q, k, v, n_iter=1) * w).sum().backward()
    ours = flat_grads(q, k, v)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (F.scaled_dot_product_attention(q2, k2, v2) * w).sum().backward()
    torch.testing.assert_close(ours, flat_grads(q2, k2, v2))


def test_key_padding_matches_sdpa_and_truncated_keys():
    q, k, v = qkv(3, 2, 5, 4, S=8)
    lengths = [8, 5, 2]
    kpm = torch.arange(8)[None, :] >= torch.tensor(lengths)[:, None]  # True = padded
    out1 = sinkhorn_attention(q, k, v, n_iter=1, key_padding_mask=kpm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])
    torch.testing.assert_close(out1, ref)
    # with padding, every n_iter equals the layer run on the valid keys only
    for n_iter in (2, 3, 6):
        out, P = sinkhorn_attention_with_weights(q, k, v, n_iter=n_iter, key_padding_mask=kpm)
        for i, n in enumerate(lengths):
            o_i, P_i = sinkhorn_attention_with_weights(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], n_iter=n_iter)
            torch.testing.assert_close(out[i:i + 1], o_i)
            torch.testing.assert_close(P[i:i + 1, ..., :n], P_i)
            assert bool((P[i, ..., n:] == 0).all())


# -- Sinkformer parity and marginals ----------------------------------------------------------
@pytest.mark.parametrize("n_iter", [1, 2, 3, 4, 5, 6])
def test_matches_sinkformer_reference(n_iter):
    q, k, v = qkv(2, 2, 7, 4, requires_grad=True)
    w = torch.randn(2, 2, 7, 4, generator=torch.Generator().manual_seed(5), dtype=D)
    ref_P = sinkformer_reference(q @ k.transpose(-2, -1) / 2.0, n_iter)
    (ref_P @ v * w).sum().backward()
    ref_grads = flat_grads(q, k, v)
    for grad in ("unroll", "implicit"):
        for t in (q, k, v):
            t.grad = None
        out, P = sinkhorn_attention_with_weights(q, k, v, n_iter=n_iter, grad=grad)
        torch.testing.assert_close(P, ref_P, atol=1e-13, rtol=1e-12)
        torch.testing.assert_close(out, ref_P @ v, atol=1e-13, rtol=1e-12)
        if grad == "unroll":
            (out * w).sum().backward()
            torch.testing.assert_close(flat_grads(q, k, v), ref_grads, atol=1e-12, rtol=1e-10)


def test_marginals_rows_exact_columns_converge():
    q, k, v = qkv(2, 3, 6, 4, S=10)
    for n_iter in (3, 5, 7):
        _, P = sinkhorn_attention_with_weights(q, k, v, n_iter=n_iter)
        torch.testing.assert_close(P.sum(-1), torch.ones(2, 3, 6, dtype=D), atol=1e-14, rtol=0)
    col_err = [
        float((sinkhorn_attention_with_weights(q, k, v, n_iter=n)[1].sum(-2) - 0.6).abs().max())
        for n in (3, 9, 41)
    ]
    assert col_err[0] > col_err[1] > col_err[2]
    _, P = sinkhorn_attention_with_weights(q, k, v, tol=1e-12)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 3, 6, dtype=D), atol=1e-14, rtol=0)
    torch.testing.assert_close(P.sum(-2), torch.full((2, 3, 10), 0.6, dtype=D), atol=1e-11, rtol=0)  # T/S


def test_even_n_iter_ends_on_columns():
    q, k, v = qkv(1, 2, 5, 3, S=4)
    _, P = sinkhorn_attention_with_weights(q, k, v, n_iter=4)
    torch.testing.assert_close(P.sum(-2), torch.full((1, 2, 4), 5 / 4, dtype=D), atol=1e-14, rtol=0)
    assert float((P.sum(-1) - 1).abs().max()) > 1e-6


# -- masks -------------------------------------------------------------------------------------
def band(T, width=2):
    i = torch.arange(T)
    d = (i[:, None] - i[None, :]) % T
    return (d <= width) | (d >= T - width)  # circulant band: a doubly stochastic matrix lives on it


def test_masks_zero_weight_and_padded_keys_carry_no_mass():
    q, k, v = qkv(2, 2, 6, 3, requires_grad=True)
    kpm = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    mask = band(6)
    out, P = sinkhorn_attention_with_weights(q, k, v, attn_mask=mask, key_padding_mask=kpm, tol=1e-11,
                                             max_iter=5000)
    allowed = (mask & ~kpm[:, None, None, :]).expand(2, 2, 6, 6)
    assert bool((P[~allowed] == 0).all())
    assert bool((P[0, ..., 4:] == 0).all())
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 2, 6, dtype=D), atol=1e-12, rtol=0)
    # live keys share the 6 queries' mass equally: 6/4 per key in batch 0, 1 in batch 1
    torch.testing.assert_close(P[0].sum(-2)[..., :4], torch.full((2, 4), 1.5, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(P[1].sum(-2), torch.ones(2, 6, dtype=D), atol=1e-10, rtol=0)
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    assert bool((k.grad[0, :, 4:] == 0).all()) and bool((v.grad[0, :, 4:] == 0).all())


def test_causal_fixed_iterations():
    q, k, v = qkv(2, 2, 6, 3, requires_grad=True)
    for n_iter in (3, 21):
        out, P = sinkhorn_attention_with_weights(q, k, v, is_causal=True, n_iter=n_iter)
        assert bool((P.triu(1) == 0).all())
        torch.testing.assert_close(P.sum(-1), torch.ones(2, 2, 6, dtype=D))
        (out ** 2).sum().backward()
        assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    # the only causal doubly stochastic matrix is the identity: Sinkhorn heads there
    assert float(P.detach().diagonal(dim1=-2, dim2=-1).min()) > 0.5


def test_fully_masked_query_gives_zero_output_and_finite_gradients():
    q, k, v = qkv(1, 1, 4, 3, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    mask[:, 3] = False  # key 3 is attended by no query
    for grad in ("unroll", "implicit"):
        for t in (q, k, v):
            t.grad = None
        out, P = sinkhorn_attention_with_weights(q, k, v, attn_mask=mask, n_iter=5, grad=grad)
        assert bool((out[0, 0, 2] == 0).all()) and bool((P[0, 0, 2] == 0).all()) and bool((P[..., 3] == 0).all())
        torch.testing.assert_close(P[0, 0, [0, 1, 3]].sum(-1), torch.ones(3, dtype=D))
        (out ** 2).sum().backward()
        assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    everything = torch.zeros(4, 4, dtype=torch.bool)
    out = sinkhorn_attention(q, k, v, attn_mask=everything, n_iter=3)
    assert bool((out == 0).all())


def test_float_mask_with_inf_and_broadcast():
    q, k, v = qkv(2, 3, 5, 4)
    fm = torch.zeros(5, 5, dtype=D)
    fm[0, 1:] = -math.inf
    fm[3, 2] = -2.0
    out, P = sinkhorn_attention_with_weights(q, k, v, attn_mask=fm, n_iter=3)
    assert bool((P[..., 0, 1:] == 0).all())
    bm = fm > -math.inf
    scores = q @ k.transpose(-2, -1) / 2.0 + fm
    ref = sinkformer_reference(scores.masked_fill(~bm, -1e300), 3)
    torch.testing.assert_close(P, ref, atol=1e-12, rtol=1e-10)


# -- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_iter", [3, 4])
def test_gradcheck_unroll(n_iter):
    q, k, v = qkv(1, 2, 4, 3, S=5, requires_grad=True)
    kpm = torch.tensor([[False, False, False, False, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: sinkhorn_attention(q, k, v, n_iter=n_iter, key_padding_mask=kpm), (q, k, v)
    )


def test_gradcheck_implicit_at_fixed_point():
    q, k, v = qkv(1, 2, 4, 3, S=5, requires_grad=True)
    kpm = torch.tensor([[False, False, True, False, False]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: sinkhorn_attention(q, k, v, tol=1e-14, grad="implicit", key_padding_mask=kpm, eps=0.7),
        (q, k, v), atol=1e-6,
    )


def test_implicit_gradient_matches_unroll_when_converged():
    q, k, v = qkv(2, 2, 8, 4, S=6, requires_grad=True)
    w = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(7), dtype=D)
    grads = {}
    for grad, kw in (("unroll", dict(n_iter=401)), ("implicit", dict(tol=1e-13)), ("implicit5", dict(n_iter=5))):
        for t in (q, k, v):
            t.grad = None
        (sinkhorn_attention(q, k, v, grad=grad[:8], **kw) * w).sum().backward()
        grads[grad] = flat_grads(q, k, v)
    torch.testing.assert_close(grads["implicit"], grads["unroll"], atol=1e-10, rtol=1e-8)
    cos = F.cosine_similarity(grads["implicit5"], grads["unroll"], dim=0)
    assert float(cos) > 0.99


def test_implicit_float32_gradient_close_to_float64():
    q, k, v = qkv(2, 2, 16, 8, requires_grad=True)
    (sinkhorn_attention(q, k, v, tol=1e-12, grad="implicit") ** 2).sum().backward()
    g64 = flat_grads(q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    (sinkhorn_attention(q32, k32, v32, n_iter=41, grad="implicit") ** 2).sum().backward()
    g32 = flat_grads(q32, k32, v32).double()
    assert float((g32 - g64).norm() / g64.norm()) < 1e-4



@pytest.mark.parametrize("scaling", [True, False])
def test_implicit_memory_does_not_grow_with_iterations(scaling, monkeypatch):
    if not scaling:  # the log-domain loop (devices other than the CPU)
        monkeypatch.setattr(attention, "_SCALING_DEVICES", ())
    q, k, v = qkv(4, 2, 32, 8, requires_grad=True)
    kpm = torch.zeros(4, 32, dtype=torch.bool)
    kpm[1, 20:] = True
    sizes = {}
    for grad in ("unroll", "implicit"):
        for n in (1, 3, 20):
            sizes[grad, n], out = saved_bytes(
                lambda n=n, grad=grad: sinkhorn_attention(q, k, v, n_iter=n, grad=grad, key_padding_mask=kpm)
            )
            out.sum().backward()  # and backward runs
    # (n_iter = 1 keeps one vector less in the scaling form: its column scaling is b itself)
    assert sizes["implicit", 1] <= sizes["implicit", 3] == sizes["implicit", 20]
    one = 4 * 2 * 32 * 32 * 8  # one float64 (B, H, T, S) tensor
    assert sizes["implicit", 20] <= 3 * one + 4 * 2 * 32 * 8 * 8 * 3
    # one (B, H, T, S) tensor is kept (the closing weights, or the scaling form's kernel; the
    # logits are not)
    big = {}

    def pack(t):
        if t.untyped_storage().nbytes() >= one:
            big[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sinkhorn_attention(q, k, v, n_iter=20, grad="implicit", key_padding_mask=kpm)
    assert len(big) == 1, big
    if scaling:  # unrolled in the scaling form: the kernel alone, whatever n_iter
        # (17 more normalisations: one scaling vector and one sum vector of 4 x 2 x 32 float64 each)
        assert sizes["unroll", 20] == sizes["unroll", 3] + 2 * 17 * 4 * 2 * 32 * 8 < 5 * one
    else:  # unrolled in the log domain: one (B, H, T, S) tensor per normalisation
        assert sizes["unroll", 20] > sizes["unroll", 3] + 10 * one


# -- no host sync, torch.compile --------------------------------------------------------------------
def test_fixed_iterations_never_read_values_back(monkeypatch):
    # on a device other than the CPU (the CPU's scaling form reads one flag, free on the host)
    monkeypatch.setattr(attention, "_SCALING_DEVICES", ())
    q, k, v = qkv(2, 2, 6, 3, S=7, dtype=torch.float32, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    mask = torch.ones(6, 7, dtype=torch.bool).tril()

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for grad in ("unroll", "implicit"):
        out = sinkhorn_attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, n_iter=5, grad=grad)
    out = sinkhorn_attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, n_iter=5, grad="unroll")
    out.sum().backward()  # unrolled backward: no sync either
    with pytest.raises(AssertionError, match="host sync"):  # the detector works: tol mode reads errors back
        sinkhorn_attention(q, k, v, tol=1e-6)
    monkeypatch.undo()
    assert bool(torch.isfinite(q.grad).all())


@pytest.mark.filterwarnings("ignore:Dynamo does not know")
def test_torch_compile_traces_the_layer():
    torch._dynamo.reset()
    q, k, v = qkv(2, 2, 8, 4, dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: sinkhorn_attention(q, k, v, n_iter=3), backend="eager", fullgraph=False)
    torch.testing.assert_close(fn(q, k, v), sinkhorn_attention(q, k, v, n_iter=3))
    torch._dynamo.reset()


# -- options, module, dtypes -----------------------------------------------------------------------
def test_tol_mode_warns_when_budget_too_small():
    q, k, v = qkv(1, 1, 12, 3)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        sinkhorn_attention(q * 10, k * 10, v, tol=1e-14, max_iter=2)


def test_temperature_and_scale():
    q, k, v = qkv(1, 2, 5, 4)
    out = sinkhorn_attention_with_weights(q, k, v, n_iter=3, eps=0.5, scale=0.3)[1]
    torch.testing.assert_close(out, sinkformer_reference(q @ k.transpose(-2, -1) * 0.3, 3, eps=0.5))


def test_half_inputs_run_in_float32():
    q, k, v = qkv(1, 2, 8, 4, dtype=torch.float32)
    out = sinkhorn_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), n_iter=3)
    assert out.dtype == torch.bfloat16
    ref = sinkhorn_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), n_iter=3)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_module():
    attn = SinkhornAttention(n_iter=5, grad="implicit", dropout_p=0.5)
    assert "n_iter=5" in repr(attn) and "implicit" in repr(attn)
    q, k, v = qkv(2, 2, 6, 4, dtype=torch.float32)
    attn.eval()
    out, P = attn.forward_with_weights(q, k, v)
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, n_iter=5))
    torch.testing.assert_close(P, sinkhorn_attention_with_weights(q, k, v, n_iter=5)[1])
    # no flag changes the return type: False is accepted, True names the call that returns the weights
    torch.testing.assert_close(attn(q, k, v, need_weights=False), out)
    with pytest.raises(InputError, match=r"need_weights=True .*forward_with_weights"):
        attn(q, k, v, need_weights=True)
    torch.testing.assert_close(sinkhorn_attention(q, k, v, n_iter=5, return_weights=False), out)
    with pytest.raises(InputError, match=r"return_weights=True .*sinkhorn_attention_with_weights"):
        sinkhorn_attention(q, k, v, n_iter=5, return_weights=True)
    attn.train()
    torch.manual_seed(0)
    dropped = attn(q, k, v)
    assert not torch.allclose(dropped, out)
    assert "tol=1e-06" in repr(SinkhornAttention(tol=1e-6))
    layer = torch.nn.Sequential()  # modules compose
    layer.add_module("attn", SinkhornAttention())
    assert isinstance(layer.attn, SinkhornAttention)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_iter=0), InputError, "n_iter must be an int >= 1"),
        (dict(n_iter=2.5), TypeError, "n_iter must be an int"),
        (dict(eps=0.0), InputError, "eps must be a finite number > 0"),
        (dict(eps=-1.0), InputError, "eps must be"),
        (dict(grad="envelope"), InputError, "grad must be one of 'unroll', 'implicit'"),
        (dict(tol=0.0), InputError, "tol must be"),
        (dict(max_iter=0), InputError, "max_iter must be"),
        (dict(dropout_p=1.0), InputError, r"dropout_p must be a number in \[0, 1\)"),
        (dict(scale=float("nan")), InputError, "scale must be a finite number"),
    ],
)
def test_bad_options(kwargs, exc, match):
    q, k, v = qkv(1, 1, 3, 2)
    with pytest.raises(exc, match=match):
        sinkhorn_attention(q, k, v, **kwargs)
    module_kwargs = {key: val for key, val in kwargs.items() if key != "scale"}
    if module_kwargs:
        with pytest.raises(exc, match=match):
            SinkhornAttention(**module_kwargs)


def test_bad_shapes_and_masks():
    q, k, v = qkv(2, 3, 4, 5, S=6)
    with pytest.raises(InputError, match="same rank >= 3"):
        sinkhorn_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(InputError, match="same rank"):
        sinkhorn_attention(q, k[0], v[0])
    with pytest.raises(InputError, match="embedding size E"):
        sinkhorn_attention(q, k[..., :4], v)
    with pytest.raises(InputError, match="same number of keys S"):
        sinkhorn_attention(q, k, v[..., :5, :])
    with pytest.raises(InputError, match="share their batch axes"):
        sinkhorn_attention(q, k[:1], v[:1])
    with pytest.raises(InputError, match="share one dtype"):
        sinkhorn_attention(q, k.float(), v)
    with pytest.raises(InputError, match=r"attn_mask of shape \(4, 5\) does not broadcast to \(2, 3, 4, 6\)"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(InputError, match="not both"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(4, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(InputError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 6\)"):
        sinkhorn_attention(q, k, v, key_padding_mask=torch.zeros(6, dtype=torch.bool))
    with pytest.raises(InputError, match="key_padding_mask"):
        sinkhorn_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        sinkhorn_attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        sinkhorn_attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="floating dtype"):
        sinkhorn_attention(q.long(), k, v)


def test_bfloat16_under_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).bfloat16() for _ in range(3))
    ref = sinkhorn_attention(q.float(), k.float(), v.float())
    layer = SinkhornAttention()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(q, k, v)
        # float32 inputs stay float32 inside (autocast would run q k^T in bfloat16)
        out32 = layer(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(out32, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_shape, k_shape", [((2, 0, 4), (2, 3, 4)), ((2, 3, 4), (2, 0, 4)), ((0, 3, 4), (0, 3, 4))])
def test_empty_sequences_follow_scaled_dot_product_attention(q_shape, k_shape):
    g = torch.Generator().manual_seed(13)
    q = torch.randn(*q_shape, generator=g).requires_grad_(True)
    k, v = torch.randn(*k_shape, generator=g), torch.randn(*k_shape[:-1], 5, generator=g)
    out, w = sinkhorn_attention_with_weights(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape and w.shape == (*q_shape[:-1], k_shape[-2])
    torch.testing.assert_close(out, ref)  # empty, or zeros when S = 0
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert SinkhornAttention()(q, k, v).shape == ref.shape


@pytest.mark.parametrize("n_iter", [400, 401])
def test_implicit_gradient_with_masks_matches_unroll_when_converged(n_iter):
    """Both closing normalisations (rows for odd n_iter, columns for even) with padded keys,
    a query that may attend to nothing and a batch entry where nothing may attend: at
    convergence the implicit gradient is the unrolled one."""
    q, k, v = qkv(3, 2, 6, 4, S=5, requires_grad=True)
    w = torch.randn(3, 2, 6, 4, generator=torch.Generator().manual_seed(8), dtype=D)
    mask = torch.ones(3, 1, 6, 5, dtype=torch.bool)
    mask[0, :, :, 4] = False  # a padded key
    mask[1, :, 2] = False  # a query that may attend to nothing
    mask[2] = False  # nothing may attend: zero output
    grads = {}
    for grad in ("unroll", "implicit"):
        for t in (q, k, v):
            t.grad = None
        out, P = sinkhorn_attention_with_weights(q, k, v, attn_mask=mask, n_iter=n_iter, grad=grad)
        ((out * w).sum() + (P ** 2).sum()).backward()
        grads[grad] = flat_grads(q, k, v)
        assert bool((out[2] == 0).all()) and bool((k.grad[2] == 0).all())
    torch.testing.assert_close(grads["implicit"], grads["unroll"], atol=1e-10, rtol=1e-8)


def test_with_weights_forms_share_the_signature():
    """The *_with_weights forms take the arguments of sinkhorn_attention / forward, by
    position or name, and return (output, weights); the former flags are not theirs."""
    import inspect

    q, k, v = qkv(2, 2, 5, 3, S=4)
    m = torch.ones(5, 4, dtype=torch.bool)
    m[1, 2] = False
    out = sinkhorn_attention(q, k, v, m, 0.0, False, 0.3, n_iter=4, eps=0.5)
    o1, P1 = sinkhorn_attention_with_weights(q, k, v, m, 0.0, False, 0.3, n_iter=4, eps=0.5)
    o2, P2 = sinkhorn_attention_with_weights(q, k, v, attn_mask=m, scale=0.3, n_iter=4, eps=0.5)
    torch.testing.assert_close((o1, P1), (out, P2))
    torch.testing.assert_close(o2, out)
    assert bool((P1[..., 1, 2] == 0).all())
    attn = SinkhornAttention(n_iter=4, eps=0.5)
    o3, P3 = attn.forward_with_weights(q, k, v, m, None, False, 0.3)
    torch.testing.assert_close((o3, P3), (out, P1))
    torch.testing.assert_close(attn(q, k, v, attn_mask=m, scale=0.3), out)
    params = list(inspect.signature(sinkhorn_attention_with_weights).parameters)
    assert params == [p for p in inspect.signature(sinkhorn_attention).parameters if p != "return_weights"]
    assert list(inspect.signature(attn.forward_with_weights).parameters) == [
        "query", "key", "value", "attn_mask", "key_padding_mask", "is_causal", "scale"
    ]
    with pytest.raises(TypeError, match="n_iters"):
        sinkhorn_attention_with_weights(q, k, v, n_iters=3)
    with pytest.raises(TypeError, match="return_weights"):
        sinkhorn_attention_with_weights(q, k, v, return_weights=True)
    with pytest.raises(TypeError, match="need_weights"):
        attn.forward_with_weights(q, k, v, need_weights=True)
    with pytest.raises(InputError, match="n_iter"):
        sinkhorn_attention_with_weights(q, k, v, n_iter=0)


def test_plan_adjoint_solves_the_entropic_system():
    """The Schur-complement adjoint against the pseudo-inverse of the full Jacobian
    J = [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]] / eps on the live rows and columns, for a
    right-hand side with a gauge component (projected out) and a zero-weight row and column."""
    from entrokit.nn.attention import _plan_adjoint

    gen = torch.Generator().manual_seed(11)
    B, n, m, eps = 2, 5, 4, 0.7
    P = torch.rand(B, n, m, generator=gen, dtype=D) + 0.05
    a, b = torch.ones(B, n, dtype=D), torch.ones(B, m, dtype=D)
    a[0, 1], b[1, 3] = 0.0, 0.0
    P[0, 1, :], P[1, :, 3] = 0.0, 0.0
    rf, rg = torch.randn(B, n, generator=gen, dtype=D) + 1.0, torch.randn(B, m, generator=gen, dtype=D)
    lf, lg = _plan_adjoint(P, a, b, eps, rf, rg)
    for i in range(B):
        rows, cols = torch.nonzero(a[i] > 0).flatten(), torch.nonzero(b[i] > 0).flatten()
        Pi = P[i][rows][:, cols]
        J = torch.cat([
            torch.cat([torch.diag(Pi.sum(-1)), Pi], 1),
            torch.cat([Pi.T, torch.diag(Pi.sum(0))], 1),
        ]) / eps
        rhs = torch.cat([rf[i][rows], rg[i][cols]])
        u = torch.cat([torch.ones(len(rows)), -torch.ones(len(cols))]).to(D)
        rhs = rhs - (rhs @ u) / (u @ u) * u  # the gauge component goes
        lam = torch.linalg.pinv(J) @ rhs
        ref = lam[:len(rows), None] + lam[None, len(rows):]  # gauge-free: lambda_f_i + lambda_g_j
        torch.testing.assert_close(lf[i][rows, None] + lg[i][None, cols], ref, rtol=1e-9, atol=1e-10)
    assert float(lf[0, 1]) == 0.0 and float(lg[1, 3]) == 0.0
    # a row scaling applied without forming the scaled plan
    rs = torch.rand(B, n, generator=gen, dtype=D) + 0.5
    scaled = _plan_adjoint(P, a, b, eps, rf, rg, row_scale=rs)
    formed = _plan_adjoint(rs.unsqueeze(-1) * P, a, b, eps, rf, rg)
    torch.testing.assert_close(scaled[0][..., :, None] + scaled[1][..., None, :],
                               formed[0][..., :, None] + formed[1][..., None, :], rtol=1e-9, atol=1e-10)


# -- the scaling form (CPU) ------------------------------------------------------------------------
def _spy_scalings(mp):
    """Record, per call, whether the scaling form ran (``_kernel_scalings`` gave its steps)."""
    ran = []
    real = attention._kernel_scalings

    def spy(*args):
        out = real(*args)
        ran.append(out is not None)
        return out

    mp.setattr(attention, "_kernel_scalings", spy)
    return ran


def _layer(q, k, v, w, scaling, monkeypatch, *, weights=False, seed=None, fixed_qk=False, **kw):
    """Output and input gradients of the layer with the scaling form on or off, and whether it
    ran. ``weights``: the loss also takes the weights (``sinkhorn_attention_with_weights``);
    ``seed``: the generator seed set before the call (dropout draws the same mask);
    ``fixed_qk``: only the values require gradients."""
    with monkeypatch.context() as mp:
        ran = _spy_scalings(mp)
        if not scaling:
            mp.setattr(attention, "_SCALING_DEVICES", ())
        q_, k_, v_ = (t.detach().clone().requires_grad_(not (fixed_qk and t is not v)) for t in (q, k, v))
        if seed is not None:
            torch.manual_seed(seed)
        if weights:
            out, P = sinkhorn_attention_with_weights(q_, k_, v_, **kw)
            gen = torch.Generator().manual_seed(5)
            ((out * w).sum() + (P * torch.randn(P.shape, generator=gen, dtype=P.dtype)).sum()).backward()
            out = torch.cat([out.detach().flatten(), P.detach().flatten()])
        else:
            out = sinkhorn_attention(q_, k_, v_, **kw)
            (out * w).sum().backward()
    return (out.detach(), q_.grad, k_.grad, v_.grad), any(ran)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n_iter", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("grad", ["unroll", "implicit"])
@pytest.mark.parametrize("mask", [None, "causal", "padding"])
def test_scaling_form_equals_the_log_domain_loop(dtype, atol, n_iter, grad, mask, monkeypatch):
    q, k, v = qkv(3, 2, 7, 4, dtype=dtype, seed=n_iter)
    w = torch.randn(3, 2, 7, 4, generator=torch.Generator().manual_seed(9), dtype=dtype)
    kw = dict(n_iter=n_iter, grad=grad)
    if mask == "causal":
        kw["is_causal"] = True
    elif mask == "padding":
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[0, -3:] = True
        pad[1, :] = True  # a batch whose every key is padded: zero output
        kw["key_padding_mask"] = pad
    fast, ran = _layer(q, k, v, w, True, monkeypatch, **kw)
    slow, ran_slow = _layer(q, k, v, w, False, monkeypatch, **kw)
    assert ran and not ran_slow
    for x, y in zip(fast, slow):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("n_iter", [1, 2, 5])
@pytest.mark.parametrize("grad", ["unroll", "implicit"])
@pytest.mark.parametrize("path", ["weights", "dropout"])
def test_scaling_form_with_the_weights_or_dropout_equals_the_log_domain_loop(n_iter, grad, path, monkeypatch):
    # the weights are formed (and differentiated) when the caller takes them or drops entries
    q, k, v = qkv(3, 2, 7, 4, seed=n_iter)
    w = torch.randn(3, 2, 7, 4, generator=torch.Generator().manual_seed(9), dtype=D)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -3:] = True
    kw = dict(n_iter=n_iter, grad=grad, key_padding_mask=pad)
    if path == "dropout":
        kw.update(dropout_p=0.3, seed=11)
    fast, ran = _layer(q, k, v, w, True, monkeypatch, weights=path == "weights", **kw)
    slow, ran_slow = _layer(q, k, v, w, False, monkeypatch, weights=path == "weights", **kw)
    assert ran and not ran_slow
    for x, y in zip(fast, slow):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grad, n_iter", [("unroll", 2), ("unroll", 5), ("implicit", 300), ("implicit", 301)])
def test_gradcheck_in_the_scaling_form_with_padding(grad, n_iter, monkeypatch):
    # implicit: enough normalisations to reach the fixed point in float64, where its gradient
    # (formed without the weights) is the derivative of the layer
    q, k, v = qkv(2, 5, 3, requires_grad=True)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    ran = _spy_scalings(monkeypatch)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sinkhorn_attention(q, k, v, n_iter=n_iter, grad=grad, key_padding_mask=pad), (q, k, v),
        atol=1e-7 if grad == "implicit" else 1e-5)
    assert ran and all(ran)


@pytest.mark.parametrize("grad", ["unroll", "implicit"])
def test_scaling_form_with_fixed_queries_and_keys_gives_the_value_gradient(grad, monkeypatch):
    # only the values require gradients: the logits' gradient is skipped, the values' is exact
    q, k, v = qkv(2, 3, 6, 4, seed=3)
    w = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(4), dtype=D)
    fast, ran = _layer(q, k, v, w, True, monkeypatch, fixed_qk=True, n_iter=5, grad=grad)
    slow, ran_slow = _layer(q, k, v, w, False, monkeypatch, fixed_qk=True, n_iter=5, grad=grad)
    assert ran and not ran_slow and fast[1] is None and fast[2] is None
    for x, y in zip(fast[::3], slow[::3]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype, gap", [(torch.float32, 80.0), (torch.float64, 700.0)])
def test_a_kernel_that_would_underflow_takes_the_log_domain_loop(dtype, gap, monkeypatch):
    # key 0 scores `gap` below every query's best key: its kernel column underflows (float32
    # flushes e^-87, float64 e^-708), so the scaling form would lose it; the log domain keeps it
    q, k, v = qkv(1, 6, 2, dtype=dtype)
    scores = torch.zeros(1, 6, 6, dtype=dtype)
    scores[..., 0] = -gap
    a = torch.full((1, 6), 1 / 6, dtype=dtype)
    assert attention._kernel_scalings(scores, a, a, 5) is None
    assert attention._kernel_scalings(scores.clamp_min(-gap / 10), a, a, 5) is not None
    P = sinkhorn_attention_with_weights(q, k, v, n_iter=5, scale=1.0)[1]  # an ordinary problem
    assert bool(torch.isfinite(P).all())
    L = torch.randn(1, 6, 6, dtype=dtype, generator=torch.Generator().manual_seed(1))
    L[..., 0] -= gap
    keys, values = torch.eye(6, dtype=dtype)[None], torch.randn(1, 6, 3, dtype=dtype)  # scores = L
    w = torch.ones(1, 6, 3, dtype=dtype)
    out, ran = _layer(L, keys, values, w, True, monkeypatch, n_iter=5, scale=1.0)
    ref, _ = _layer(L, keys, values, w, False, monkeypatch, n_iter=5, scale=1.0)
    assert not ran
    for x, y in zip(out, ref):
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("n", [5, 130])
def test_matvec_and_vecmat_are_the_batched_products(n):
    g = torch.Generator().manual_seed(n)
    M = torch.randn(3, n, n + 1, generator=g, dtype=D)
    x, y = torch.randn(3, n + 1, generator=g, dtype=D), torch.randn(3, n, generator=g, dtype=D)
    torch.testing.assert_close(attention._matvec(M, x), torch.einsum("bij,bj->bi", M, x), rtol=0, atol=1e-12)
    torch.testing.assert_close(attention._vecmat(y, M), torch.einsum("bi,bij->bj", y, M), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scaling", [True, False])
def test_implicit_gradient_with_a_single_live_key_is_finite_and_zero(scaling, monkeypatch):
    # one live key: every query puts all its weight there whatever the scores, so the weights
    # do not depend on q or k; the adjoint's Schur complement is singular (its curvature 0)
    if not scaling:
        monkeypatch.setattr(attention, "_SCALING_DEVICES", ())
    g = torch.Generator().manual_seed(22)  # inputs on which the adjoint's CG met p^T A p = 0
    q, k, v, w = (torch.randn(*shape, generator=g) for shape in ((1, 1, 9, 2), (1, 1, 2, 2), (1, 1, 2, 3), (1, 1, 9, 3)))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pad = torch.tensor([[False, True]])
    out = sinkhorn_attention(q, k, v, n_iter=7, grad="implicit", eps=0.3, scale=0.1, key_padding_mask=pad)
    torch.testing.assert_close(out.detach(), v.detach()[..., :1, :].expand(1, 1, 9, 3))
    (out * w).sum().backward()
    for t in (q, k):
        assert bool(torch.isfinite(t.grad).all())
        torch.testing.assert_close(t.grad, torch.zeros_like(t.grad), rtol=0, atol=1e-6)
