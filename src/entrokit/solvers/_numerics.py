r"""Numerical parts shared by the solvers: one of each.

* :func:`armijo_backtracking`: batched Armijo line search with per-problem steps and an
  active mask;
* :func:`pcg`: batched Jacobi-preconditioned conjugate gradient with a per-problem mask
  and per-problem iteration counts;
* :func:`solve_bipartite`: the Schur-complement solve of the shifted bipartite
  Laplacian-like system that every Newton step on an OT dual needs (dense Cholesky,
  SciPy sparse direct, or PCG);
* :func:`continuation_schedule`: the geometric schedule of :math:`\varepsilon`- or
  :math:`\gamma`-continuation.

Every function is batched along the leading axis (``B`` problems), follows the dtype
and device of its inputs and never loops over problems in Python, except the SciPy
back-end (CPU, one factorisation per problem).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "MAX_BACKTRACKS",
    "LineSearchResult",
    "armijo_backtracking",
    "PCGResult",
    "pcg",
    "DenseBlock",
    "SparseBlock",
    "BIPARTITE_METHODS",
    "DENSE_SCHUR_MAX",
    "solve_bipartite",
    "solve_bipartite_cg_one",
    "continuation_schedule",
]

MAX_BACKTRACKS = 40  # halvings: 2^-40 ~ 1e-12 of the trial step


# --------------------------------------------------------------------------------------
# line search
# --------------------------------------------------------------------------------------
@dataclass
class LineSearchResult:
    """``step`` (B,): accepted step (last one tried where none was accepted);
    ``accepted`` (B,): the active problems that found a step; ``value`` (B,) and
    ``state`` (tuple of tensors): the accepted trial, or the current point elsewhere."""

    step: torch.Tensor
    accepted: torch.Tensor
    value: torch.Tensor
    state: tuple


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``mask`` (B,), else ``old``; avoids copies when the mask is uniform."""
    if bool(mask.all()):
        return new
    if not bool(mask.any()):
        return old
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def armijo_backtracking(
    trial: Callable[[torch.Tensor], tuple[torch.Tensor, tuple]],
    value: torch.Tensor,
    slope: torch.Tensor,
    current: Sequence[torch.Tensor],
    active: torch.Tensor,
    *,
    step: torch.Tensor | float = 1.0,
    c1: float = 1e-4,
    max_backtracks: int = MAX_BACKTRACKS,
    rel_slack: float = 0.0,
    also_accept: Callable[[torch.Tensor, tuple], torch.Tensor] | None = None,
) -> LineSearchResult:
    r"""Batched Armijo backtracking for a *minimisation*.

    For each active problem ``k`` the step :math:`t_k \in \{t_0, t_0/2, t_0/4, \dots\}`
    (at most ``max_backtracks`` halvings) is the first with

    .. math::

        F_k(x_k + t_k d_k) \le F_k(x_k) + c_1 t_k \nabla F_k^\top d_k
            + \text{rel\_slack}\,|F_k(x_k)| ,

    where ``slope`` is :math:`\nabla F^\top d < 0` (a descent direction) and the slack
    absorbs rounding near the optimum. A non-finite trial value is never accepted.
    Maximisations pass :math:`-\Phi` and :math:`-\nabla\Phi^\top d`.

    Args:
        trial: ``trial(t) -> (F_t, state_t)`` at steps ``t`` (B,) for the whole batch;
            ``state_t`` is a tuple of tensors with the batch on the leading axis (or one
            problem, ``B = 1``), e.g. the trial point, gradient and plan.
        value: ``F`` at the current point, (B,).
        slope: :math:`\nabla F^\top d`, (B,).
        current: the state at the current point (returned where no step is accepted).
        active: (B,) bool; inactive problems are left untouched.
        step: initial step(s).
        also_accept: optional ``also_accept(F_t, state_t) -> (B,) bool``, an extra
            acceptance rule (e.g. a decrease of the marginal error where differences of
            ``F`` fall below its rounding error).
    """
    if value.numel() == 1 and bool(active.all()):
        return _armijo_one(trial, value, slope, current, step, c1, max_backtracks, rel_slack, also_accept)
    t = torch.as_tensor(step, dtype=value.dtype, device=value.device).expand_as(value).clone()
    todo = active.clone()
    best_value, best_state = value, tuple(current)
    for _ in range(max_backtracks + 1):
        F_t, state_t = trial(t)
        ok = torch.isfinite(F_t) & (F_t <= value + c1 * t * slope + rel_slack * value.abs())
        if also_accept is not None:
            ok = ok | (torch.isfinite(F_t) & also_accept(F_t, state_t))
        take = todo & ok
        if bool(take.any()):
            best_value = _select(take, F_t, best_value)
            best_state = tuple(_select(take, new, old) for new, old in zip(state_t, best_state))
        todo = todo & ~ok
        if not bool(todo.any()):
            break
        t = torch.where(todo, 0.5 * t, t)
    return LineSearchResult(step=t, accepted=active & ~todo, value=best_value, state=best_state)


