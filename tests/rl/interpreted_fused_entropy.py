"""The fused entropy kernels (entrokit.rl._triton) on CPU tensors under the Triton interpreter,
against the pure-torch paths of entrokit.rl.entropy and float64 closed forms.

Run by ``tests/rl/test_fused_entropy.py`` in a subprocess with ``TRITON_INTERPRET=1``. Under the
interpreter the blocks are 16 wide: V = 45 and 37 leave tails, 38 rows leave a partial row block,
d = 20 takes two coordinate blocks.
"""

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the runner
    pytest.skip("run by tests/rl/test_fused_entropy.py under TRITON_INTERPRET=1", allow_module_level=True)

from entrokit.rl import _triton as fused
from entrokit.rl import entropy as torch_path

F64 = torch.float64


def logits(dtype, rows=7, V=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3.0 * torch.randn(rows, V, generator=g, dtype=F64)).to(dtype)
    z[1, 3] = -math.inf  # a token of probability 0
    z[2] = -math.inf  # a row with no distribution
    return z


def entropy64(z, tau):
    p = torch.softmax(z.double() / tau, -1)
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_token_entropy_matches_the_torch_path_forward_and_backward(dtype, tau):
    z = logits(dtype)
    g = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=F64)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    h1 = fused.token_entropy_rows(z1, 1.0 / tau)
    h2 = torch_path.token_entropy(z2, temperature=tau)
    assert h1.dtype == h2.dtype
    (h1 * g.to(h1.dtype)).sum().backward()
    (h2 * g.to(h2.dtype)).sum().backward()
    tol = 1e-13 if dtype == F64 else 2e-6
    torch.testing.assert_close(h1, h2, rtol=0, atol=tol)
    assert z1.grad.dtype == dtype
    torch.testing.assert_close(z1.grad.double(), z2.grad.double(), rtol=0, atol=tol if dtype != torch.bfloat16 else 1e-2)
    ref = entropy64(z, tau)
    ref[2] = 0.0
    torch.testing.assert_close(h1.double(), ref, rtol=0, atol=tol * 10)
    # the empty row: H = 0 and no gradient; the -inf token: exactly 0 gradient
    assert h1[2] == 0 and bool((z1.grad[2] == 0).all()) and z1.grad[1, 3] == 0


def test_token_entropy_gradcheck():
    z = logits(F64, rows=3, V=20)
    z[2] = torch.randn(20, dtype=F64)  # gradcheck needs finite entries
    z[1, 3] = 0.5
    assert torch.autograd.gradcheck(lambda t: fused.token_entropy_rows(t, 1.0 / 0.8), (z.requires_grad_(),),
                                    fast_mode=True)


def lm_head(dtype, bias=True, seed=0, rows=(2, 19), V=37, d=20):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(*rows, d, generator=g, dtype=F64).to(dtype)
    W = torch.randn(V, d, generator=g, dtype=F64).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    lab = torch.randint(0, V, rows, generator=g)
    return hid, W, b, lab


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_logprob_entropy_matches_the_torch_path_forward_and_backward(dtype, bias):
    hid, W, b, lab = lm_head(dtype, bias)
    tau = 0.7
    ins1 = [t.clone().requires_grad_() for t in (hid, W, b) if t is not None]
    ins2 = [t.clone().requires_grad_() for t in (hid, W, b) if t is not None]
    lp1, e1 = fused.logprob_entropy_rows(ins1[0].reshape(-1, 20), ins1[1], ins1[2] if bias else None,
                                         lab.reshape(-1), 1.0 / tau)
    lp2, e2 = torch_path.token_logprob_entropy(ins2[0], ins2[1], lab, bias=ins2[2] if bias else None,
                                               temperature=tau)
    lp2, e2 = lp2.reshape(-1), e2.reshape(-1)
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(38, generator=g, dtype=F64), torch.randn(38, generator=g, dtype=F64)
    ((lp1 * a.to(lp1.dtype)).sum() + (e1 * c.to(e1.dtype)).sum()).backward()
    ((lp2 * a.to(lp2.dtype)).sum() + (e2 * c.to(e2.dtype)).sum()).backward()
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=tol)
    torch.testing.assert_close(e1, e2, rtol=0, atol=tol)
    # float64 closed form of the same quantities
    z = (hid.double().reshape(-1, 20) @ W.double().t() + (b.double() if bias else 0.0)) / tau
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(lp1.double(), logp.gather(1, lab.reshape(-1, 1)).squeeze(1), rtol=0, atol=tol * 10)
    torch.testing.assert_close(e1.double(), -(logp.exp() * logp).sum(-1), rtol=0, atol=tol * 10)
    for u, v in zip(ins1, ins2):
        assert u.grad.dtype == dtype
        gtol = 1e-11 if dtype == F64 else (5e-2 if dtype == torch.bfloat16 else 1e-4)
        torch.testing.assert_close(u.grad.double(), v.grad.double(), rtol=gtol, atol=gtol)


def test_logprob_entropy_gradcheck():
    hid, W, b, lab = lm_head(F64, rows=(5,), V=21, d=3)
    fn = lambda h, w, bb: fused.logprob_entropy_rows(h, w, bb, lab, 1.0 / 0.9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (hid, W, b)), fast_mode=True)


def test_logprob_entropy_of_one_output_only():
    """Only the entropy is used: the log-prob's gradient is None and must count as zero."""
    hid, W, b, lab = lm_head(F64)
    h1, h2 = hid.reshape(-1, 20).clone().requires_grad_(), hid.clone().requires_grad_()
    _, e1 = fused.logprob_entropy_rows(h1, W, b, lab.reshape(-1), 1.0)
    _, e2 = torch_path.token_logprob_entropy(h2, W, lab, bias=b)
    e1.sum().backward()
    e2.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad.reshape(-1, 20), rtol=1e-12, atol=1e-12)
