r"""Point clouds whose reductions run as KeOps kernels (optional ``keops`` extra).

:class:`KeOpsPointCloud` is a :class:`~entrokit.PointCloud` whose reductions over
:math:`n` or :math:`m` are compiled `KeOps <https://www.kernel-operations.io>`_ map-reduce
kernels: the cost :math:`C_{ij} = c(x_i, y_j)` is recomputed in registers and never
stored, so memory is :math:`O(n + m)` and one soft-min pass reads each point once per
tile. The formulas are the ones of the torch path:

.. math::

    \operatorname{lse}_i = \log\sum_j \exp\Big(\frac{h_j + \varepsilon\log w_j
        - C_{ij}}{\varepsilon}\Big),\qquad
    P_{ij} = a_i b_j \exp\Big(\frac{f_i + g_j - C_{ij}}{\varepsilon}\Big),

with the costs

* ``"sqeuclidean"``: :math:`C_{ij} = \|x_i - y_j\|^2` (the POT/OTT convention; GeomLoss
  uses half of it);
* ``"euclidean"``: :math:`C_{ij} = \|x_i - y_j\|` (zero gradient where points coincide);
* ``"pnorm"``: :math:`C_{ij} = \sum_k |x_{ik} - y_{jk}|^p`, :math:`p \ge 1`.

All three are symmetric, :math:`c(x, y) = c(y, x)`, so a reduction over :math:`i`
(``axis=0``) is the reduction over :math:`j` with the roles of the two clouds swapped: one
compiled kernel serves both axes. :math:`\varepsilon`, :math:`p` and the clamping bounds
enter as KeOps parameters, so annealing :math:`\varepsilon` does not recompile anything.
Every reduction is differentiable (KeOps derives the gradient kernels symbolically).

KeOps compiles each formula on first use (a few seconds each; cached under
``~/.cache/keops*``) and picks CPU or CUDA from the tensors' device. It needs a working
C++ compiler (``$CXX``, else ``g++``; ``clang++`` first on macOS): :func:`cxx_compiler`
says whether one is found, and the test suite skips the KeOps tests, with that reason,
when none is.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import shutil
import subprocess
import sys
from typing import Literal

import torch

from entrokit._errors import InputError
from entrokit._optional import require
from entrokit.geometry.base import Geometry, exp_floor
from entrokit.geometry.pointcloud import PointCloud, _Backend

__all__ = ["KeOpsPointCloud", "cxx_compiler"]


def find_cxx_compiler(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The C++ compiler KeOps would pick, by its rule (``keopscore.config``): ``$CXX`` when
    it is on ``PATH``, else ``clang++`` then ``g++`` on macOS, ``g++`` elsewhere. Returns
    ``(path, "")`` when ``<path> --version`` runs, else ``(None, why)``; ``env`` defaults to
    ``os.environ``."""
    env = os.environ if env is None else env
    path = env.get("PATH", "")
    cxx = env.get("CXX")
    names = [cxx] if cxx and shutil.which(cxx, path=path) else []
    names += ["clang++", "g++"] if platform.system() == "Darwin" else ["g++"]
    found = next((shutil.which(c, path=path) for c in names if shutil.which(c, path=path)), None)
    if found is None:
        return None, (
            f"no C++ compiler on PATH (KeOps looks for {' or '.join(dict.fromkeys(names))}); "
            "install one (e.g. apt install g++) or set CXX"
        )
    try:
        proc = subprocess.run([found, "--version"], capture_output=True, timeout=30, env=dict(env))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C++ compiler {found} does not run ({type(exc).__name__}: {exc})"
    if proc.returncode != 0:
        return None, f"the C++ compiler {found} does not run ('{found} --version' exits {proc.returncode})"
    return found, ""


@functools.cache
def cxx_compiler() -> tuple[str | None, str]:
    """:func:`find_cxx_compiler` for this process's environment (computed once)."""
    return find_cxx_compiler()

KeOpsCostName = Literal["sqeuclidean", "euclidean", "pnorm"]
_INSTALL_HINT = "pip install 'entrokit[keops]' (or pip install pykeops)"