def _armijo_one(trial, value, slope, current, step, c1, max_backtracks, rel_slack, also_accept) -> LineSearchResult:
    """:func:`armijo_backtracking` for one problem: the same steps and tests on Python
    floats (one sync per trial, no per-problem selects)."""
    F0, s0, t = float(value), float(slope), float(step)
    for _ in range(max_backtracks + 1):
        F_t, state_t = trial(torch.full_like(value, t))
        F = float(F_t)
        ok = math.isfinite(F) and (
            F <= F0 + c1 * t * s0 + rel_slack * abs(F0)
            or (also_accept is not None and bool(also_accept(F_t, state_t).all()))
        )
        if ok:
            return LineSearchResult(
                step=torch.full_like(value, t), accepted=torch.ones_like(value, dtype=torch.bool),
                value=F_t, state=state_t,
            )
        t *= 0.5
    return LineSearchResult(
        step=torch.full_like(value, t), accepted=torch.zeros_like(value, dtype=torch.bool),
        value=value, state=tuple(current),
    )


# --------------------------------------------------------------------------------------
# preconditioned conjugate gradient
# --------------------------------------------------------------------------------------
@dataclass
class PCGResult:
    r"""``x`` (B, d) solution; ``n_iter`` (B,) iterations run per problem;
    ``converged`` (B,) relative residual <= rtol; ``residual`` (B,) final
    :math:`\|b - Ax\|_2/\|b\|_2` (0 for a zero right-hand side)."""

    x: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor


def _bdot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1)


def pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    inv_diag: torch.Tensor,
    *,
    rtol: float,
    max_iter: int,
    x0: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> PCGResult:
    r"""Batched Jacobi-preconditioned CG for :math:`A_k x_k = b_k`, :math:`A_k` SPD (or
    PSD with :math:`b_k` in its range).

    Iteration (Saad, *Iterative Methods*, Alg. 9.1, with :math:`M = \mathrm{diag}(A)`):
    :math:`\alpha = r^\top z / p^\top A p`, :math:`x \mathrel{+}= \alpha p`,
    :math:`r \mathrel{-}= \alpha A p`, :math:`z = M^{-1} r`,
    :math:`p = z + (r_+^\top z_+ / r^\top z)\, p`. Each problem stops on its own once
    :math:`\|r_k\|_2 \le \text{rtol}\,\|b_k\|_2`, on a breakdown
    (:math:`p^\top A p \le 0`) or a non-finite residual (then ``converged`` is False);
    its iterate is frozen from then on and its count ``n_iter[k]`` stops. One device
    sync per iteration. A single problem (``B = 1``) runs on 1-D vectors and stops on
    its residual alone: the recurrence keeps :math:`r = b - Ax` whatever the sign of
    :math:`p^\top A p`, so ``converged`` stays exact; a zero curvature stops it before the
    step (``converged`` False, the last finite iterate returned).

    Args:
        matvec: ``A x`` for ``x`` (B, d).
        rhs: ``b`` (B, d).
        inv_diag: the Jacobi preconditioner :math:`M^{-1}`, (B, d) or broadcastable.
        rtol: relative residual tolerance.
        max_iter: iteration cap.
        x0: optional warm start (B, d).
        active: optional (B,) mask; inactive problems return ``x0`` (or 0), 0 iterations.
    """
    B = rhs.shape[0]
    if B == 1 and (active is None or bool(active.all())):
        x, n_iter, converged, rel = _pcg_one(
            lambda v: matvec(v.unsqueeze(0))[0], rhs[0], inv_diag.expand_as(rhs)[0], rtol, max_iter,
            None if x0 is None else x0[0],
        )
        dev = rhs.device
        return PCGResult(
            x=x.unsqueeze(0), n_iter=torch.tensor([n_iter], device=dev),
            converged=torch.tensor([converged], device=dev), residual=torch.tensor([rel], dtype=rhs.dtype, device=dev),
        )
    if x0 is None:
        x = torch.zeros_like(rhs)
        res = rhs.clone()
    else:
        x = x0.clone()
        res = rhs - matvec(x)
    bnorm = rhs.norm(dim=-1)
    tiny = torch.finfo(rhs.dtype).tiny
    rel = res.norm(dim=-1) / bnorm.clamp_min(tiny)
    run = rel > rtol
    if active is not None:
        run = run & active
    n_iter = torch.zeros(B, dtype=torch.long, device=rhs.device)
    failed = torch.zeros(B, dtype=torch.bool, device=rhs.device)
    z = inv_diag * res
    p = z.clone()
    rz = _bdot(res, z)
    masked = B > 1  # one problem stops the loop itself: no per-problem selects needed
    for _ in range(max_iter):
        if not bool(run.any()):
            break
        Ap = matvec(p)
        pAp = _bdot(p, Ap)
        positive = pAp > 0
        alpha = rz / torch.where(positive, pAp, torch.ones_like(pAp))
        if masked:
            step = (run & positive).unsqueeze(-1)
            x = torch.where(step, x + alpha.unsqueeze(-1) * p, x)
            res = torch.where(step, res - alpha.unsqueeze(-1) * Ap, res)
        else:
            x = x + alpha.unsqueeze(-1) * p
            res = res - alpha.unsqueeze(-1) * Ap
        n_iter += run.long()
        rel_new = res.norm(dim=-1) / bnorm.clamp_min(tiny)
        rel = torch.where(run, rel_new, rel) if masked else rel_new
        finite = torch.isfinite(rel)
        failed |= run & ~finite
        run = run & (rel > rtol) & finite & positive
        z = inv_diag * res
        rz_new = _bdot(res, z)
        beta = rz_new / torch.where(rz != 0, rz, torch.ones_like(rz))
        if masked:
            p = torch.where(run.unsqueeze(-1), z + beta.unsqueeze(-1) * p, p)
        else:
            p = z + beta.unsqueeze(-1) * p
        rz = rz_new
    converged = (rel <= rtol) & ~failed
    return PCGResult(x=x, n_iter=n_iter, converged=converged, residual=rel)


