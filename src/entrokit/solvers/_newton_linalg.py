r"""Sparsified Hessians of the entropic dual and their linear solvers (Newton stage).

All quantities live in the *mass-scaled* form used by the Newton solvers: with the
plan :math:`T_{ij} = \exp((\alpha_i + \beta_j - C_{ij})/\varepsilon)`, the dual
Hessian is :math:`-\varepsilon^{-1} K` with

.. math::

    K = \begin{pmatrix} \mathrm{diag}(T\mathbf 1) & T \\ T^\top & \mathrm{diag}(T^\top
    \mathbf 1)\end{pmatrix} \succeq 0,\qquad K(\mathbf 1, -\mathbf 1) = 0 .

A sparsified :math:`K_s` keeps the *exact* diagonal and a subset :math:`\mathcal S` of
the entries of :math:`T`. It is symmetric and weakly diagonally dominant, hence PSD,
and :math:`K_s + \sigma I` (shift :math:`\sigma > 0`) is positive definite.

The system :math:`(K_s + \sigma I)\,d = \text{rhs}` is reduced to the Schur complement
on the column block (eliminating the diagonal row block),

.. math::

    S = \mathrm{diag}(c) + \sigma I - T_s^\top\,\mathrm{diag}(r+\sigma)^{-1} T_s ,

which is solved either matrix-free by Jacobi-preconditioned CG (any device) or, on
CPU, by a sparse direct factorisation (SciPy's SuperLU).
"""

from __future__ import annotations

import math
import warnings

import torch

from entrokit.solvers._numerics import (
    DenseBlock,
    SparseBlock,
    solve_bipartite,
)

DENSE_ABOVE = 0.1  # density above which the kept block is stored dense

__all__ = [
    "SparseCoupling",
    "threshold_safe",
    "threshold_density",
    "schur_solve",
    "dense_hessian",
]


