r"""Fused Triton paths of :func:`entrokit.rl.token_entropy` (full support) and
:func:`entrokit.rl.token_logprob_entropy`, used for CUDA tensors
(:func:`use_fused`); the formulas are those of :mod:`entrokit.rl.entropy`.

* :func:`token_entropy_rows`: forward and backward are one pass over the vocabulary per row
  (:mod:`entrokit.rl._triton_kernels`): the forward reads the logits once and writes two
  numbers per row; the backward reads them once and writes the gradient.
* :func:`logprob_entropy_rows`: the forward computes the logits tile by tile with ``tl.dot``
  (``h W^T``, one ``(64, 128)`` tile in registers, never in memory) and writes three numbers per
  row. The backward visits the vocabulary in chunks: one matmul recomputes a
  ``(rows, chunk)`` block of logits, one fused kernel turns it in place into
  :math:`\partial L/\partial z`, and two matmuls accumulate the gradients of ``hidden``,
  ``weight`` (and ``bias``): the (rows, V) logits are never formed, the largest buffer is
  about :data:`BWD_CHUNK_ELEMS` entries. For bfloat16/float16 inputs the three matmuls run on
  the tensor cores with float32 results (:func:`_mm_f32`).

float32 accumulation for bfloat16/float16/float32 inputs, float64 for float64 inputs. The
``tl.dot`` of the forward follows ``torch.backends.cuda.matmul.allow_tf32`` for float32 inputs
(as the recomputing ``torch.matmul`` of the backward does). On CPU the kernels run only under
the Triton interpreter (the tests).
"""

from __future__ import annotations

import torch

from entrokit.geometry._triton import available, interpreting

__all__ = ["use_fused", "token_entropy_rows", "logprob_entropy_rows"]

# the backward's logits chunk holds about this many entries (256 MiB of float32)
BWD_CHUNK_ELEMS = 1 << 26
# (BLOCK_T, BLOCK_V, BLOCK_D, num_warps) of the forward per input dtype (half types: bfloat16's),
# and the blocks of the backward's dz kernel: none spills registers on sm_90
# (tests/rl/test_fused_entropy.py compiles them)
_FWD_BLOCKS = {torch.bfloat16: (64, 128, 64, 8), torch.float32: (32, 64, 16, 4), torch.float64: (32, 64, 16, 4)}
DZ_BLOCKS, DZ_WARPS = (8, 256), 4


def use_fused(t: torch.Tensor) -> bool:
    """The dispatch rule: CUDA tensors, triton installed, ``ENTROKIT_TRITON`` not ``"0"``."""
    import os

    return t.is_cuda and os.environ.get("ENTROKIT_TRITON", "1") != "0" and available()


def _k():
    from entrokit.rl import _triton_kernels

    return _triton_kernels


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError("the fused entropy kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1).")


def _wdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A one-element tensor of ``like``'s dtype and device (kernel scalars in float64 when needed)."""
    return torch.full((1,), value, dtype=like.dtype, device=like.device)


def _block_v(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 16


class _FusedTokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, inv_t):
        _check_device(logits2d)
        z = logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()
        n, V = z.shape
        lse = torch.empty(n, dtype=_wdt(z.dtype), device=z.device)
        h = torch.empty_like(lse)
        bv = _block_v(z.device)
        _k().entropy_fwd_kernel[(n,)](z, lse, h, V, z.stride(0), _scalar(inv_t, lse), BLOCK_V=bv,
                                      num_warps=8 if z.is_cuda else 1)
        ctx.save_for_backward(z, lse, h)
        ctx.inv_t = inv_t
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, lse, h = ctx.saved_tensors
        g = g.to(lse.dtype).contiguous()
        dz = torch.empty_like(z)
        bv = _block_v(z.device)
        _k().entropy_bwd_kernel[(z.shape[0],)](z, lse, h, g, dz, z.shape[1], z.stride(0), dz.stride(0),
                                               _scalar(ctx.inv_t, lse), BLOCK_V=bv, num_warps=8 if z.is_cuda else 1)
        return dz, None


def token_entropy_rows(logits2d: torch.Tensor, inv_t: float) -> torch.Tensor:
    r"""Entropy of ``softmax(logits2d * inv_t)`` per row, ``(rows,)``, differentiable; rows with
    no finite logit get 0 and a zero gradient."""
    return _FusedTokenEntropy.apply(logits2d, float(inv_t))


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half tensors with a float32 result (float32 accumulation, no rounding of the
    product to the half dtype): ``torch.mm(..., out_dtype=)`` on CUDA, float32 operands elsewhere."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm's out_dtype
            pass
    return a.float() @ b.float()


