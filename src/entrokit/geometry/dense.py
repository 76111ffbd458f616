r"""A cost given as a dense matrix, and the stabilized-kernel engine that runs on it.

The engine keeps the potentials in the log domain and *absorbs* them into a kernel
:math:`K_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}` (Schmitzer, 2019); between
absorptions Sinkhorn's updates are the scalings :math:`u \leftarrow 1/(K (b\odot v))`,
:math:`v \leftarrow 1/(K^\top (a\odot u))`: two matrix-vector products per iteration,
two passes over :math:`nm` numbers, the memory-bandwidth bound. One ``(B, n, m)`` buffer
holds the kernel for the whole solve.
"""

from __future__ import annotations

import math

import torch

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor
from entrokit.geometry._online import tile_entries
from entrokit.geometry.base import Geometry, exp_floor, logsumexp_pair, plan_block

__all__ = ["DenseCost"]

_NUMPY_MAX = 1 << 22  # kernel entries up to which the CPU loop runs on NumPy views (_run_single)
_LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x log2 e): torch's exp2 is the faster kernel on CPU


class DenseCost(Geometry):
    """A cost given as a dense matrix ``(..., n, m)`` (any number of batch axes)."""

    def __init__(self, cost: torch.Tensor):
        cost = as_float_tensor(cost, "cost")
        if cost.dim() < 2:
            raise InputError(
                f"cost must have shape (n, m) or (..., n, m), got shape {tuple(cost.shape)}; "
                "a single row is cost.reshape(1, m)."
            )
        self.C = cost

    def __repr__(self) -> str:
        return f"DenseCost(shape={tuple(self.C.shape)}, dtype={self.C.dtype}, device={self.C.device})"

    def _with_cached_bounds(self, out: DenseCost, batch_shape=None) -> DenseCost:
        cached = self.__dict__.get("_bounds")
        if cached is not None:
            lo, hi = cached
            if batch_shape is not None:
                lo, hi = lo.reshape(batch_shape), hi.reshape(batch_shape)
            out.__dict__["_bounds"] = (lo, hi)
        return out

    def reshape_batch(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return self._with_cached_bounds(DenseCost(self.C.reshape(*batch_shape, *self.shape)), batch_shape)

    def detach(self) -> DenseCost:
        return self._with_cached_bounds(DenseCost(self.C.detach()))

    def tensors(self):
        return (self.C,)

    def rebuild(self, C):
        return DenseCost(C)

    def cost_matrix(self) -> torch.Tensor:
        return self.C

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min C, max C) per problem in one pass (cached; NaN propagates)."""
        cached = self.__dict__.get("_bounds")
        if cached is None:
            flat = self.C.detach().flatten(-2)
            cached = (flat.amin(-1), flat.amax(-1))  # faster than aminmax on CPU
            self.__dict__["_bounds"] = cached
        return cached

    def lse(self, h, log_w, eps, axis):
        # z = (h + eps log w - C) / eps in one pass over C; without a graph in base 2
        # (z log2 e: torch.exp2 is 2-3x faster than torch.exp on CPU)
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in (h, log_w, self.C))
        scale = 1.0 if graph else _LOG2E
        hw = (h / eps + log_w) * scale if scale != 1.0 else h / eps + log_w
        z = torch.add(hw.unsqueeze(-2) if axis == 1 else hw.unsqueeze(-1), self.C, alpha=-scale / eps)
        return logsumexp_pair(z, dim=-1 if axis == 1 else -2, overwrite=True, base2=not graph)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        C = self.C
        P = plan_block(f, g, a, b, C, eps)
        if round_to is not None:
            P = P.to(round_to)
        if accumulate is not None and accumulate != P.dtype:
            P, C = P.to(accumulate), C.to(accumulate)
        return P.sum(-1), P.sum(-2), (P * C).sum((-2, -1))

    # the products below form the plan through self.plan, so a subclass that stores the
    # cost differently (e.g. attention logits) only redefines plan()
    def marginals(self, f, g, a, b, eps):
        P = self.plan(f, g, a, b, eps)
        return P.sum(-1), P.sum(-2)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        return _apply(self.plan(f, g, a, b, eps), vec, axis)

    def plan_operator(self, f, g, a, b, eps):
        P = self.plan(f, g, a, b, eps)

        def Pv(v):
            return _apply(P, v, 1)

        def PTu(u):
            return _apply(P, u, 0)

        return Pv, PTu, P.sum(-1), P.sum(-2)

    def scaling_engine(self, a, b, log_a, log_b):
        return _KernelEngine(self, a, b, log_a, log_b)


def _apply(P: torch.Tensor, vec: torch.Tensor, axis: int) -> torch.Tensor:
    """``P @ vec`` (axis 1) or ``P.T @ vec`` (axis 0); ``vec`` is ``(B, m)`` or carries a
    trailing axis of several vectors ``(B, m, k)``."""
    several = vec.dim() == P.dim()
    V = vec if several else vec.unsqueeze(-1)
    # as (V^T P^T)^T: the same sums, 1.3-12x faster than the batched P @ V on CPU (one
    # thread; 8 x 500 x 400: 1.8 ms against 0.15 ms)
    out = torch.matmul(V.mT, P.mT if axis == 1 else P).mT
    return out.contiguous() if several else out.squeeze(-1)


def _softmin_inplace(C, h, log_w, eps, axis, out):
    """Soft c-transform computed on the workspace ``out`` (no ``n x m`` temporaries)."""
    hw = h + eps * log_w
    dim = -1 if axis == 1 else -2
    torch.sub(hw.unsqueeze(-2) if axis == 1 else hw.unsqueeze(-1), C, out=out)
    out.div_(eps)
    mx = out.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    out.sub_(mx).clamp_(min=exp_floor(out.dtype)).exp_()
    lse = out.sum(dim=dim).log_() + mx.squeeze(dim)
    return -eps * lse


def _masked_min(X: torch.Tensor, log_w: torch.Tensor, dim: int) -> torch.Tensor:
    """min of X along ``dim`` over entries of positive weight (the hard c-transform)."""
    if bool((log_w > -float("inf")).all()):
        return X.amin(dim=dim)
    big = torch.finfo(X.dtype).max
    pen = torch.where(log_w > -float("inf"), torch.zeros_like(log_w), torch.full_like(log_w, big))
    return (X + (pen.unsqueeze(-2) if dim == -1 else pen.unsqueeze(-1))).amin(dim=dim)


def _block_rows(batch: int, m: int) -> int:
    """Rows per block of a blocked pass: about 1 MiB of float64 (a block stays in cache
    between the operations applied to it)."""
    return max(1, (1 << 17) // max(1, batch * m))


def _weighted_sum(K: torch.Tensor, C: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{ij} x_i K_{ij} C_{ij} y_j` per problem, reading ``K`` and ``C`` once by
    row blocks. ``K`` is overwritten (its blocks hold :math:`K \odot C`): the caller's last
    use of it, so no ``n x m`` work buffer is allocated (fresh memory costs a page fault
    per 4 KiB)."""
    B, n, m = K.shape
    step = _block_rows(B, m)
    out = torch.zeros(B, dtype=K.dtype, device=K.device)
    for s in range(0, n, step):
        blk = K[:, s:s + step].mul_(C[:, s:s + step])
        out += (x[:, s:s + step] * torch.bmm(blk, y.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return out


class _KernelEngine:
    """Scaling updates on an absorbed kernel: two mat-vecs per iteration.

    Interface shared with the log-sum-exp engine of :mod:`entrokit.solvers.sinkhorn`:
    ``start``, ``run``, ``check``, ``absorb``, ``potentials``, ``save``/``restore``,
    ``reduce``.
    """

    def __init__(self, geom: DenseCost, a, b, log_a, log_b):
        self.C = geom.C
        self.a, self.b, self.log_a, self.log_b = a, b, log_a, log_b
        self.absorb_at = 30.0 if self.C.dtype == torch.float64 else 10.0
        self.single = self.C.shape[0] == 1
        from entrokit.solvers._numerics import large_buffer

        self.K = large_buffer(self.C)
        self._work = None
        self._final = None  # (row, col) sums of the plan at an early stop of _run_single
        self._ktu_valid = False  # whether the work buffer KTu holds K^T (a u) for the current u
        # whether the plan's columns are exact (the state after a column update): only then is
        # the row error a u K(b v) - a the plan's whole marginal error
        self._cols_exact = False

    def start(self, f, g, eps, sweep: bool = True, cold: bool = False):
        self.eps = eps
        if not sweep:
            self._absorb(f, g)  # a warm start: its columns are not exact
            # the warm kernel is safe unless a row or column lost all its mass
            r, c = self._Kv(self.b), self._KTu(self.a)
            ok = torch.isfinite(r).all() & torch.isfinite(c).all() & (r > 0).all() & (c > 0).all()
            if bool(ok):
                return
        if cold and self._fused_start(eps):
            return
        if cold:
            # hard c-transforms (the eps -> 0 limit): every row and column of the kernel
            # then holds an entry equal to 1, so none underflows, at any eps
            f = _masked_min(self.C, self.log_b, dim=-1)
            torch.sub(self.C, f.unsqueeze(-1), out=self.K)
            g = _masked_min(self.K, self.log_a, dim=-2)
        else:
            # one exact log-domain sweep puts the kernel's row/column sums near 1
            f = _softmin_inplace(self.C, g, self.log_b, eps, 1, self.K)
            g = _softmin_inplace(self.C, f, self.log_a, eps, 0, self.K)
        self._absorb(f, g)
        self._cols_exact = not cold  # g is the soft c-transform of f (the hard one when cold)

    def _fused_start(self, eps) -> bool:
        r"""The cold start in one blocked pass over ``C`` (Schmitzer, 2019, Sec. 3.2 start).

        Row by row block (a block stays in cache): :math:`f_i = \min_j C_{ij}`, the kernel
        :math:`K_{ij} = e^{(f_i - C_{ij})/\varepsilon}` (every row holds a 1, so no row
        underflows) and its weighted column sums :math:`(K^\top a)_j`. The start is then
        ``u = 1`` and the column update :math:`v = 1/(K^\top a)`: ``g`` is the exact soft
        c-transform of ``f`` (half a Sinkhorn iteration, read from the blocks in cache).
        The start reads ``C`` once and writes ``K`` once; the exponential is taken in base
        2 with the scale folded into the one affine pass (``torch.exp2`` is about twice as
        fast as ``torch.exp`` on CPU). Entries floored at ``exp(floor)`` stand for values
        below it, negligible while :math:`\max |\log v|` is under the absorption
        threshold plus :math:`\log(1/\min a)`; above it (a column far from every row
        minimum) or with zero weights, returns False and the caller runs the two-pass start.
        """
        if not (bool((self.log_a > -math.inf).all()) and bool((self.log_b > -math.inf).all())):
            return False
        C, K = self.C, self.K
        B, n, m = C.shape
        d = torch.float64
        same = C.dtype == d
        s = _LOG2E / eps  # e^{x/eps} = 2^{x s}
        floor = exp_floor(K.dtype) * _LOG2E
        f = torch.empty((B, n), dtype=d, device=C.device)
        col = torch.zeros((B, 1, m), dtype=d, device=C.device)
        a = self.a.to(d).unsqueeze(-2)
        step = _block_rows(B, m)
        for r0 in range(0, n, step):
            # float32 costs: the exponent is formed in float64 (as in _absorb)
            Cb = C[:, r0:r0 + step] if same else C[:, r0:r0 + step].to(d)
            fb = Cb.amin(-1)
            f[:, r0:r0 + step] = fb
            Kb = K[:, r0:r0 + step] if same else torch.empty_like(Cb)
            torch.add((fb * s).unsqueeze(-1), Cb, alpha=-s, out=Kb)  # (f - C) s <= 0
            Kb.clamp_(min=floor).exp2_()
            col.baddbmm_(a[:, :, r0:r0 + step], Kb)
            if not same:
                K[:, r0:r0 + step] = Kb
        v = col.squeeze(-2).reciprocal()
        # log v_j <= g_j/eps + log(1/a_i) for the hard c-transform g: the two-pass start's
        # bound on g/eps, widened by the weights' scale
        lv, la = torch.stack([v.log().abs().max(), -self.a.min().log()]).tolist()
        if not lv <= self.absorb_at + max(la, 0.0):  # also NaN / inf: an empty column
            return False
        self.eps = eps
        self.f, self.g = f, torch.zeros((B, m), dtype=d, device=C.device)  # absorbed (float64)
        dt = K.dtype
        self.u = torch.ones((B, n), dtype=dt, device=K.device)
        self.v = v.to(dt)
        self.K0 = K[0] if self.single else None
        self._final = None
        self._ktu_valid = False
        self._cols_exact = True  # v = 1 / K^T a: a column update
        if self.single:
            # the column sums K^T(a u) of u = 1 are those of the current scalings
            self._work_buffers()[3].copy_(col[0, 0])
            self._ktu_valid = True
        return True

    def reduce(self):
        """Row sums, column sums and <C, P> of the current plan ``diag(au) K diag(bv)``.

        Called once at the end of a solve. When the last iteration stopped on its own
        test, its row sums ``a u (K b v)`` and column sums ``b v (K^T a u)`` are the
        plan's (no extra pass); ``<C, P>`` is one blocked pass that reads ``K`` and ``C``
        once, without an ``n x m`` temporary. The kernel buffer is released.
        """
        if self.K.dtype != torch.float64:
            # only a float64 solve certifies from its own sums (solvers._entropic); a
            # float32 plan is certified from float64 potentials, so skip the passes here
            self._release()
            return None
        au, bv = self.a * self.u, self.b * self.v
        if self._final is not None:
            row, col = self._final
        else:
            row = au * self._Kv(bv)
            col = bv * self._KTu(au)
        tc = _weighted_sum(self.K, self.C, au, bv)  # overwrites K: released below
        self._release()
        return row, col, tc

    def _release(self):
        """Hand the kernel buffer back (:func:`~entrokit.solvers._numerics.release_buffer`)."""
        from entrokit.solvers._numerics import release_buffer

        release_buffer(self.K)
        self.K = self.K0 = None
        self._final = None

    def _absorb(self, f, g):
        K, e = self.K, self.eps
        floor, s = exp_floor(K.dtype) * _LOG2E, _LOG2E / e  # in base 2 (_fused_start)
        if K.dtype == torch.float64:
            self.f, self.g = f, g
            # K = exp((f + g - C)/eps) in four passes; exponents are floored so that no
            # entry is subnormal (entries below exp(floor) are negligible at working precision)
            torch.sub((f * s).unsqueeze(-1), self.C, alpha=s, out=K)
            K.add_((g * s).unsqueeze(-2)).clamp_(min=floor).exp2_()
        else:
            # float32: the absorbed potentials are kept in float64 and the kernel is formed
            # in float64 row blocks, so that K is exact to float32 rounding whatever C/eps
            # (a float32 exponent (f + g - C)/eps loses ~1e-7 * C/eps); absorptions are rare
            d = torch.float64
            self.f, self.g = f.to(d), g.to(d)
            n, m = self.C.shape[-2:]
            step = max(1, tile_entries(K.device) // max(m, 1))
            for r0 in range(0, n, step):
                blk = (self.f[:, r0:r0 + step, None] + self.g[:, None, :] - self.C[:, r0:r0 + step].to(d)) * s
                K[:, r0:r0 + step] = blk.clamp_(min=floor).exp2_()
        dt = K.dtype
        self.u = torch.ones(f.shape, dtype=dt, device=K.device)
        self.v = torch.ones(g.shape, dtype=dt, device=K.device)
        self.K0 = K[0] if self.single else None
        self._final = None
        self._ktu_valid = False
        self._cols_exact = False

    def _Kv(self, x):
        if self.single:
            return torch.mv(self.K0, x[0]).unsqueeze(0)
        return torch.bmm(self.K, x.unsqueeze(-1)).squeeze(-1)

    def _KTu(self, x):
        if self.single:
            return torch.mv(self.K0.t(), x[0]).unsqueeze(0)
        return torch.bmm(x.unsqueeze(-2), self.K).squeeze(-2)

    def run(self, k: int, active: torch.Tensor | None, stop_tol: float | None = None):
        a, b = self.a, self.b
        self._final = None
        self.iters_done = k
        if self.single and active is None:
            return self._run_single(k, stop_tol)
        u, v = self.u, self.v
        u_prev, Kv = u, None
        exact = self._cols_exact
        for _ in range(k):
            Kv = self._Kv(b * v)
            u_prev = u
            u_new = torch.reciprocal(Kv)
            v_new = torch.reciprocal(self._KTu(a * u_new))
            if active is not None:
                u_new = torch.where(active.unsqueeze(-1), u_new, u)
                v_new = torch.where(active.unsqueeze(-1), v_new, v)
            u, v = u_new, v_new
        self.u, self.v = u, v
        self._cols_exact = True
        if k == 1 and not exact:  # the error of the plan after the update (before it, columns were off)
            u_prev, Kv = u, self._Kv(b * v)
        return (a * (u_prev * Kv - 1.0).abs()).sum(-1)

    def _run_single(self, k: int, stop_tol: float | None = None):
        """Up to ``k`` iterations on one problem: preallocated buffers, two BLAS mat-vecs
        and a few O(n) ops each. With ``stop_tol`` the row error of every iteration's plan
        is tested (an O(n) dot product) and the loop stops at the first one that meets it,
        so the caller may check (and sync) rarely without running extra iterations;
        ``self.iters_done`` counts the iterations run.

        A CPU kernel of at most ``_NUMPY_MAX`` entries runs the same loop on NumPy views of
        the same buffers: NumPy's BLAS mat-vec and its small-vector ops cost less per call
        than torch's (measured on AMD EPYC, one thread: 25 against 38 us per mat-vec at
        n = 500, 1.2x at n = 2000; at n = 4000, memory-bound, torch's is as fast).
        """
        bufs = (self.K0, self.a[0], self.b[0], self.u[0], self.v[0], *self._work_buffers())
        if self.K0.device.type == "cpu" and self.K0.numel() <= _NUMPY_MAX:
            import numpy as np

            # an underflowing kernel gives inf/NaN here as in torch; the caller's check decides
            # (log-domain fallback), so NumPy's RuntimeWarnings would only be noise to the user
            with np.errstate(all="ignore"):
                return self._loop(k, stop_tol, bufs, np.multiply, np.dot, np.reciprocal, np.subtract, np.abs, np.dot,
                                  tuple(t.numpy() for t in bufs))
        return self._loop(k, stop_tol, bufs, torch.mul, torch.mv, torch.reciprocal, torch.sub, torch.abs, torch.dot,
                          bufs)

    def _loop(self, k, stop_tol, bufs, mul, mv, reciprocal, sub, absolute, dot, views):
        """The body of :meth:`_run_single` on ``views`` of ``bufs`` (torch tensors or NumPy arrays)."""
        K, a, b, u, v, bv, au, Kv, KTu, r = views
        Kt = K.T
        # u, v are updated in place (views of self.u, self.v); work vectors are reused
        err = None
        for i in range(k):
            mul(b, v, out=bv)
            mv(K, bv, out=Kv)
            if (stop_tol is not None or i == k - 1) and (i > 0 or self._cols_exact):
                # row marginal of the current plan is a * u * Kv (columns are exact)
                mul(u, Kv, out=r)
                err = dot(a, absolute(sub(r, 1.0, out=r), out=r))
                if stop_tol is not None and float(err) <= stop_tol:
                    # the current plan already meets the tolerance: keep it (saves a half
                    # sweep); its row sums a u Kv and column sums b v K^T(a u) are at hand
                    if self._ktu_valid:
                        _, a_, b_, u_, v_, _, _, Kv_, KTu_, _ = bufs
                        self._final = ((a_ * u_ * Kv_).unsqueeze(0), (b_ * v_ * KTu_).unsqueeze(0))
                    self.iters_done = i + 1
                    return torch.as_tensor(err, device=self.K0.device).reshape(1)
            reciprocal(Kv, out=u)
            mul(a, u, out=au)
            mv(Kt, au, out=KTu)
            reciprocal(KTu, out=v)
            self._ktu_valid = self._cols_exact = True
        if err is None:  # one iteration from a state whose columns were off: the error after it
            mul(b, v, out=bv)
            mv(K, bv, out=Kv)
            mul(u, Kv, out=r)
            err = dot(a, absolute(sub(r, 1.0, out=r), out=r))
        self.iters_done = k
        return torch.as_tensor(err, device=self.K0.device).reshape(1)

    def _work_buffers(self):
        """``(bv, au, Kv, KTu, r)``: the single-problem loop's work vectors (kept between runs)."""
        if self._work is None:
            u, v = self.u[0], self.v[0]
            self._work = (torch.empty_like(v), torch.empty_like(u), torch.empty_like(u), torch.empty_like(v),
                          torch.empty_like(u))
        return self._work

    def check(self, err: torch.Tensor) -> tuple[bool, bool]:
        """One device sync: (state is finite, scalings need absorbing).

        ``max |log u|, |log v|`` is inf/NaN exactly when a scaling over- or underflowed.
        """
        mx = torch.maximum(self.u.log().abs().amax(), self.v.log().abs().amax())
        mx, e = torch.stack([mx, err.max()]).tolist()
        ok = math.isfinite(mx) and math.isfinite(e)
        return ok, ok and mx > self.absorb_at

    def save(self):
        # u, v are updated in place by the single-problem loop: copy them
        return (self.f, self.g, self.u.clone(), self.v.clone())

    def restore(self, saved):
        """Potentials of a saved state, finite even if the scalings were not."""
        f, g, u, v = saved
        dt = self.C.dtype
        fr, gr = f + self.eps * u.to(f.dtype).log(), g + self.eps * v.to(g.dtype).log()
        if not (torch.isfinite(fr).all() and torch.isfinite(gr).all()):
            return f.to(dt), g.to(dt)
        return fr.to(dt), gr.to(dt)

    def potentials(self, precise: bool = False):
        """``(f + eps log u, g + eps log v)``; with ``precise`` summed in float64, which
        keeps the digits a float32 kernel's scalings carry (the plan ``diag(au) K
        diag(bv)`` meets the marginals far better than float32 potentials can say)."""
        d = self.f.dtype  # float64 for float32 kernels
        f = self.f + self.eps * self.u.to(d).log()
        g = self.g + self.eps * self.v.to(d).log()
        if precise:
            return f, g
        return f.to(self.C.dtype), g.to(self.C.dtype)

    def absorb(self):
        exact = self._cols_exact  # the same plan, in the kernel
        self._absorb(*self.potentials())
        self._cols_exact = exact