def _lazy_tensor_class():
    """``pykeops.torch.LazyTensor``, imported on first use through :mod:`entrokit._optional`
    (``import entrokit`` never imports pykeops)."""
    try:
        # pykeops prints its start-up notices (e.g. "CUDA libraries not found") on stdout,
        # which would mix into a program's own output: they go to stderr instead
        with contextlib.redirect_stdout(sys.stderr):
            return require("pykeops.torch", "KeOpsPointCloud").LazyTensor
    except ImportError as exc:
        # require() names its default extra; this feature lives in the keops extra
        raise ImportError(
            f"KeOpsPointCloud needs the optional package 'pykeops', which could not be imported "
            f"({exc.__cause__ or exc}). Install the extra with: {_INSTALL_HINT}; or use "
            "PointCloud(x, y, cost, online=True) for an online cost without KeOps."
        ) from exc


class KeOpsPointCloud(PointCloud):
    r"""A point-cloud cost whose reductions run as KeOps kernels (see the module docstring).

    Same data and results as :class:`~entrokit.PointCloud` (up to rounding), with memory
    :math:`O(n + m)`: every :meth:`lse`, :meth:`plan_reduce`, :meth:`plan_matvec` and
    :meth:`cost_bounds` is one KeOps map-reduce pass over the implicit :math:`n \times m`
    cost. Use it for large clouds in low dimension; for small problems the dense torch path
    is faster (no kernel launch or compilation).

    Args:
        x: source points ``[..., n, d]``.
        y: target points ``[..., m, d]`` (the same batch axes as ``x``).
        cost: ``"sqeuclidean"`` (:math:`\|x-y\|^2`), ``"euclidean"`` (:math:`\|x-y\|`),
            ``"pnorm"`` (:math:`\sum_k |x_k-y_k|^p`, needs ``p``) or a
            :class:`~entrokit.geometry.costs.Cost` with a KeOps formula. Callables are not
            compiled by KeOps: use :class:`~entrokit.PointCloud` for those.
        p: the exponent of ``cost="pnorm"`` (a number >= 1, as for PointCloud).

    Raises:
        ImportError: pykeops is not installed (``pip install 'entrokit[keops]'``).
        InputError: a callable or unknown cost, ``p`` missing or invalid, or the point
            checks of :class:`~entrokit.PointCloud`.

    Example:
        >>> import torch, entrokit
        >>> from entrokit.geometry.keops import KeOpsPointCloud
        >>> x = torch.rand(60, 3, dtype=torch.float64)
        >>> y = torch.rand(40, 3, dtype=torch.float64)
        >>> out = entrokit.sinkhorn(None, None, KeOpsPointCloud(x, y), 0.1, tol=1e-10)
        >>> ref = entrokit.sinkhorn(None, None, entrokit.PointCloud(x, y), 0.1, tol=1e-10)
        >>> bool(out.converged), bool((out.f - ref.f).abs().max() < 1e-8)
        (True, True)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost: KeOpsCostName = "sqeuclidean", *,
                 p: float | None = None):
        # PointCloud validates the points, the cost and p, and provides the torch cost
        # (cost_matrix, plan); the KeOps backend replaces its reductions
        super().__init__(x, y, cost, p=p, online=True)
        if not self.cost_fn.has_keops:
            raise InputError(
                f"KeOpsPointCloud compiles only costs with a KeOps formula ('sqeuclidean', 'euclidean', "
                f"'pnorm'); got {self.cost_fn.name!r}. Use PointCloud(x, y, cost) (with chunk_size=... for "
                "an online cost) for a custom cost."
            )
        self.chunk_size = None

    def _make_backend(self):
        _lazy_tensor_class()  # fail here, not at the first reduction, when pykeops is missing
        return _KeOps(self)

    def __repr__(self) -> str:
        return (
            f"KeOpsPointCloud(n={self.shape[0]}, m={self.shape[1]}, d={self.x.shape[-1]}, "
            f"cost={self.cost_fn.name!r}, batch={self.batch_shape})"
        )


def _i(LazyTensor, t: torch.Tensor):
    """``(B, n, k)`` -> an i-indexed LazyTensor ``(B, n, 1, k)``."""
    return LazyTensor(t.contiguous()[:, :, None, :])


def _j(LazyTensor, t: torch.Tensor):
    """``(B, m, k)`` -> a j-indexed LazyTensor ``(B, 1, m, k)``."""
    return LazyTensor(t.contiguous()[:, None, :, :])


class _KeOps(_Backend):
    """The KeOps backend of :class:`KeOpsPointCloud`: every reduction is a KeOps map-reduce
    over the cost's symbolic formula (:meth:`~entrokit.geometry.costs.Cost.keops`). The
    costs are symmetric, so ``axis=0`` swaps the two clouds."""

    def __init__(self, pc: KeOpsPointCloud):
        self.pc = pc

    def derive(self, pc, cost_map):
        return _KeOps(pc)

    def _cost(self, LazyTensor, pts_i, pts_j):
        return self.pc.cost_fn.keops(_i(LazyTensor, pts_i), _j(LazyTensor, pts_j), self.pc.dtype)

    def _flat(self, axis: int, *per_point: torch.Tensor):
        """The kept points ``(B, n_i, d)`` (``x`` for ``axis=1``, ``y`` for ``axis=0``), the
        reduced points ``(B, n_j, d)`` and per-point tensors ``(..., len, k)`` flattened to
        ``(B, len, k)``, broadcast over the batch axes; and the batch shape ``lead`` of the
        output."""
        pc = self.pc
        pts_i, pts_j = (pc.x, pc.y) if axis == 1 else (pc.y, pc.x)
        lead = tuple(torch.broadcast_shapes(pc.batch_shape, *(t.shape[:-2] for t in per_point)))
        B = math.prod(lead)

        def flat(t):
            return t.expand(*lead, *t.shape[-2:]).reshape(B, *t.shape[-2:])

        return flat(pts_i), flat(pts_j), [flat(t) for t in per_point], lead

    def _plan_sum(self, f_i, g_j, w_j, eps, axis, *, with_cost=False, accumulate=None):
        r""":math:`\sum_j w_j E_{ij}` (or :math:`\sum_j w_j E_{ij} C_{ij}` with ``with_cost``),
        :math:`E_{ij} = \exp(\mathrm{clamp}((f_i + g_j - C_{ij})/\varepsilon))` with the
        bounds of :func:`~entrokit.geometry.base.plan_block`. ``f_i`` ``(..., n_i)`` lives
        on the kept side of ``axis``; ``w_j`` is ``(..., n_j)`` or ``(..., n_j, k)`` (``k``
        vectors in one pass). Output ``(..., n_i)`` or ``(..., n_i, k)``."""
        LazyTensor = _lazy_tensor_class()
        several = w_j.dim() == g_j.dim() + 1
        pts_i, pts_j, (f_i, g_j, w_j), lead = self._flat(
            axis, f_i.unsqueeze(-1), g_j.unsqueeze(-1), w_j if several else w_j.unsqueeze(-1)
        )
        C_ij = self._cost(LazyTensor, pts_i, pts_j)
        S_ij = (_i(LazyTensor, f_i) + _j(LazyTensor, g_j) - C_ij) * (1.0 / float(eps))
        dtype = self.pc.dtype
        E_ij = S_ij.clamp(exp_floor(dtype), 0.5 * math.log(torch.finfo(dtype).max)).exp()
        term = E_ij * _j(LazyTensor, w_j)
        if with_cost:
            term = term * C_ij
        opts = {}
        if accumulate == torch.float64 and dtype != torch.float64:
            opts["dtype_acc"] = "float64"  # entries in the working dtype, summed in float64
        out = term.sum(dim=2, **opts)  # (B, n_i, k)
        out = out.reshape(*lead, *out.shape[-2:])
        return out if several else out.squeeze(-1)

    def lse(self, h, log_w, eps, axis):
        r"""Partial log-sum-exp pair ``(M, S)`` of :math:`z = (h + \varepsilon\log w -
        C)/\varepsilon` along ``axis``, as one KeOps ``LogSumExp`` reduction: KeOps returns
        :math:`\operatorname{lse}`; the pair is :math:`M = \operatorname{lse}` (detached) and
        :math:`S = e^{\operatorname{lse} - M}` (``= 1``, carrying the gradient). A slice whose
        weights are all zero gives ``M = -inf, S = 0``."""
        if axis not in (0, 1):
            raise InputError(f"axis must be 0 or 1, got {axis!r}.")
        LazyTensor = _lazy_tensor_class()
        hw = h + eps * log_w
        empty = (hw == -math.inf).all(-1, keepdim=True)
        # KeOps' online max-shift turns a leading -inf entry into exp(-inf + inf) = NaN: zero
        # weights enter as a finite exponent whose exponential is exactly 0 (and (hw - C)/eps
        # cannot overflow)
        hw = hw.clamp_min(-torch.finfo(hw.dtype).max * min(float(eps), 1.0) / 4)
        pts_i, pts_j, (hw,), lead = self._flat(axis, hw.unsqueeze(-1))
        empty = empty.expand(*lead, 1).reshape(-1, 1)
        C_ij = self._cost(LazyTensor, pts_i, pts_j)
        z_ij = (_j(LazyTensor, hw) - C_ij) * (1.0 / float(eps))  # a product: cheaper than a division per entry
        lse = z_ij.logsumexp(dim=2).squeeze(-1)
        mx = lse.detach().masked_fill(empty, -math.inf)
        s = torch.exp(lse - mx.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
        return mx.reshape(*lead, -1), s.reshape(*lead, -1)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        r"""Row sums :math:`a_i\sum_j b_j E_{ij}`, column sums and
        :math:`\langle C, P\rangle = \sum_i a_i \sum_j b_j E_{ij} C_{ij}` in three KeOps
        passes (differentiable). The weights multiply outside the exponential, as in
        :func:`~entrokit.geometry.base.plan_block`, so gradients at zero weights are finite.

        ``accumulate=torch.float64`` on float32 data sums the float32 entries in float64
        inside KeOps (KeOps returns float32: each row or column sum is rounded once, a
        relative 6e-8, before the cast).
        ``round_to`` (rounding every entry to another dtype) is not supported: a
        ``TypeError`` is raised, which :func:`~entrokit.solvers._entropic.certify_plan`
        handles by summing unrounded entries.
        """
        if round_to is not None and round_to != self.pc.dtype:
            raise TypeError("KeOpsPointCloud.plan_reduce cannot round plan entries to another dtype (round_to).")
        sums = (
            self._plan_sum(f, g, b, eps, 1, accumulate=accumulate),
            self._plan_sum(g, f, a, eps, 0, accumulate=accumulate),
            self._plan_sum(f, g, b, eps, 1, with_cost=True, accumulate=accumulate),
        )
        if accumulate is not None:  # the outer weights multiply in the accumulation dtype
            sums, a, b = [t.to(accumulate) for t in sums], a.to(accumulate), b.to(accumulate)
        rows, cols, row_cost = a * sums[0], b * sums[1], a * sums[2]
        return rows, cols, row_cost.sum(-1)

    def marginals(self, f, g, a, b, eps):
        """``(P 1, Pᵀ 1)`` in two KeOps passes (no transport-cost pass)."""
        return a * self._plan_sum(f, g, b, eps, 1), b * self._plan_sum(g, f, a, eps, 0)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        r"""``P @ vec`` :math:`= a_i \sum_j b_j v_j E_{ij}` (``axis=1``) or ``P.T @ vec``
        (``axis=0``): one KeOps pass, the kernel of the marginals with other weights; ``vec``
        may carry a trailing axis of ``k`` vectors, applied in the same pass."""
        if axis not in (0, 1):
            raise InputError(f"axis must be 0 or 1, got {axis!r}.")
        several = vec.dim() == f.dim() + 1
        kept_w, other_w = (a, b) if axis == 1 else (b, a)
        if several:
            kept_w, other_w = kept_w.unsqueeze(-1), other_w.unsqueeze(-1)
        f_i, g_j = (f, g) if axis == 1 else (g, f)
        return kept_w * self._plan_sum(f_i, g_j, other_w * vec, eps, axis)

    def plan_operator(self, f, g, a, b, eps):
        return Geometry.plan_operator(self.pc, f, g, a, b, eps)

    def scaling_engine(self, a, b, log_a, log_b):
        return None

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(min C, max C)`` per problem in one KeOps ``Max`` pass over
        :math:`(C_{ij}, -C_{ij})` (cached by the point cloud). Problems with non-finite
        coordinates get NaN bounds."""
        LazyTensor = _lazy_tensor_class()
        pts_i, pts_j, _, lead = self._flat(1)
        C_ij = self._cost(LazyTensor, pts_i, pts_j)
        row_max = C_ij.concat(-C_ij).max(dim=2)  # (B, n, 2): max_j C_ij, -min_j C_ij
        hi, lo = row_max[..., 0].amax(-1), -row_max[..., 1].amax(-1)
        finite = torch.isfinite(pts_i).flatten(1).all(1) & torch.isfinite(pts_j).flatten(1).all(1)
        nan = torch.full_like(hi, math.nan)
        return torch.where(finite, lo, nan).reshape(lead), torch.where(finite, hi, nan).reshape(lead)