def _tf32_prec(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 follows torch's TF32 switch, float64 is exact;
    bfloat16/float16 products are exact in float32 whatever the setting (Triton's default)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, inv_t):
        _check_device(hidden2d)
        n, d = hidden2d.shape
        V = weight.shape[0]
        wdt = _wdt(hidden2d.dtype)
        if hidden2d.is_cuda:
            bt, bv, bd, warps = _FWD_BLOCKS[hidden2d.dtype if hidden2d.dtype in _FWD_BLOCKS else torch.bfloat16]
            programs = 4 * torch.cuda.get_device_properties(hidden2d.device).multi_processor_count
        else:  # the interpreter: two vocabulary splits, so the merge is exercised
            bt, bv, bd, warps = 16, 16, 16, 1
            programs = 2 * -(-n // bt)
        row_blocks = -(-n // bt)
        # split the vocabulary when there are too few row blocks to fill the GPU
        splits = max(1, min(-(-programs // row_blocks), -(-V // bv)))
        per_split = -(-V // (splits * bv)) * bv
        splits = -(-V // per_split)
        part = torch.empty(4, splits, n, dtype=wdt, device=hidden2d.device)
        _k().logprob_entropy_fwd_kernel[(row_blocks, splits)](
            hidden2d, weight, bias if bias is not None else weight, labels, part[0], part[1], part[2], part[3],
            n, V, d, per_split, *hidden2d.stride(), *weight.stride(), _scalar(inv_t, part), HAS_BIAS=bias is not None,
            BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd, PREC=_tf32_prec(hidden2d.dtype), UPCAST=not hidden2d.is_cuda,
            num_warps=warps)
        lse, ent, logp = _merge_splits(*part)
        ctx.save_for_backward(hidden2d, weight, bias, labels, lse, ent)
        ctx.inv_t = inv_t
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden2d, weight, bias, labels, lse, ent = ctx.saved_tensors
        inv_t = ctx.inv_t
        wdt = lse.dtype
        n, V = hidden2d.shape[0], weight.shape[0]
        gl = torch.zeros_like(lse) if g_logp is None else g_logp.to(wdt).contiguous()
        ge = torch.zeros_like(lse) if g_ent is None else g_ent.to(wdt).contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # half inputs: tensor-core matmuls with float32 results (the recomputed logits are exact
        # float32 sums of exact products; dL/dz is rounded to the input dtype for the two gradient
        # products, as autograd of a half matmul does); float32/float64: matmuls in wdt
        half = hidden2d.dtype in (torch.bfloat16, torch.float16)
        h_mm = hidden2d if half else hidden2d.to(wdt)
        gh = torch.zeros(hidden2d.shape, dtype=wdt, device=hidden2d.device) if need_h else None
        gw = torch.empty_like(weight) if need_w else None
        gb = torch.empty_like(bias) if need_b else None
        cols = max(128, BWD_CHUNK_ELEMS // max(n, 1)) if hidden2d.is_cuda else 24
        bt, bv = DZ_BLOCKS if hidden2d.is_cuda else (16, 16)
        for v0 in range(0, V, cols):
            w_c = weight[v0:v0 + cols] if half else weight[v0:v0 + cols].to(wdt)
            z = _mm_f32(h_mm, w_c.t()) if half else h_mm @ w_c.t()
            if bias is not None:
                z += bias[v0:v0 + cols].to(wdt)
            nc = z.shape[1]
            _k().logprob_entropy_dz_kernel[(-(-n // bt), -(-nc // bv))](
                z, lse, ent, gl, ge, labels, n, nc, v0, z.stride(0), _scalar(inv_t, lse), BLOCK_T=bt, BLOCK_V=bv,
                num_warps=DZ_WARPS if z.is_cuda else 1)
            dz = z.to(hidden2d.dtype) if half else z
            if need_h:
                gh += _mm_f32(dz, w_c) if half else dz @ w_c
            if need_w:
                gw[v0:v0 + cols] = _mm_f32(dz.t(), h_mm) if half else dz.t() @ h_mm
            if need_b:
                gb[v0:v0 + cols] = z.sum(0)
        if gh is not None:
            gh = gh.to(hidden2d.dtype)
        return gh, gw, gb, None, None


def _merge_splits(m, s, t, zl):
    r"""Merge the per-split states ``(splits, n)``: :math:`M = \max_k m_k`,
    :math:`S = \sum_k s_k e^{m_k - M}`, :math:`T = \sum_k e^{m_k - M}(t_k + s_k(m_k - M))`;
    ``lse = M + log S``, ``H = log S - T / S``, ``log p_y = x_y - lse``."""
    M = m.amax(0)
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    T = (scale * (t + s * (m - M))).sum(0)
    lse = M + torch.log(S)
    return lse, torch.log(S) - T / S, zl.sum(0) - lse


def logprob_entropy_rows(hidden2d, weight, bias, labels, inv_t: float):
    r"""``(log p_y, H)`` per row of ``z = (hidden2d W^T + b) inv_t``, differentiable in ``hidden2d``,
    ``weight`` and ``bias``; ``labels``: int64 ``(rows,)`` in ``[0, V)``."""
    return _FusedLogprobEntropy.apply(hidden2d, weight, bias, labels.contiguous(), float(inv_t))