def _pcg_one(matvec, b, inv_diag, rtol, max_iter, x0) -> tuple[torch.Tensor, int, bool, float]:
    """:func:`pcg` for a single problem on 1-D vectors (``matvec``: ``(d,) -> (d,)``): the
    same iteration with one device sync per iteration and no per-problem selects (tiny
    vectors are dominated by op overhead). A zero or non-finite curvature :math:`p^\top A p`
    stops it before the step, with the last finite iterate (as the batched loop freezes it).
    Returns ``(x, n_iter, converged, residual)``."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    res = b.clone() if x0 is None else b - matvec(x)
    bnorm = float(b.norm())
    scale = bnorm if bnorm > 0 else torch.finfo(b.dtype).tiny
    rel = float(res.norm()) / scale
    n_iter, failed = 0, False
    if rel > rtol:
        z = inv_diag * res
        p = z.clone()
        rz = torch.dot(res, z)
        for _ in range(max_iter):
            n_iter += 1
            Ap = matvec(p)
            pAp = torch.dot(p, Ap)
            if not (pAp != 0 and torch.isfinite(pAp)):  # a zero curvature: stop before the step poisons x
                failed = True
                break
            alpha = rz / pAp
            x.add_(p * alpha)  # x and res are this function's own buffers
            res.sub_(Ap * alpha)
            # res = b - A x holds whatever the sign of p^T A p, so the residual test alone
            # is honest
            rel = float(torch.linalg.vector_norm(res)) / scale
            if not math.isfinite(rel):
                failed = True
                break
            if rel <= rtol:
                break
            z = inv_diag * res
            rz_new = torch.dot(res, z)
            p = z + (rz_new / rz) * p
            rz = rz_new
    return x, n_iter, rel <= rtol and not failed, rel


# --------------------------------------------------------------------------------------
# bipartite Schur-complement solver
# --------------------------------------------------------------------------------------
class DenseBlock:
    """The coupling block :math:`W` as a dense ``(B, n, m)`` tensor."""

    def __init__(self, W: torch.Tensor):
        self.W = W
        self.shape = tuple(W.shape)

    def mv(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`W y`, ``y`` (B, m) -> (B, n)."""
        return torch.bmm(self.W, y.unsqueeze(-1)).squeeze(-1)

    def rmv(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`W^\\top x`, ``x`` (B, n) -> (B, m)."""
        return torch.bmm(x.unsqueeze(-2), self.W).squeeze(-2)

    def one_problem(self):
        """``(mv, rmv, col_sq_sum)`` of the first problem on 1-D vectors (the
        single-problem CG)."""
        W = self.W[0]
        return (lambda y: torch.mv(W, y)), (lambda x: torch.mv(W.t(), x)), (lambda w: torch.mv(W.square().t(), w))

    def coo(self):
        batch, rows, cols = (self.W != 0).nonzero(as_tuple=True)
        return batch, rows, cols, self.W[batch, rows, cols]

    def weighted_gram(self, w: torch.Tensor) -> torch.Tensor:
        """:math:`W^\\top \\mathrm{diag}(w) W`, (B, m, m)."""
        return torch.bmm(self.W.mT, w.unsqueeze(-1) * self.W)

    def col_sq_sum(self, w: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_i w_i W_{ij}^2`, (B, m)."""
        return torch.bmm(w.unsqueeze(-2), self.W * self.W).squeeze(-2)


class SparseBlock:
    """The coupling block :math:`W` in batched COO form: entry ``e`` is
    ``W[batch[e], rows[e], cols[e]] = vals[e]`` (no duplicates); ``shape = (B, n, m)``.
    Products are gathers and ``index_add_`` (any device)."""

    def __init__(self, batch, rows, cols, vals, shape):
        self.batch, self.rows, self.cols, self.vals = batch, rows, cols, vals
        self.shape = tuple(shape)
        B, n, m = self.shape
        self._row_key = batch * n + rows
        self._col_key = batch * m + cols

    def mv(self, y: torch.Tensor) -> torch.Tensor:
        B, n, m = self.shape
        out = torch.zeros(B * n, dtype=y.dtype, device=y.device)
        out.index_add_(0, self._row_key, self.vals * y.reshape(-1)[self._col_key])
        return out.reshape(B, n)

    def rmv(self, x: torch.Tensor) -> torch.Tensor:
        B, n, m = self.shape
        out = torch.zeros(B * m, dtype=x.dtype, device=x.device)
        out.index_add_(0, self._col_key, self.vals * x.reshape(-1)[self._row_key])
        return out.reshape(B, m)

    def one_problem(self):
        """``(mv, rmv, col_sq_sum)`` of a batch of one on 1-D vectors (the single-problem
        CG)."""
        B, n, m = self.shape
        rows, cols, vals = self.rows, self.cols, self.vals

        def mv(y):
            return torch.zeros(n, dtype=y.dtype, device=y.device).index_add_(0, rows, vals * y[cols])

        def rmv(x):
            return torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, cols, vals * x[rows])

        def col_sq_sum(w):
            return torch.zeros(m, dtype=w.dtype, device=w.device).index_add_(0, cols, vals * vals * w[rows])

        return mv, rmv, col_sq_sum

    def coo(self):
        return self.batch, self.rows, self.cols, self.vals

    def weighted_gram(self, w: torch.Tensor) -> torch.Tensor:
        r""":math:`W^\top\mathrm{diag}(w)W` accumulated from the pairs of entries that
        share a row: :math:`O(\sum_i |w_i|^2)` work instead of :math:`O(nm^2)`."""
        B, n, m = self.shape
        key, order = torch.sort(self._row_key, stable=True)
        cols, vals = self.cols[order], self.vals[order]
        count = torch.bincount(key, minlength=B * n)  # entries per (problem, row)
        c_e = count[key]
        start = torch.cumsum(count, 0) - count
        left = torch.repeat_interleave(cols, c_e)
        left_val = torch.repeat_interleave(vals, c_e)
        base = torch.repeat_interleave(start[key], c_e)
        offset = torch.arange(left.shape[0], device=key.device) - torch.repeat_interleave(
            torch.cumsum(c_e, 0) - c_e, c_e
        )
        right = cols[base + offset]
        right_val = vals[base + offset]
        pair_row = torch.repeat_interleave(key, c_e)
        G = torch.zeros(B, m, m, dtype=vals.dtype, device=vals.device)
        G.index_put_((pair_row // n, left, right), left_val * right_val * w.reshape(-1)[pair_row], accumulate=True)
        return G

    def col_sq_sum(self, w: torch.Tensor) -> torch.Tensor:
        B, n, m = self.shape
        out = torch.zeros(B * m, dtype=w.dtype, device=w.device)
        out.index_add_(0, self._col_key, self.vals * self.vals * w.reshape(-1)[self._row_key])
        return out.reshape(B, m)


BIPARTITE_METHODS = ("auto", "dense", "direct", "cg")
DENSE_SCHUR_MAX = 512  # columns up to which "auto" factorises the Schur complement densely
DENSE_BLOCK_MAX = 64  # the same for a dense coupling block (assembly costs n m^2)


def _as_batch(s, like: torch.Tensor) -> torch.Tensor:
    """A shift given as a float or (B,) tensor, as (B, 1)."""
    return torch.as_tensor(s, dtype=like.dtype, device=like.device).reshape(-1, 1).expand(like.shape[0], 1)


def _schur_scipy(block, diag_rows, diag_cols, rhs):
    """Sparse direct solve of the Schur system, one SuperLU factorisation per problem."""
    import numpy as np
    import scipy.sparse as sps
    from scipy.sparse.linalg import splu

    B, n, m = block.shape
    batch, rows, cols, vals = (t.detach().cpu().numpy() for t in block.coo())
    dr = diag_rows.detach().cpu().numpy()
    dc = diag_cols.detach().cpu().numpy()
    rhs_np = rhs.detach().cpu().numpy()
    out = np.empty_like(rhs_np)
    for k in range(B):
        sel = batch == k
        W = sps.csr_matrix((vals[sel], (rows[sel], cols[sel])), shape=(n, m))
        S = (sps.diags(dc[k]) - W.T @ sps.diags(1.0 / dr[k]) @ W).tocsc()
        lu = splu(S, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        out[k] = lu.solve(rhs_np[k])
    return torch.from_numpy(out).to(dtype=rhs.dtype, device=rhs.device)


def solve_bipartite(
    block: DenseBlock | SparseBlock,
    r: torch.Tensor,
    c: torch.Tensor,
    shift,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    method: str = "auto",
    rtol: float = 1e-10,
    max_iter: int | None = None,
    y0: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Solve the shifted bipartite system (batched)

    .. math::

        \begin{pmatrix}\mathrm{diag}(r) + s & W\\ W^\top & \mathrm{diag}(c) + s\end{pmatrix}
        \begin{pmatrix}x\\ y\end{pmatrix} = \begin{pmatrix}p\\ q\end{pmatrix}

    by eliminating the row block (:math:`D_r = \mathrm{diag}(r) + s > 0`): the Schur
    complement on the columns

    .. math::

        S = \mathrm{diag}(c) + s - W^\top D_r^{-1} W,\qquad
        S\,y = q - W^\top D_r^{-1} p,\qquad x = D_r^{-1}(p - W y).

    :math:`S` is SPD whenever the full matrix is (e.g. :math:`W \ge 0` with
    :math:`r \ge W\mathbf 1`, :math:`c \ge W^\top\mathbf 1` and :math:`s > 0`: the Hessian
    of an entropic or quadratic OT dual plus a shift).

    Args:
        block: :math:`W`, a :class:`DenseBlock` or :class:`SparseBlock` of shape (B, n, m).
        r, c: diagonals (B, n), (B, m).
        shift: :math:`s`, a float or (B,) tensor.
        p, q: right-hand sides (B, n), (B, m).
        method: ``"dense"`` (Cholesky of :math:`S` assembled densely, LU if Cholesky
            fails; any device), ``"direct"`` (SciPy SuperLU, CPU), ``"cg"`` (matrix-free
            Jacobi-PCG on :math:`S`, any device) or ``"auto"``: dense for
            :math:`m \le 512` (:math:`m \le 64` for a :class:`DenseBlock`, whose assembly
            costs :math:`nm^2`), above that direct for a sparse block on CPU, CG otherwise.
        rtol, max_iter, y0, active: PCG options (``max_iter`` default
            :math:`\max(200, m)`); ``active`` masks problems for every back-end.

    Returns:
        ``(x, y, n_iter, ok)``: ``n_iter`` (B,) CG iterations (1 for a direct
        factorisation), ``ok`` (B,) finite solution (and, for CG, relative residual
        :math:`\le \max(\text{rtol}, 10^{-3})`); masked problems get ``y = 0`` and
        ``ok = True``.
    """
    B, n, m = block.shape
    if method == "cg" and B == 1 and active is None:  # one problem: 1-D vectors throughout
        s0 = float(shift.reshape(-1)[0]) if torch.is_tensor(shift) else float(shift)
        x, y, it, ok = solve_bipartite_cg_one(
            *block.one_problem(), r[0], c[0], s0, p[0], q[0], rtol=rtol,
            max_iter=max_iter or max(200, m), y0=None if y0 is None else y0[0],
        )
        return x[None], y[None], torch.tensor([it], device=p.device), torch.tensor([ok], device=p.device)
    if method == "auto":
        method = _auto_method(block, m, p.device)
    if method not in BIPARTITE_METHODS:
        raise ValueError(f"unknown bipartite solver {method!r}; expected one of {BIPARTITE_METHODS}")
    s = _as_batch(shift, p)
    diag_rows = r + s
    diag_cols = c + s
    rhs = q - block.rmv(p / diag_rows)
    if method == "cg":
        y, n_iter, ok = _schur_cg(block, diag_rows, diag_cols, s, rhs, rtol, max_iter or max(200, m), y0, active)
    else:
        y = _schur_dense(block, diag_rows, diag_cols, rhs) if method == "dense" else _schur_scipy(
            block, diag_rows, diag_cols, rhs)
        n_iter = torch.ones(B, dtype=torch.long, device=p.device)
        ok = torch.isfinite(y).all(-1)
        if active is not None:
            y = torch.where(active.unsqueeze(-1), y, torch.zeros_like(y))
    x = (p - block.mv(y)) / diag_rows
    ok = ok & torch.isfinite(x).all(-1)
    if active is not None:
        ok = ok | ~active  # nothing to solve
    return x, y, n_iter, ok


def _auto_method(block, m: int, device: torch.device) -> str:
    r"""``"auto"`` of :func:`solve_bipartite`: assembling ``S`` costs
    :math:`\sum_i |w_i|^2` (sparse) but :math:`n m^2` (dense), so a dense block is only
    worth factorising when small; CG costs O(nnz) per iteration."""
    sparse = isinstance(block, SparseBlock)
    if m <= (DENSE_SCHUR_MAX if sparse else DENSE_BLOCK_MAX):
        return "dense"
    return "direct" if sparse and device.type == "cpu" else "cg"


def _schur_dense(block, diag_rows, diag_cols, rhs) -> torch.Tensor:
    """Cholesky of the Schur complement assembled densely (LU if it is numerically
    indefinite)."""
    S = torch.diag_embed(diag_cols) - block.weighted_gram(1.0 / diag_rows)
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):
        return torch.linalg.solve(S, rhs)
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def _schur_cg(block, diag_rows, diag_cols, s, rhs, rtol: float, max_iter: int, y0, active):
    """Matrix-free Jacobi-PCG on the Schur complement: ``(y, n_iter, ok)``."""
    diag_S = diag_cols - block.col_sq_sum(1.0 / diag_rows)
    floor = torch.where(s > 0, s, torch.full_like(s, torch.finfo(rhs.dtype).tiny))
    inv_diag = 1.0 / torch.maximum(diag_S, floor)

    def schur_mv(v):
        return diag_cols * v - block.rmv(block.mv(v) / diag_rows)

    out = pcg(schur_mv, rhs, inv_diag, rtol=rtol, max_iter=max_iter, x0=y0, active=active)
    return out.x, out.n_iter, torch.isfinite(out.x).all(-1) & (out.residual <= max(rtol, 1e-3))


def solve_bipartite_cg_one(mv, rmv, col_sq_sum, r, c, shift: float, p, q, *, rtol: float, max_iter: int, y0=None):
    """The CG back-end of :func:`solve_bipartite` for one problem on 1-D vectors: ``mv``
    (:math:`Wy`), ``rmv`` (:math:`W^\top x`) and ``col_sq_sum``
    (:math:`\\sum_i w_i W_{ij}^2`) act on ``(n,)``/``(m,)`` tensors, ``shift`` is a float.
    Returns ``(x, y, n_iter, ok)`` with Python ``n_iter`` and ``ok``."""
    diag_rows, diag_cols = r + shift, c + shift
    rhs = q - rmv(p / diag_rows)
    floor = shift if shift > 0 else torch.finfo(p.dtype).tiny
    inv_diag = (diag_cols - col_sq_sum(1.0 / diag_rows)).clamp_min_(floor).reciprocal_()
    y, n_iter, _, rel = _pcg_one(lambda v: diag_cols * v - rmv(mv(v) / diag_rows), rhs, inv_diag, rtol, max_iter, y0)
    x = (p - mv(y)) / diag_rows
    ok = math.isfinite(rel) and rel <= max(rtol, 1e-3) and bool(torch.isfinite(x).all() & torch.isfinite(y).all())
    return x, y, n_iter, ok


# --------------------------------------------------------------------------------------
# continuation
# --------------------------------------------------------------------------------------
def continuation_schedule(target: float, start: float, decay: float, *, even: bool = False) -> list[float]:
    r"""Decreasing geometric stages from ``start`` ending exactly at ``target``.

    ``even=False`` (Sinkhorn's :math:`\varepsilon`-scaling rule, fewest stages):
    :math:`\varepsilon_k = \text{start}\cdot\text{decay}^k` for the :math:`k \ge 0` with
    :math:`\varepsilon_k\cdot\text{decay} > \text{target}`, then ``target``; no stage lies
    within a factor ``1/decay`` of the target, so the last jump is by a factor in
    :math:`(1/\text{decay}, 1/\text{decay}^2]`. A start within a factor ``1/decay`` of the
    target gives ``[target]``.

    ``even=True`` (every jump bounded, for Newton, whose quadratic model degrades with the
    jump): with :math:`K = \lceil\log(\text{start}/\text{target})/\log(1/\text{decay})
    \rceil`, :math:`\varepsilon_k = \text{start}\,\rho^k` for :math:`k = 0..K` and
    :math:`\rho = (\text{target}/\text{start})^{1/K} \ge \text{decay}`: equal jumps, each by
    at most ``1/decay``; ``[target]`` when :math:`K \le 1`.

    Used for :math:`\varepsilon`-scaling (Sinkhorn, Newton) and :math:`\gamma`-continuation
    (smooth OT).
    """
    if not (0.0 < decay < 1.0):
        raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
    target, start = float(target), float(start)
    if not (start > target > 0.0) or not math.isfinite(start):
        return [target]
    if not even:
        out = []
        e = start
        while e * decay > target:
            out.append(e)
            e *= decay
        return out + [target]
    n_jumps = math.ceil(math.log(start / target) / math.log(1.0 / decay) - 1e-9)
    if n_jumps <= 1:
        return [target]
    ratio = (target / start) ** (1.0 / n_jumps)
    return [start * ratio**k for k in range(n_jumps)] + [target]


_HUGE_PAGE = 1 << 21  # the x86-64 / arm64 transparent huge page
_madvise = None  # libc's madvise, looked up on first use (False where unavailable)
_POOL_MAX = 1 << 25  # bytes: the largest CPU work buffer kept for the next solve
_pool: list[torch.Tensor] = []  # at most one released CPU work buffer (flat)


def large_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like``: the buffer the last solve released
    (:func:`release_buffer`) where it is large enough, else fresh memory, which on Linux
    CPUs is backed by transparent huge pages from 4 MiB on where the kernel allows them
    (``madvise``).

    A solver's ``n x m`` work buffer is fresh memory: first touching it costs one page
    fault per 4 KiB page (about 60 ms of CPU for 128 MiB, more than a Sinkhorn iteration
    at n = 4000; 1 ms for the 2 MiB of n = 500, as long as a whole 5-iteration solve of
    that size), and its mat-vecs miss the TLB on every page. With 2 MiB pages both
    shrink (measured: 60 -> 15 ms to touch 128 MiB, 9.7 -> 6.2 ms per mat-vec); a reused
    buffer costs nothing. Advice only: where it is refused, ordinary pages are used.
    """
    global _madvise
    if like.device.type == "cpu":
        try:
            buf = _pool.pop()  # atomic: concurrent solves never share a buffer
        except IndexError:
            buf = None
        if buf is not None and buf.dtype == like.dtype and buf.numel() >= like.numel():
            return buf[: like.numel()].view(like.shape)
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < 2 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return out
    if _madvise is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise(start, end - start, 14)  # MADV_HUGEPAGE; a refusal leaves ordinary pages
    return out


def release_buffer(buf: torch.Tensor | None) -> None:
    """Keep a CPU work buffer of :func:`large_buffer` (up to 32 MiB) for the next solve, in
    place of the one kept before (a CPU analogue of torch's caching GPU allocator, one
    slot: at most 32 MiB stay allocated between solves). The caller drops its references."""
    if buf is None or buf.device.type != "cpu" or not buf.is_contiguous():
        return
    if buf.numel() * buf.element_size() <= _POOL_MAX:
        _pool[:] = [buf.reshape(-1)]
