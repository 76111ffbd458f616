"""SuperGlue-style optimal-transport matching layer with a dustbin."""

import pytest
import torch

from autograd_memory import saved_bytes
from entrokit import InputError
from entrokit.nn.matching import OTMatching, log_optimal_transport

D = torch.float64


def superglue_reference(scores, alpha, iters):
    """SuperGlue's log_optimal_transport, re-typed from its formula: couplings with a
    dustbin row/column of ``alpha``; log mu = [-log(m+n)] * m + [log n - log(m+n)],
    log nu likewise; ``iters`` log-domain row-then-column updates from u = v = 0;
    returns Z + u + v + log(m+n)."""
    b, m, n = scores.shape
    norm = -torch.log(torch.tensor(float(m + n), dtype=scores.dtype))
    Z = torch.cat([
        torch.cat([scores, alpha.expand(b, m, 1)], -1),
        torch.cat([alpha.expand(b, 1, n), alpha.expand(b, 1, 1)], -1),
    ], 1)
    log_mu = torch.cat([norm.expand(m), torch.log(torch.tensor(float(n), dtype=scores.dtype))[None] + norm])
    log_nu = torch.cat([norm.expand(n), torch.log(torch.tensor(float(m), dtype=scores.dtype))[None] + norm])
    log_mu, log_nu = log_mu[None].expand(b, -1), log_nu[None].expand(b, -1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(Z + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(Z + u.unsqueeze(2), dim=1)
    return Z + u.unsqueeze(2) + v.unsqueeze(1) - norm


def data(B=2, M=6, N=5, seed=0, dtype=D, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(B, M, N, generator=g, dtype=dtype) * scale).requires_grad_()
    alpha = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    return scores, alpha


@pytest.mark.parametrize("iters", [1, 3, 100])
@pytest.mark.parametrize("grad", ["unroll", "implicit"])
def test_matches_superglue(iters, grad):
    scores, alpha = data()
    ref = superglue_reference(scores, alpha, iters)
    out = log_optimal_transport(scores, alpha, iters, grad=grad)
    assert out.shape == (2, 7, 6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)  # in fact to rounding
    if grad == "unroll":
        w = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(1), dtype=D)
        g_ref = torch.autograd.grad((ref * w).sum(), (scores, alpha))
        g_out = torch.autograd.grad((out * w).sum(), (scores, alpha))
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_float32_parity():
    scores, alpha = data(B=3, M=40, N=30, dtype=torch.float32, scale=1.0)
    ref = superglue_reference(scores, alpha, 100)
    torch.testing.assert_close(log_optimal_transport(scores, alpha, 100, grad="unroll"), ref, atol=1e-5, rtol=1e-6)


def test_marginals_with_dustbin():
    scores, alpha = data(M=6, N=4)
    P = log_optimal_transport(scores, alpha, tol=1e-13).exp()
    torch.testing.assert_close(P.sum(-1), torch.tensor([1.0] * 6 + [4.0], dtype=D).expand(2, 7), atol=1e-12, rtol=0)
    torch.testing.assert_close(P.sum(-2), torch.tensor([1.0] * 4 + [6.0], dtype=D).expand(2, 5), atol=1e-12, rtol=0)


def test_gradcheck_unroll():
    scores, alpha = data(B=1, M=3, N=4)
    assert torch.autograd.gradcheck(lambda s, a: log_optimal_transport(s, a, 10, grad="unroll"), (scores, alpha))


def test_gradcheck_implicit_at_fixed_point():
    scores, alpha = data(B=2, M=3, N=4, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda s, a: log_optimal_transport(s, a, grad="implicit", tol=1e-14), (scores, alpha), atol=1e-6
    )


def test_bin_score_learns_and_implicit_matches_unroll():
    layer = OTMatching(n_iter=300, grad="implicit")
    scores, _ = data(B=2, M=5, N=7, scale=1.0)
    w = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    layer = layer.double()
    (layer(scores) * w).sum().backward()
    g_bin, g_scores = layer.bin_score.grad.clone(), scores.grad.clone()
    assert float(g_bin.abs()) > 0
    layer.bin_score.grad, scores.grad = None, None
    unrolled = OTMatching(n_iter=300, grad="unroll").double()
    (unrolled(scores) * w).sum().backward()
    torch.testing.assert_close(g_bin, unrolled.bin_score.grad, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(g_scores, scores.grad, atol=1e-9, rtol=1e-8)
    # a training step moves the dustbin score
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = float(layer.bin_score.detach())
    opt.zero_grad()
    layer(scores.detach())[:, -1, :-1].sum().backward()  # push mass into the dustbin
    opt.step()
    assert float(layer.bin_score.detach()) != before



def _padded_batch(seed=3):
    """Two images per sample padded to (M, N) = (6, 5): sample 0 has (4, 5) real
    keypoints, sample 1 (6, 2) with its real keypoints scattered."""
    scores, alpha = data(B=2, M=6, N=5, seed=seed, scale=1.5)
    valid0 = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    valid1 = torch.tensor([[True] * 5, [False, True, False, False, True]])
    return scores, alpha, valid0, valid1


@pytest.mark.parametrize("grad", ["unroll", "implicit"])
@pytest.mark.parametrize("mode", [dict(n_iter=7), dict(tol=1e-13)])
def test_padded_batch_equals_each_unpadded_problem(grad, mode):
    scores, alpha, valid0, valid1 = _padded_batch()
    out = log_optimal_transport(scores, alpha, grad=grad, valid0=valid0, valid1=valid1, **mode)
    w = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    live = torch.isfinite(out)
    g_scores, g_alpha = torch.autograd.grad((torch.where(live, out, 0.0) * w).sum(), (scores, alpha))
    g_alpha_ref = torch.zeros_like(alpha)
    for k in range(2):
        rows = torch.cat([valid0[k].nonzero().squeeze(1), torch.tensor([6])])
        cols = torch.cat([valid1[k].nonzero().squeeze(1), torch.tensor([5])])
        sk = scores.detach()[k][valid0[k]][:, valid1[k]].unsqueeze(0).requires_grad_()
        ref = log_optimal_transport(sk, alpha, grad=grad, **mode)
        torch.testing.assert_close(out[k][rows][:, cols], ref[0], atol=1e-11, rtol=1e-11)
        # padded rows and columns: probability 0
        assert torch.isneginf(out[k][~torch.isin(torch.arange(7), rows)]).all()
        assert torch.isneginf(out[k][:, ~torch.isin(torch.arange(6), cols)]).all()
        gs, ga = torch.autograd.grad((ref[0] * w[k][rows][:, cols]).sum(), (sk, alpha))
        torch.testing.assert_close(g_scores[k][valid0[k]][:, valid1[k]], gs[0], atol=1e-9, rtol=1e-8)
        g_alpha_ref += ga
        # padded scores receive no gradient
        pad = ~(valid0[k].unsqueeze(1) & valid1[k].unsqueeze(0))
        assert (g_scores[k][pad] == 0).all()
    torch.testing.assert_close(g_alpha, g_alpha_ref, atol=1e-9, rtol=1e-8)


def test_padded_marginals_and_one_sided_sample():
    scores, alpha, valid0, valid1 = _padded_batch()
    valid1 = valid1.clone()
    valid1[1] = False  # sample 1: no real keypoint in image 1, all six go to the dustbin
    P = log_optimal_transport(scores, alpha, tol=1e-13, valid0=valid0, valid1=valid1).exp()
    torch.testing.assert_close(P[0].sum(-1), torch.tensor([1.0] * 4 + [0.0] * 2 + [5.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(P[0].sum(-2), torch.tensor([1.0] * 5 + [4.0], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(P[1, :6, 5], torch.ones(6, dtype=D), atol=1e-12, rtol=0)
    assert float(P[1, :, :5].detach().sum()) == 0.0 and float(P[1, 6].detach().sum()) == 0.0
    # the module takes the masks too
    layer = OTMatching(tol=1e-13).double()
    with torch.no_grad():
        layer.bin_score.copy_(alpha)
    torch.testing.assert_close(layer(scores, valid0, valid1).exp(), P, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(valid0=[[True] * 3]), TypeError, "valid0 must be a torch.Tensor"),
        (dict(valid0=torch.ones(1, 3)), TypeError, "valid0 must be bool"),
        (dict(valid1=torch.ones(1, 3, dtype=torch.bool)), InputError, r"valid1 must have shape \(1, 4\)"),
        (dict(valid0=torch.zeros(1, 3, dtype=torch.bool), valid1=torch.zeros(1, 4, dtype=torch.bool)),
         InputError, r"samples \[0\] have no real keypoint"),
    ],
)
def test_bad_masks(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        log_optimal_transport(torch.randn(1, 3, 4), 1.0, 10, **kwargs)


def test_implicit_memory_same_for_1_and_100_iterations():
    scores, alpha = data(B=4, M=30, N=40, dtype=torch.float32, scale=1.0)
    sizes = {}
    for grad in ("implicit", "unroll"):
        for iters in (1, 100):
            sizes[grad, iters], out = saved_bytes(
                lambda iters=iters, grad=grad: log_optimal_transport(scores, alpha, iters, grad=grad)
            )
            out.sum().backward()
    assert sizes["implicit", 1] == sizes["implicit", 100]
    assert sizes["implicit", 100] <= 3 * 4 * 31 * 41 * 4
    assert sizes["unroll", 100] > 50 * sizes["implicit", 100]


def test_module_repr_and_dtypes():
    layer = OTMatching(n_iter=20, bin_score_init=0.5)
    assert "n_iter=20" in repr(layer) and "implicit" in repr(layer)
    assert isinstance(layer.bin_score, torch.nn.Parameter) and float(layer.bin_score.detach()) == 0.5
    out = layer(torch.randn(1, 3, 2, dtype=torch.float32))
    assert out.dtype == torch.float32 and out.shape == (1, 4, 3)
    out16 = log_optimal_transport(torch.randn(1, 3, 2).bfloat16(), 1.0, 20)
    assert out16.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(3, 4), 1.0), {}, InputError, r"shape \(B, M, N\)"),
        ((torch.randn(1, 0, 0), 1.0), {}, InputError, "no keypoint in either image"),
        ((torch.randn(1, 3, 4), float("nan")), {}, InputError, "bin_score must be finite, got nan"),
        ((torch.randn(1, 3, 4), torch.tensor(float("-inf"))), {}, InputError, "bin_score must be finite, got -inf"),
        ((torch.randn(1, 3, 4), torch.tensor(1.0, device="meta")), {}, InputError, "bin_score is a meta tensor"),
        ((torch.randn(1, 3, 4).long(), 1.0), {}, TypeError, "floating"),
        (([[1.0]], 1.0), {}, TypeError, "scores must be a torch.Tensor"),
        ((torch.randn(1, 3, 4), torch.ones(2)), {}, InputError, "bin_score must be a scalar"),
        ((torch.randn(1, 3, 4), "a"), {}, TypeError, "bin_score must be a number"),
        ((torch.randn(1, 3, 4), 1.0, 0), {}, InputError, "n_iter must be an int >= 1"),
        ((torch.randn(1, 3, 4), 1.0), dict(grad="envelope"), InputError, "grad must be one of"),
        ((torch.randn(1, 3, 4), 1.0), dict(tol=-1.0), InputError, "tol must be"),
    ],
)
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        log_optimal_transport(*args, **kwargs)


def test_bad_module_options():
    with pytest.raises(InputError, match="n_iter must be"):
        OTMatching(n_iter=0)
    with pytest.raises(InputError, match="grad must be one of"):
        OTMatching(grad="autodiff")
    with pytest.raises(InputError, match="bin_score_init must be a finite number"):
        OTMatching(bin_score_init=float("inf"))


def test_bfloat16_under_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 6, 5, generator=g).bfloat16().requires_grad_(True)
    ref = log_optimal_transport(scores.detach().float(), 1.0, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OTMatching(n_iter=50)(scores)
    assert out.dtype == torch.bfloat16
    # the module's bin score is a float32 parameter initialised to 1.0: the same problem
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    out.float().exp().sum().backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad.float()).all()


@pytest.mark.parametrize("M, N", [(0, 4), (3, 0)])
def test_no_keypoint_in_one_image_is_the_all_padding_problem(M, N):
    # M = 0 is the same problem as M padded keypoints (valid0 all False): every keypoint of
    # the other image goes to the dustbin
    g = torch.Generator().manual_seed(14)
    out = log_optimal_transport(torch.randn(2, M, N, generator=g, dtype=torch.float64), 1.0, 50)
    Mp, Np = max(M, 2), max(N, 2)
    padded = torch.randn(2, Mp, Np, generator=g, dtype=torch.float64)
    valid0 = torch.full((2, Mp), M > 0)
    valid1 = torch.full((2, Np), N > 0)
    ref = log_optimal_transport(padded, 1.0, 50, valid0=valid0, valid1=valid1)
    ref = ref[:, Mp:, :] if M == 0 else ref[:, :, Np:]
    assert out.shape == (2, M + 1, N + 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert log_optimal_transport(torch.randn(0, 3, 4), 1.0, 5).shape == (0, 4, 5)  # an empty batch
