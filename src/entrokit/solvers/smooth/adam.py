r"""Fixed-step Adam: the first-order mode for use inside networks (never warns)."""

from __future__ import annotations

import torch


def adam(fun, x, n_steps, lr, tol, betas=(0.9, 0.999), adam_eps=1e-8):
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    errs = []
    _, g, err = fun(x)
    errs.append(err)
    for t in range(1, n_steps + 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mh = m / (1 - betas[0] ** t)
        vh = v / (1 - betas[1] ** t)
        x = x - lr * mh / (vh.sqrt() + adam_eps)
        _, g, err = fun(x)
        errs.append(err)
    n_iter = torch.full((x.shape[0],), n_steps, dtype=torch.long, device=x.device)
    return x, n_iter, err <= tol, torch.stack(errs, 0)
