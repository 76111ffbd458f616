"""Running a layer as a training loop under ``torch.autocast`` on CPU runs it (mixed-precision tests)."""

import torch


def under_autocast(fn, *inputs):
    """``(out, ref)``: ``fn`` on the bfloat16 versions of the floating ``inputs`` under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``, and ``fn`` on the same (rounded) values
    in float32 without autocast: the two differ only by what the layer computes in bfloat16."""
    low = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    ref = fn(*[t.float() if t.is_floating_point() else t for t in low])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*low)
    return out, ref


def assert_half_in_half_out(fn, *inputs, dtype, grad=True):
    """``fn`` on the ``dtype`` (float16/bfloat16) versions of the floating ``inputs``, without
    autocast: the result and the gradients come back in ``dtype`` and equal the float64
    computation on the same rounded values to one unit in the last place of ``dtype`` (a layer
    that sums in half precision misses this on inputs with many terms)."""
    eps = torch.finfo(dtype).eps
    low = [t.to(dtype).requires_grad_(grad) if t.is_floating_point() else t for t in inputs]
    ref_in = [t.detach().double().requires_grad_(grad) if t.is_floating_point() else t for t in low]
    out, ref = fn(*low), fn(*ref_in)
    assert out.dtype == dtype, f"{out.dtype} returned for {dtype} inputs"
    torch.testing.assert_close(out.double(), ref.detach(), rtol=eps, atol=0)
    if not grad:
        return
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))  # a fixed cotangent
    (out.float() * w).sum().backward()
    (ref * w.double()).sum().backward()
    for t, r in zip(low, ref_in):
        if t.is_floating_point() and r.grad is not None:
            assert t.grad.dtype == dtype
            scale = r.grad.abs().max().item()
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=2 * eps, atol=2 * eps * scale)


def wide_batch(seed: int, b: int = 8, c: int = 2000):
    """``(logits, labels, index, soft_targets)`` of ``b`` samples over ``c`` classes: with many
    classes, sums over the class axis accumulated in half precision are several units in the
    last place off."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, generator=g)
    labels, index = torch.randint(0, c, (b,), generator=g), torch.arange(b)
    return logits, labels, index, torch.softmax(3 * torch.randn(b, c, generator=g), 1)
