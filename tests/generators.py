"""Ground-truth generators shared by the test suite: random problems and problems whose
OT solution is known in closed form."""

from __future__ import annotations

import torch

D = torch.float64


def random_problem(n, m, *, seed=0, dtype=D, device="cpu", zeros=False, batch=None):
    """Random weights (optionally with zeros) and a uniform [0, 1] cost ``(…, n, m)``."""
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else ((batch,) if isinstance(batch, int) else tuple(batch))
    a = torch.rand(*shape, n, generator=gen, dtype=D) + 0.1
    b = torch.rand(*shape, m, generator=gen, dtype=D) + 0.1
    if zeros:
        a[..., 0] = 0.0
        b[..., -1] = 0.0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    C = torch.rand(*shape, n, m, generator=gen, dtype=D)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), C.to(dtype=dtype, device=device)


def uniform(n, *, dtype=D, device="cpu"):
    return torch.full((n,), 1.0 / n, dtype=dtype, device=device)


def permutation_problem(n, *, seed=0, dtype=D):
    """Uniform weights and a cost that is 0 on a random permutation and 1 elsewhere: the
    LP optimum is that permutation (cost 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    C = torch.ones(n, n, dtype=dtype)
    C[torch.arange(n), perm] = 0.0
    return uniform(n, dtype=dtype), uniform(n, dtype=dtype), C, perm


def one_dimensional_w2(n, *, seed=0, dtype=D):
    """Two 1-D samples of equal size with uniform weights and the exact squared W2 between
    them (sorted matching)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen, dtype=dtype)
    y = torch.randn(n, 1, generator=gen, dtype=dtype) * 0.5 + 1.0
    exact = float(((x.sort(0).values - y.sort(0).values) ** 2).mean())
    return x, y, exact


def dirac_source(b, costs):
    """A single source point: the only coupling is ``b`` itself, at cost ``<c, b>``."""
    b = torch.as_tensor(b, dtype=D)
    C = torch.as_tensor(costs, dtype=D).reshape(1, -1)
    return torch.ones(1, dtype=D), b, C, float((C[0] * b).sum())


def clouds(n, m, d, *, seed=0, dtype=D, shift=0.1, batch=()):
    """x ~ U[0,1]^d, y ~ 0.8 U[0,1]^d + shift (the benchmark's problem)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=gen, dtype=D)
    y = 0.8 * torch.rand(*batch, m, d, generator=gen, dtype=D) + shift
    return x.to(dtype), y.to(dtype)


def weights(n, *, seed=0, zeros=(), dtype=D, batch=()):
    """Random positive weights summing to 1, with exact zeros at ``zeros``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(*batch, n, generator=gen, dtype=D) + 0.5
    for k in zeros:
        w[..., k] = 0.0
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def gaussian_clouds(n=30, m=25, d=2, seed=0, batch=()):
    """x ~ N(0, I), y ~ 0.7 N(0, I) + 0.5 and random positive weights summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=gen, dtype=D)
    y = 0.7 * torch.randn(*batch, m, d, generator=gen, dtype=D) + 0.5
    a = torch.rand(*batch, n, generator=gen, dtype=D) + 0.1
    b = torch.rand(*batch, m, generator=gen, dtype=D) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