class SparseCoupling:
    """The kept entries of :math:`T` (``mask``) plus the exact marginals.

    Stored dense (the masked copy of :math:`T`) above a density of ``DENSE_ABOVE``, where
    a BLAS mat-vec beats CSR; otherwise as CSR copies of :math:`T_s` and
    :math:`T_s^\top`.

    Attributes:
        r, c: exact row and column sums of the full :math:`T` (the kept diagonal).
        shape: ``(n, m)``.
        nnz: number of kept entries.
    """

    def __init__(self, T: torch.Tensor, mask: torch.Tensor, r: torch.Tensor, c: torch.Tensor):
        n, m = T.shape
        self.r, self.c, self.shape = r, c, (n, m)
        self._mask, self._T = mask, T
        self._coo = self._dense = None
        rows, cols, vals = self.coo()
        self.nnz = int(vals.numel())
        if self.nnz > DENSE_ABOVE * n * m:
            self._dense = torch.where(mask, T, torch.zeros((), dtype=T.dtype, device=T.device))
            return
        # CSR copies of T_s and T_s^T: one sparse mat-vec per product (MKL / cuSPARSE)
        dev = vals.device
        crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        order = torch.argsort(cols, stable=True)
        ccol = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=m), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self._A = torch.sparse_csr_tensor(crow, cols, vals, (n, m))
            self._AT = torch.sparse_csr_tensor(ccol, rows[order], vals[order], (m, n))

    def coo(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, vals)`` of the kept entries (row-major order), built once."""
        if self._coo is None:
            mask, T = self._mask, self._T
            m = T.shape[1]
            if mask.device.type == "cpu":
                import numpy as np  # numpy's flatnonzero is ~5x faster than torch.nonzero on CPU

                flat = torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
            else:
                flat = mask.reshape(-1).nonzero().squeeze(1)
            self._coo = (flat // m, flat % m, T.reshape(-1)[flat])
        return self._coo

    @property
    def density(self) -> float:
        n, m = self.shape
        return self.nnz / float(n * m)

    def mv(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`T_s y` for ``y [m]``."""
        if self._dense is not None:
            return torch.mv(self._dense, y)
        return torch.mv(self._A, y)

    def rmv(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`T_s^\top x` for ``x [n]``."""
        if self._dense is not None:
            return torch.mv(self._dense.t(), x)
        return torch.mv(self._AT, x)

    def col_sq_sum(self, w: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_i w_i (T_s)_{ij}^2` for ``w [n]``."""
        if self._dense is not None:
            return torch.mv(self._dense.square().t(), w)
        rows, cols, vals = self.coo()
        return torch.zeros(self.shape[1], dtype=w.dtype, device=w.device).index_add_(0, cols, vals * vals * w[rows])

    def hess_mv(self, dx: torch.Tensor, dy: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(K_s + \sigma I)(dx, dy)`."""
        return (self.r + shift) * dx + self.mv(dy), self.rmv(dx) + (self.c + shift) * dy

    def to_dense_hessian(self, shift: float = 0.0) -> torch.Tensor:
        r"""Dense :math:`K_s + \sigma I` of shape ``[n+m, n+m]`` (tests and small problems)."""
        n, m = self.shape
        rows, cols, vals = self.coo()
        Ts = torch.zeros(n, m, dtype=vals.dtype, device=vals.device)
        Ts[rows, cols] = vals
        K = torch.zeros(n + m, n + m, dtype=vals.dtype, device=vals.device)
        K[:n, :n] = torch.diag(self.r)
        K[n:, n:] = torch.diag(self.c)
        K[:n, n:] = Ts
        K[n:, :n] = Ts.t()
        return K + shift * torch.eye(n + m, dtype=K.dtype, device=K.device)


def threshold_safe(T: torch.Tensor, r: torch.Tensor, c: torch.Tensor, delta: float) -> SparseCoupling:
    r"""Keep every entry :math:`T_{ij} \ge \delta / \max(n, m)`.

    Each row and each column then loses at most :math:`\delta` of mass, so the
    sparsification error :math:`E = K - K_s` (off-diagonal only) satisfies
    :math:`\|E\|_2 \le \sqrt{\|E\|_1\|E\|_\infty} \le \delta` (the bound that makes the
    safe Newton method's step a controlled inexact Newton step). One pass, no sorting.
    """
    n, m = T.shape
    return SparseCoupling(T, T >= delta / max(n, m), r, c)


def threshold_density(T: torch.Tensor, r: torch.Tensor, c: torch.Tensor, density: float) -> SparseCoupling:
    r"""SNS rule (Tang et al. 2024, Alg. 1 "Sparsify"): the full Hessian
    :math:`K` (size :math:`(n+m)^2`) keeps a fraction ``density`` :math:`\lambda` of its
    entries: its :math:`n+m` diagonal entries and the
    :math:`k = \lceil(\lambda (n+m)^2 - n - m)/2\rceil` largest entries of :math:`T`
    (each appears twice, in :math:`T` and :math:`T^\top`), plus each row's maximum so
    that no row is left uncoupled."""
    n, m = T.shape
    k = max(1, min(n * m, math.ceil((density * (n + m) ** 2 - n - m) / 2)))
    flat = T.reshape(-1)
    thr = torch.topk(flat, k, sorted=False).values.min()
    mask = T >= thr
    mask |= T >= T.amax(1, keepdim=True)
    return SparseCoupling(T, mask, r, c)


def dense_hessian(T: torch.Tensor) -> torch.Tensor:
    """The exact :math:`K` (dense, ``[n+m, n+m]``)."""
    r, c = T.sum(1), T.sum(0)
    return SparseCoupling(T, T >= 0, r, c).to_dense_hessian(0.0)


class _SingleBlock:
    """A :class:`SparseCoupling` seen as a batch of one by
    :func:`~entrokit.solvers._numerics.solve_bipartite` (its CSR/dense products kept)."""

    def __init__(self, sp: SparseCoupling):
        self.sp = sp
        self.shape = (1, *sp.shape)

    def mv(self, y):
        return self.sp.mv(y[0]).unsqueeze(0)

    def rmv(self, x):
        return self.sp.rmv(x[0]).unsqueeze(0)

    def one_problem(self):
        return self.sp.mv, self.sp.rmv, self.sp.col_sq_sum

    def _sparse(self) -> SparseBlock:
        rows, cols, vals = self.sp.coo()
        return SparseBlock(torch.zeros_like(rows), rows, cols, vals, self.shape)

    def coo(self):
        return self._sparse().coo()

    def weighted_gram(self, w):
        if self.sp._dense is not None:
            return DenseBlock(self.sp._dense.unsqueeze(0)).weighted_gram(w)
        return self._sparse().weighted_gram(w)


def schur_solve(
    sp: SparseCoupling,
    rhs_x: torch.Tensor,
    rhs_y: torch.Tensor,
    shift: float,
    *,
    method: str,
    rtol: float,
    max_iter: int,
    y0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    r"""Solve :math:`(K_s + \sigma I)(d_x, d_y) = (\text{rhs}_x, \text{rhs}_y)` for one
    problem with :func:`~entrokit.solvers._numerics.solve_bipartite` (``method``:
    ``"cg"``, ``"direct"``, ``"dense"`` or ``"auto"``).

    Returns ``(dx, dy, iterations, ok)``; ``ok`` is False when CG stalled (relative
    residual above ``max(rtol, 1e-3)`` after ``max_iter`` iterations) or a value is not
    finite.
    """
    dx, dy, n_iter, ok = solve_bipartite(
        _SingleBlock(sp), sp.r.unsqueeze(0), sp.c.unsqueeze(0), shift, rhs_x.unsqueeze(0), rhs_y.unsqueeze(0),
        method=method, rtol=rtol, max_iter=max_iter, y0=None if y0 is None else y0.unsqueeze(0),
    )
    return dx[0], dy[0], int(n_iter[0]), bool(ok[0])
