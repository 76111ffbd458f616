r"""Triton kernels of the fused online reductions (imported only by :mod:`entrokit.geometry._triton`).

Both kernels evaluate, tile by tile in registers, the base-2 exponent

.. math::

    t_{ij} = a_i + b_j + X_i \cdot Y_j \qquad (\text{a } \texttt{tl.dot} \text{ of a row block
    against a column block, inner dimension } d\text{; } d \le 4 \text{ outer products in full precision}),

where the caller has folded :math:`\log_2 e`, :math:`1/\varepsilon`, the potentials and the
squared norms into ``X``, ``a`` and ``b`` (:mod:`entrokit.geometry._triton`). Padded rows,
columns and coordinates load as ``0`` (coordinates) or ``-inf`` (offsets), so tails that are
not multiples of a block need no special case.

* :func:`lse_kernel` keeps the online pair :math:`(M_i, S_i)` of
  :math:`\log_2\sum_j 2^{t_{ij}}` (FlashAttention's running max and rescaled sum) and writes
  only the ``n`` pairs.
* :func:`plan_kernel` accumulates :math:`\sum_j 2^{t_{ij}} V_{jk}` for one block of ``k``
  columns of ``V`` with a second ``tl.dot`` (``HAS_V=False``: the row sums
  :math:`\sum_j 2^{t_{ij}}`, i.e. the marginal).

``PREC`` is ``"ieee"`` (full float32 products) or ``"tf32"``. Grid: ``(row blocks, batch[, k blocks])``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_block(x_ptr, rm, n, d, sxn, sxd, BLOCK_D: tl.constexpr, SMALL_D: tl.constexpr):
    """The coordinates ``X_i`` of the row block, kept in registers over the column loop
    (zeros with ``SMALL_D``: :func:`_exponent` then loads them one coordinate at a time)."""
    rd = tl.arange(0, BLOCK_D)
    return tl.load(x_ptr + rm[:, None] * sxn + rd[None, :] * sxd,
                   mask=(rm[:, None] < n) & (rd[None, :] < d) & (SMALL_D == 0), other=0.0)


@triton.jit
def _exponent(x_ptr, y_ptr, b_ptr, rm, rn, n, m, d, sxn, sxd, syn, syd, sbn, x_regs,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
              PREC: tl.constexpr, SMALL_D: tl.constexpr):
    """``b_j + X_i . Y_j`` on one (row block, column block ``rn``) tile (padded columns:
    ``-inf``): ``SMALL_D`` (> 0) outer products of coordinate vectors (``d <= 4``: no padding
    of the inner dimension to 16), else ``tl.dot``."""
    b_row = tl.load(b_ptr + rn * sbn, mask=rn < m, other=float("-inf"))
    rd = tl.arange(0, BLOCK_D)
    if SMALL_D > 0:
        t = tl.zeros([BLOCK_M, BLOCK_N], dtype=x_regs.dtype)
        for k in tl.static_range(SMALL_D):
            xk = tl.load(x_ptr + rm * sxn + k * sxd, mask=rm < n, other=0.0)
            yk = tl.load(y_ptr + rn * syn + k * syd, mask=rn < m, other=0.0)
            t += xk[:, None] * yk[None, :]
    elif ONE_D:
        y = tl.load(y_ptr + rn[:, None] * syn + rd[None, :] * syd,
                    mask=(rn[:, None] < m) & (rd[None, :] < d), other=0.0)
        t = tl.dot(x_regs, tl.trans(y), input_precision=PREC)
    else:
        t = tl.zeros([BLOCK_M, BLOCK_N], dtype=x_regs.dtype)
        for k0 in range(0, d, BLOCK_D):
            kd = k0 + rd
            xk = tl.load(x_ptr + rm[:, None] * sxn + kd[None, :] * sxd,
                         mask=(rm[:, None] < n) & (kd[None, :] < d), other=0.0)
            yk = tl.load(y_ptr + rn[:, None] * syn + kd[None, :] * syd,
                         mask=(rn[:, None] < m) & (kd[None, :] < d), other=0.0)
            t += tl.dot(xk, tl.trans(yk), input_precision=PREC)
    return t + b_row[None, :]


@triton.jit
def lse_kernel(x_ptr, y_ptr, a_ptr, b_ptr, mx_ptr, s_ptr, n, m, d,
               sxb, sxn, sxd, syb, syn, syd, sab, san, sbb, sbn, sob, son,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D: tl.constexpr,
               PREC: tl.constexpr, SMALL_D: tl.constexpr, HAS_A: tl.constexpr):
    """Per row ``i``: ``M_i = max_j t_ij`` and ``S_i = sum_j 2^(t_ij - M_i)``; the row offset
    ``a_i`` (``HAS_A``) is added to ``M_i`` once, at the end."""
    pid = tl.program_id(0)
    bat = tl.program_id(1)
    x_ptr += bat * sxb
    y_ptr += bat * syb
    b_ptr += bat * sbb
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    x_regs = _row_block(x_ptr, rm, n, d, sxn, sxd, BLOCK_D, SMALL_D)
    mx = tl.full([BLOCK_M], float("-inf"), dtype=x_regs.dtype)
    s = tl.zeros([BLOCK_M], dtype=x_regs.dtype)
    for c0 in range(0, m, BLOCK_N):
        rn = c0 + tl.arange(0, BLOCK_N)
        t = _exponent(x_ptr, y_ptr, b_ptr, rm, rn, n, m, d, sxn, sxd, syn, syd, sbn, x_regs,
                      BLOCK_M, BLOCK_N, BLOCK_D, ONE_D, PREC, SMALL_D)
        new = tl.maximum(mx, tl.max(t, 1))
        safe = tl.where(new == float("-inf"), 0.0, new)  # an all -inf row so far: exp2(-inf) = 0
        s = s * tl.exp2(mx - safe) + tl.sum(tl.exp2(t - safe[:, None]), 1)
        mx = new
    if HAS_A:
        mx += tl.load(a_ptr + bat * sab + rm * san, mask=rm < n, other=0.0)
    tl.store(mx_ptr + bat * sob + rm * son, mx, mask=rm < n)
    tl.store(s_ptr + bat * sob + rm * son, s, mask=rm < n)


@triton.jit
def plan_kernel(x_ptr, y_ptr, a_ptr, b_ptr, v_ptr, out_ptr, n, m, d, k,
                sxb, sxn, sxd, syb, syn, syd, sab, san, sbb, sbn, svb, svn, svk, sob, son, sok,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                ONE_D: tl.constexpr, HAS_V: tl.constexpr, PREC: tl.constexpr, SMALL_D: tl.constexpr):
    """``out_ik = sum_j 2^(a_i + b_j + X_i . Y_j) V_jk`` (``HAS_V=False``: ``V = 1``, ``k = 1``)."""
    pid = tl.program_id(0)
    bat = tl.program_id(1)
    pk = tl.program_id(2)
    x_ptr += bat * sxb
    y_ptr += bat * syb
    a_ptr += bat * sab
    b_ptr += bat * sbb
    v_ptr += bat * svb
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    x_regs = _row_block(x_ptr, rm, n, d, sxn, sxd, BLOCK_D, SMALL_D)
    a_col = tl.load(a_ptr + rm * san, mask=rm < n, other=float("-inf"))
    if HAS_V:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=x_regs.dtype)
    else:
        acc1 = tl.zeros([BLOCK_M], dtype=x_regs.dtype)
    for c0 in range(0, m, BLOCK_N):
        rn = c0 + tl.arange(0, BLOCK_N)
        t = _exponent(x_ptr, y_ptr, b_ptr, rm, rn, n, m, d, sxn, sxd, syn, syd, sbn, x_regs,
                      BLOCK_M, BLOCK_N, BLOCK_D, ONE_D, PREC, SMALL_D)
        p = tl.exp2(t + a_col[:, None])
        if HAS_V:
            v = tl.load(v_ptr + rn[:, None] * svn + rk[None, :] * svk,
                        mask=(rn[:, None] < m) & (rk[None, :] < k), other=0.0)
            acc += tl.dot(p, v, input_precision=PREC)
        else:
            acc1 += tl.sum(p, 1)
    if HAS_V:
        tl.store(out_ptr + bat * sob + rm[:, None] * son + rk[None, :] * sok, acc,
                 mask=(rm[:, None] < n) & (rk[None, :] < k))
    else:
        tl.store(out_ptr + bat * sob + rm * son, acc1, mask=rm < n)
