r"""Triton kernels of the fused token entropies (imported only by :mod:`entrokit.rl._triton`).

Per row, the vocabulary is visited in tiles with the online state
:math:`(m, s=\sum_j e^{x_j-m}, t=\sum_j e^{x_j-m}(x_j-m))`, merged across tiles by
:math:`s \leftarrow e^{m-m'}s + \ldots`, :math:`t \leftarrow e^{m-m'}(t + s(m-m')) + \ldots`; then
:math:`\operatorname{lse} = m + \log s` and :math:`H = \log s - t/s` (``x = z / tau``;
``-inf`` entries contribute exactly 0, a row with no finite entry gets ``H = 0``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _merge(m, s, t, x, valid):
    """One tile ``x`` (``valid``: finite entries) merged into the running ``(m, s, t)`` (last axis)."""
    mn = tl.maximum(m, tl.max(x, -1))
    safe = tl.where(mn == float("-inf"), 0.0, mn)
    scale = tl.exp(m - safe)
    shift = s * (tl.where(s > 0, m, safe) - safe)  # s = 0 while m = -inf: 0, not 0 * -inf
    y = tl.where(valid, x - tl.expand_dims(safe, -1), 0.0)  # no -inf in the products below
    e = tl.where(valid, tl.exp(y), 0.0)
    t = scale * (t + shift) + tl.sum(e * y, -1)
    s = scale * s + tl.sum(e, -1)
    return mn, s, t


@triton.jit
def entropy_fwd_kernel(z_ptr, lse_ptr, h_ptr, V, szr, inv_ptr, BLOCK_V: tl.constexpr):
    """Per row of ``z``: ``lse`` and ``H`` of ``softmax(z * inv_t)``; one program per row."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * szr
    wdt = lse_ptr.dtype.element_ty
    inv_t = tl.load(inv_ptr)  # 1 / temperature in the working dtype (a float argument would be float32)
    m = tl.full([1], float("-inf"), dtype=wdt)
    s = tl.zeros([1], dtype=wdt)
    t = tl.zeros([1], dtype=wdt)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(wdt) * inv_t
        x = tl.reshape(x, [1, BLOCK_V])
        m, s, t = _merge(m, s, t, x, x != float("-inf"))
    ok = s > 0
    lse = tl.where(ok, m + tl.log(tl.where(ok, s, 1.0)), float("-inf"))
    h = tl.where(ok, tl.log(tl.where(ok, s, 1.0)) - t / tl.where(ok, s, 1.0), 0.0)
    tl.store(lse_ptr + row + tl.arange(0, 1), lse)
    tl.store(h_ptr + row + tl.arange(0, 1), h)


@triton.jit
def entropy_bwd_kernel(z_ptr, lse_ptr, h_ptr, g_ptr, dz_ptr, V, szr, sdr, inv_ptr, BLOCK_V: tl.constexpr):
    r"""``dz_j = -g inv_t p_j (x_j - lse + H)``, ``p_j = e^{x_j - lse}`` (0 on ``-inf`` entries)."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * szr
    dz_ptr += row * sdr
    wdt = lse_ptr.dtype.element_ty
    inv_t = tl.load(inv_ptr)  # 1 / temperature in the working dtype (a float argument would be float32)
    lse = tl.load(lse_ptr + row)
    h = tl.load(h_ptr + row)
    g = tl.load(g_ptr + row)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty rows: g = 0 and every p = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(wdt) * inv_t
        finite = x != float("-inf")
        y = tl.where(finite, x - lse, 0.0)
        d = tl.where(finite, -g * inv_t * tl.exp(y) * (y + h), 0.0)
        tl.store(dz_ptr + cols, d.to(dz_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def logprob_entropy_fwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, m_ptr, s_ptr, t_ptr, zl_ptr, n, V, d, per_split,
                               shn, shd, swv, swd, inv_ptr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                               UPCAST: tl.constexpr):
    """Per row of ``hidden`` and per vocabulary split ``[k per_split, (k+1) per_split)`` (grid axis
    1): the online state ``(m, s, t)`` of ``x = (h W^T + b) * inv_t`` and the label's ``x`` if it
    falls in the split, written to row ``k`` of the ``(splits, n)`` outputs (merged by the
    caller); the logits exist only as one ``(BLOCK_T, BLOCK_V)`` tile in registers. ``UPCAST`` converts
    the operands to the working dtype before ``tl.dot`` (the CPU interpreter's ``tl.dot`` reads
    bfloat16 as raw bits; on a GPU bfloat16 operands go to the tensor cores as they are)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    wdt = m_ptr.dtype.element_ty
    inv_t = tl.load(inv_ptr)  # 1 / temperature in the working dtype (a float argument would be float32)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < n
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_T], float("-inf"), dtype=wdt)
    s = tl.zeros([BLOCK_T], dtype=wdt)
    t = tl.zeros([BLOCK_T], dtype=wdt)
    zl = tl.zeros([BLOCK_T], dtype=wdt)
    rk = tl.arange(0, BLOCK_D)
    v_end = tl.minimum(V, (split + 1) * per_split)
    for v0 in range(split * per_split, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=wdt)
        for k0 in range(0, d, BLOCK_D):
            kd = k0 + rk
            hk = tl.load(h_ptr + rows[:, None].to(tl.int64) * shn + kd[None, :] * shd,
                         mask=rmask[:, None] & (kd[None, :] < d), other=0.0)
            wk = tl.load(w_ptr + cols[:, None].to(tl.int64) * swv + kd[None, :] * swd,
                         mask=cmask[:, None] & (kd[None, :] < d), other=0.0)
            if UPCAST:
                hk = hk.to(wdt)
                wk = wk.to(wdt)
            acc += tl.dot(hk, tl.trans(wk), input_precision=PREC).to(wdt)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(wdt)[None, :]
        x = tl.where(cmask[None, :], acc * inv_t, float("-inf"))
        zl += tl.sum(tl.where(cols[None, :] == lab[:, None], x, 0.0), 1)
        m, s, t = _merge(m, s, t, x, cmask[None, :])
    out = split * n + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)
    tl.store(zl_ptr + out, zl, mask=rmask)


@triton.jit
def logprob_entropy_dz_kernel(z_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, lab_ptr, n, nc, v0, szr, inv_ptr,
                              BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    r"""In place on a ``(rows, nc)`` chunk of logits ``z`` (columns ``v0 ..``):
    ``dz = inv_t [g_logp (1[j = y] - p_j) - g_H p_j (x_j - lse + H)]`` with ``x = z inv_t``."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < n
    mask = rmask[:, None] & (cols[None, :] < nc)
    wdt = lse_ptr.dtype.element_ty
    inv_t = tl.load(inv_ptr)  # 1 / temperature in the working dtype (a float argument would be float32)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0)
    ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1) - v0
    ptrs = z_ptr + rows[:, None].to(tl.int64) * szr + cols[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(wdt) * inv_t - lse[:, None]
    p = tl.exp(y)
    dz = -p * (gl[:, None] + ge[:, None] * (y + ent[:, None]))
    dz += tl.where(cols[None, :] == lab[:, None], gl[:, None], 0.0)
    tl.store(ptrs, (dz * inv_t).to(z_ptr.dtype.element_ty), mask=mask)
