r"""One OT problem sharded over the ranks of a ``torch.distributed`` process group.

Each rank holds a shard :math:`I_r` of the source points ``x`` (rows) with its share of
the weights ``a`` and of the potential ``f``. The Sinkhorn solver is unchanged: it only
calls the :class:`~entrokit.geometry.base.Geometry` primitives, and this geometry turns
every reduction over a sharded axis into a collective.

**Default (replicated) mode.** ``y``, ``b`` and ``g`` are identical on every rank.

* ``f``-update (reduce over :math:`j`, ``axis=1``): local, since every rank holds all of
  ``y``.
* ``g``-update (reduce over :math:`i`, ``axis=0``): each rank computes the partial pair
  of its rows, :math:`M^{(r)}_j = \max_{i\in I_r} z_{ij}`,
  :math:`S^{(r)}_j = \sum_{i\in I_r} e^{z_{ij} - M^{(r)}_j}`, and two all-reduces merge
  them exactly (the log-sum-exp merge of :func:`~entrokit.geometry.base.combine_lse`):

  .. math::

      M_j = \max_r M^{(r)}_j \quad(\text{all-reduce MAX}),\qquad
      S_j = \sum_r S^{(r)}_j\, e^{M^{(r)}_j - M_j} \quad(\text{all-reduce SUM}),\qquad
      \operatorname{lse}_j = M_j + \log S_j.

  Every rank ends with the same ``g``; communication is :math:`2m` numbers per iteration
  (plus one number per convergence check for the marginal error).

**Ring mode** (``ring=True``). Each rank holds a shard :math:`J_r` of ``y`` (with ``b``
and ``g``), and no rank ever holds all of ``y``. A reduction over :math:`j` passes the
``y`` blocks, packed with :math:`h_j + \varepsilon\log w_j`, around the ring of ranks
(ring-attention style: the next block is received while the current one is reduced)
and merges the per-block pairs with the same formula; a reduction over :math:`i` passes
the ``x`` blocks the same way. Communication is :math:`(d+1)(R-1)/R\,(n+m)` numbers per
rank and iteration for :math:`R` ranks.

**Sums** over the sharded axes (:meth:`row_sum`, :meth:`col_sum`, total masses, marginal
errors, :math:`\langle C, P\rangle`) are all-reduce SUMs, and cost bounds all-reduce
MIN/MAX, so every rank sees the same scalars and takes the same solver decisions.

**Gradients.** ``grad="envelope"`` gives each rank the exact gradient of the (global)
``value`` with respect to its own ``x_local`` (the sums carry the gradient of their local
term). In the replicated mode, ``y.grad`` on each rank is that rank's share: all-reduce
(SUM) it for the full gradient. ``grad="implicit"`` with inputs that require gradients,
``grad="unroll"``, gradients with respect to the weights and, in ring mode, with respect
to ``y`` raise :class:`~entrokit.InputError`.

Usage (every rank runs the same code, e.g. under ``torchrun``):

.. code-block:: python

    x_local = x.tensor_split(world_size)[rank]        # this rank's rows
    a_local = a.tensor_split(world_size)[rank]
    geom = ShardedPointCloud(x_local, y, chunk_size=1024)
    res = entrokit.sinkhorn(a_local, b, geom, eps=1e-2)  # res.f: this rank's rows
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor
from entrokit.geometry.base import PointGeometry, combine_lse
from entrokit.geometry.pointcloud import CostFn, CostName, PointCloud

__all__ = ["ShardedPointCloud", "CommCounter"]

# -- communication, counted ------------------------------------------------------------

_ACTIVE_COUNTERS: list[CommCounter] = []


class CommCounter:
    """Count the bytes this rank hands to the collectives of sharded geometries.

    Every collective of :class:`ShardedPointCloud` (and of
    :mod:`entrokit.distributed`) goes through one counting wrapper. ``bytes_sent`` adds
    the payload of each all-reduce / all-gather buffer and of each ring send;
    ``bytes_received`` the ring receives. (An all-reduce implemented as a ring moves
    about :math:`2(R-1)/R` times its payload over the wire: equal to it for 2 ranks.)
    Counters nest; use one as a context manager:

    .. code-block:: python

        with CommCounter() as counter:
            res = entrokit.sinkhorn(a_local, b, geom, eps)
        counter.bytes_sent, counter.calls, counter.by_kind  # {"all_reduce": (calls, bytes), ...}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.by_kind: dict[str, tuple[int, int]] = {}

    def record(self, kind: str, sent: int, received: int = 0) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1
        calls, total = self.by_kind.get(kind, (0, 0))
        self.by_kind[kind] = (calls + 1, total + sent)

    def __enter__(self) -> CommCounter:
        _ACTIVE_COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE_COUNTERS.remove(self)

    def __repr__(self) -> str:
        return f"CommCounter(bytes_sent={self.bytes_sent}, calls={self.calls}, by_kind={self.by_kind})"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(kind: str, sent: int, received: int = 0) -> None:
    for counter in _ACTIVE_COUNTERS:
        counter.record(kind, sent, received)


def require_initialised(what: str) -> None:
    """Raise :class:`InputError` unless a default ``torch.distributed`` group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            f"{what} needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) on every "
            "rank first, e.g. under torchrun, or use PointCloud for a single process."
        )


def all_reduce(t: torch.Tensor, op, group=None) -> torch.Tensor:
    """All-reduce a copy of ``t`` (``t`` is left unchanged; no autograd). A group of one
    rank sends nothing."""
    out = t.detach().clone(memory_format=torch.contiguous_format)
    if dist.get_world_size(group) == 1:
        return out
    _record("all_reduce", _nbytes(out))
    dist.all_reduce(out, op=op, group=group)
    return out


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank), in rank order."""
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    _record("all_gather", _nbytes(t))
    dist.all_gather(out, t, group=group)
    return out


def _exchange(send: torch.Tensor, recv: torch.Tensor, dst: int, src: int, group) -> list:
    """Start sending ``send`` to ``dst`` and receiving ``recv`` from ``src`` (global ranks)."""
    _record("ring_send", _nbytes(send), _nbytes(recv))
    ops = [dist.P2POp(dist.isend, send, dst, group=group), dist.P2POp(dist.irecv, recv, src, group=group)]
    return dist.batch_isend_irecv(ops)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM of a replicated quantity; backward passes the gradient to this
    rank's term only, so each rank differentiates the global value with respect to its
    own inputs (an all-reduce of the gradient would count the replicated value R times)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group):
        return all_reduce(local, dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(local: torch.Tensor, group=None) -> torch.Tensor:
    """:math:`\\sum_r` ``local`` over the ranks of ``group``, identical on every rank."""
    return _SumOverRanks.apply(local, group)


# -- collective input validation ------------------------------------------------------------

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
_MAX_BATCH_AXES = 8
# local error codes, raised on every rank once gathered
_OK, _BAD_TYPE, _BAD_SHAPE, _EMPTY, _NONFINITE_X, _NONFINITE_Y, _BATCH_AXES = range(7)
_WHAT = {
    _BAD_TYPE: "x_local and y must be floating tensors (float32 or float64) of one dtype",
    _BAD_SHAPE: "x_local and y must have shapes (..., n_local, d) and (..., m, d) with the same batch axes and d",
    _EMPTY: "every rank must hold at least one source point and one target point",
    _NONFINITE_X: "x_local contains NaN or inf; every point must be finite (clean or drop those points)",
    _NONFINITE_Y: "y contains NaN or inf; every point must be finite (clean or drop those points)",
    _BATCH_AXES: f"at most {_MAX_BATCH_AXES} batch axes are supported; flatten them",
}


def _local_checks(x, y):
    """``(x, y, code, detail)``: the converted points and this rank's error code (never
    raises, so that every rank reaches the collective that shares the verdict)."""
    try:
        x = as_float_tensor(x, "x_local")
        y = as_float_tensor(y, "y")
    except InputError as err:  # empty tensors
        return None, None, _EMPTY, str(err)
    except (TypeError, ValueError) as err:
        return None, None, _BAD_TYPE, str(err)
    if x.dtype != y.dtype or x.dtype not in _DTYPE_CODES or x.device != y.device:
        return x, y, _BAD_TYPE, f"x_local is {x.dtype} on {x.device}, y is {y.dtype} on {y.device}"
    if x.dim() < 2 or y.dim() != x.dim() or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        return x, y, _BAD_SHAPE, f"got x_local {tuple(x.shape)} and y {tuple(y.shape)}"
    if x.dim() - 2 > _MAX_BATCH_AXES:
        return x, y, _BATCH_AXES, f"got {x.dim() - 2} batch axes"
    if not bool(torch.isfinite(x).all()):
        return x, y, _NONFINITE_X, ""
    if not bool(torch.isfinite(y).all()):
        return x, y, _NONFINITE_Y, ""
    return x, y, _OK, ""


def _meta(x, y, code: int, ring: bool, device) -> torch.Tensor:
    """``[code, d, n_local, m_local, dtype, ring, n_batch_axes, batch axes (padded)]``."""
    row = [code, 0, 0, 0, 0, int(ring), 0] + [-1] * _MAX_BATCH_AXES
    if code == _OK:
        batch = list(x.shape[:-2])
        row[1:5] = [x.shape[-1], x.shape[-2], y.shape[-2], _DTYPE_CODES[x.dtype]]
        row[6] = len(batch)
        row[7:7 + len(batch)] = batch
    return torch.tensor(row, dtype=torch.int64, device=device)


def _differ(table: torch.Tensor, col: int) -> bool:
    return bool((table[:, col] != table[0, col]).any())


def _per_rank(table: torch.Tensor, col: int, name: str) -> str:
    return ", ".join(f"{name}={int(v)} on rank {r}" for r, v in enumerate(table[:, col].tolist()))


def _raise_on_bad_table(table: torch.Tensor, rank: int, detail: str, ring: bool) -> None:
    """Raise the same :class:`InputError` on every rank for inconsistent shards."""
    codes = table[:, 0].tolist()
    bad = [r for r, c in enumerate(codes) if c != _OK]
    if bad:
        r0 = bad[0]
        msg = f"ShardedPointCloud: invalid input on rank(s) {bad}: {_WHAT[codes[r0]]}"
        if rank in bad and detail:
            msg += f" (rank {rank}: {detail})"
        raise InputError(msg + ".")
    if _differ(table, 5):
        raise InputError(
            f"ring differs across ranks ({', '.join(f'ring={bool(v)} on rank {r}' for r, v in enumerate(table[:, 5].tolist()))}); "
            "pass the same ring flag on every rank."
        )
    if _differ(table, 1):
        raise InputError(
            f"point dimension differs across ranks ({_per_rank(table, 1, 'd')}); every rank must "
            "hold points with the same number of coordinates d."
        )
    if _differ(table, 4):
        raise InputError(
            "dtype differs across ranks; cast the points to one dtype (e.g. float64) on every rank."
        )
    if any(_differ(table, c) for c in range(6, 7 + _MAX_BATCH_AXES)):
        raise InputError(
            "batch axes differ across ranks; every rank must hold the same batch of problems "
            "(only the point axis n_local is sharded)."
        )
    if not ring and _differ(table, 3):
        raise InputError(
            f"y has a different number of points across ranks ({_per_rank(table, 3, 'm')}); in the "
            "default mode y is replicated (the same on every rank). Pass ring=True if each rank "
            "holds a shard of y."
        )


def _check_replicated(y: torch.Tensor, group) -> None:
    """Raise on every rank if ``y`` is not the same on every rank (float64 checksums)."""
    y64 = y.detach().to(torch.float64).flatten()
    pos = torch.linspace(1.0, 2.0, y64.numel(), dtype=torch.float64, device=y64.device)
    sums = torch.stack([y64.sum(), (y64 * y64).sum(), (y64 * pos).sum()])
    table = torch.stack(all_gather(sums, group))
    scale = table.abs().amax(0).clamp_min(1e-300)
    if bool(((table - table[0]).abs() > 1e-10 * scale).any()):
        raise InputError(
            "y differs across ranks; in the default mode y is replicated (the same tensor on "
            "every rank). Pass ring=True if each rank holds a shard of y."
        )


# -- the geometry ---------------------------------------------------------------------------


class ShardedPointCloud(PointGeometry):
    r"""Point-cloud cost :math:`C_{ij} = c(x_i, y_j)` with the rows sharded over ranks.

    Every rank of ``group`` constructs it (a collective call: the shards are validated
    together, so every rank raises the same :class:`~entrokit.InputError`) and calls the
    solver with its share of the weights: ``entrokit.sinkhorn(a_local, b, geom, eps)``.
    See the module docstring for the reductions and their communication.

    Args:
        x_local: this rank's source points ``[..., n_local, d]`` (shards may differ in
            size; every rank holds at least one point).
        y: target points ``[..., m, d]``, the same on every rank; with ``ring=True``, this
            rank's shard ``[..., m_local, d]`` of them.
        cost: as for :class:`~entrokit.PointCloud`.
        group: the process group (default: the default group).
        ring: shard ``y`` too and pass its blocks around the ranks.
        chunk_size: tiling of the local :class:`~entrokit.PointCloud` work (this rank's
            ``n_local x m`` block, or one ``n_local x m_local`` block at a time in ring
            mode); ``None`` leaves the choice to :class:`~entrokit.PointCloud`.
        **pointcloud_options: further options of the local :class:`~entrokit.PointCloud`
            (e.g. ``p`` for ``cost="pnorm"``, ``kernel``), the same on every rank.

    The weights and potentials follow the points: ``a`` and ``f`` are ``[..., n_local]``,
    ``b`` and ``g`` are ``[..., m]`` (``[..., m_local]`` in ring mode). :attr:`shape` is
    this rank's share, :attr:`global_shape` the whole problem.
    """

    def __init__(
        self,
        x_local: torch.Tensor,
        y: torch.Tensor,
        cost: CostName | CostFn = "sqeuclidean",
        *,
        group=None,
        ring: bool = False,
        chunk_size: int | None = None,
        **pointcloud_options,
    ):
        require_initialised("ShardedPointCloud")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise InputError("this process is not a member of `group`; build ShardedPointCloud only on its ranks.")
        ring = bool(ring)
        x_local, y, code, detail = _local_checks(x_local, y)
        device = x_local.device if x_local is not None else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            raise InputError(
                "the NCCL backend moves CUDA tensors only; put x_local and y on this rank's GPU "
                "(e.g. .to(f'cuda:{local_rank}')) or initialise the process group with 'gloo'."
            )
        table = torch.stack(all_gather(_meta(x_local, y, code, ring, device), group)).cpu()
        _raise_on_bad_table(table, rank, detail, ring)
        if not ring and world > 1:
            _check_replicated(y, group)
        self.x, self.y, self.cost, self.chunk_size = x_local, y, cost, chunk_size
        self._options = {"chunk_size": chunk_size, **pointcloud_options}
        self.group, self.rank, self.world_size, self.ring = group, rank, world, ring
        self._n_sizes = [int(v) for v in table[:, 2].tolist()]
        self._m_sizes = [int(v) for v in table[:, 3].tolist()]
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self._next, self._prev = peer((rank + 1) % world), peer((rank - 1) % world)
        # this rank's block of the cost (all of it in the replicated mode); raises the
        # same error on every rank for a bad cost or chunk_size
        self._local = PointCloud(x_local, y, cost, **self._options)

    # -- metadata ------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.cost if isinstance(self.cost, str) else getattr(self.cost, "__name__", "callable")
        (n, m), (n_loc, m_loc) = self.global_shape, self.shape
        return (
            f"ShardedPointCloud(rank={self.rank}/{self.world_size}, n={n} ({n_loc} here), m={m}"
            f"{f' ({m_loc} here)' if self.ring else ''}, d={self.x.shape[-1]}, cost={c!r}, "
            f"ring={self.ring}, chunk_size={self.chunk_size}, batch={self.batch_shape})"
        )

    # shape (PointGeometry): this rank's share (n_local, m), (n_local, m_local) in ring mode
    @property
    def global_shape(self) -> tuple[int, int]:
        return (sum(self._n_sizes), sum(self._m_sizes) if self.ring else self.y.shape[-2])

    @property
    def is_online(self) -> bool:
        return True  # no rank ever holds the n x m cost (so solvers use log-sum-exp updates)

    # -- structure (local operations: same shapes on every rank) ----------------------------
    def _replace(self, local: PointCloud, bounds=None) -> ShardedPointCloud:
        """The same sharding on other points (no collective)."""
        new = object.__new__(ShardedPointCloud)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_bounds"})
        new._local = local
        new.x, new.y = local.tensors()
        if bounds is not None:
            new.__dict__["_bounds"] = bounds
        return new

    def reshape_batch(self, batch_shape) -> ShardedPointCloud:
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        bounds = self.__dict__.get("_bounds")
        if bounds is not None:
            bounds = tuple(t.reshape(batch_shape) for t in bounds)
        return self._replace(self._local.reshape_batch(batch_shape), bounds)

    def detach(self) -> ShardedPointCloud:
        return self._replace(self._local.detach(), self.__dict__.get("_bounds"))

    def rebuild(self, x, y) -> ShardedPointCloud:
        return self._replace(self._block(x, y))

    def _block(self, x, y) -> PointCloud:
        return PointCloud(x, y, self.cost, **self._options)

    # -- ring pass ---------------------------------------------------------------------------
    def _ring(self, payload: torch.Tensor, sizes: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(owner, block)`` for the block of every rank, starting with this rank's
        ``payload``: at step ``s`` this rank holds the block of rank ``rank - s``, and the
        next block is already in flight (sent to ``rank + 1``, received from ``rank - 1``)
        while the caller reduces the current one. At most two blocks are held at once."""
        current, owner = payload.detach().contiguous(), self.rank
        for step in range(self.world_size):
            pending = None
            if step < self.world_size - 1:
                next_owner = (owner - 1) % self.world_size
                incoming = current.new_empty((*current.shape[:-2], sizes[next_owner], current.shape[-1]))
                pending = _exchange(current, incoming, self._next, self._prev, self.group)
            yield owner, current
            if pending is not None:
                for work in pending:
                    work.wait()
                current, owner = incoming, next_owner

    @staticmethod
    def _pack(points: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
        """``[points | column_1 | ...]`` along the coordinate axis: one message per hop."""
        return torch.cat([points.detach(), *(c.detach().unsqueeze(-1) for c in columns)], -1)

    # -- cost bounds ------------------------------------------------------------------------
    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min C, max C)`` over all ranks' blocks (all-reduce MIN of ``[lo, -hi]``; a
        NaN anywhere gives NaN on every rank). Cached."""
        cached = self.__dict__.get("_bounds")
        if cached is None:
            with torch.no_grad():
                lo, hi = self._local.cost_bounds()
                if self.ring:
                    for owner, block in self._ring(self.y, self._m_sizes):
                        if owner != self.rank:
                            lo_b, hi_b = self._block(self.x, block).cost_bounds()
                            lo, hi = torch.minimum(lo, lo_b), torch.maximum(hi, hi_b)
                nan = torch.isnan(lo) | torch.isnan(hi)
                zero = torch.zeros_like(lo)
                packed = torch.stack([torch.where(nan, zero, lo), torch.where(nan, zero, -hi), -nan.to(lo.dtype)])
                packed = all_reduce(packed, dist.ReduceOp.MIN, self.group)
                nan = packed[2] < 0
                lo = torch.where(nan, torch.full_like(lo, float("nan")), packed[0])
                hi = torch.where(nan, torch.full_like(hi, float("nan")), -packed[1])
            cached = self.__dict__["_bounds"] = (lo, hi)
        return cached

    # -- log-sum-exp ---------------------------------------------------------------------------
    def _merge_over_ranks(self, pair):
        """The LSE merge of the partial pairs of all ranks (module docstring)."""
        m_local, s_local = pair
        m_global = all_reduce(m_local, dist.ReduceOp.MAX, self.group)
        shift = torch.where(torch.isfinite(m_global), m_global, torch.zeros_like(m_global))
        rescale = torch.where(m_local == -float("inf"), torch.zeros_like(m_local), torch.exp(m_local - shift))
        return m_global, sum_over_ranks(s_local * rescale, self.group)

    def lse(self, h, log_w, eps, axis):
        r"""Partial pair ``(M, S)`` of :math:`z = (h + \varepsilon\log w - C)/\varepsilon`,
        complete over the sharded axis: ``axis=1`` gives this rank's rows, ``axis=0`` the
        columns (all of them, or this rank's in ring mode)."""
        if not self.ring or self.world_size == 1:
            own = self._local.lse(h, log_w, eps, axis)
            return own if axis == 1 or self.world_size == 1 else self._merge_over_ranks(own)
        # ring: the other side's blocks visit, packed with h + eps log w
        points, sizes = (self.y, self._m_sizes) if axis == 1 else (self.x, self._n_sizes)
        acc = None
        for owner, block in self._ring(self._pack(points, h + eps * log_w), sizes):
            if owner == self.rank:
                pair = self._local.lse(h, log_w, eps, axis)
            else:
                pts, hw = block[..., :-1], block[..., -1]
                geom = self._block(self.x, pts) if axis == 1 else self._block(pts, self.y)
                pair = geom.lse(hw, torch.zeros_like(hw), eps, axis)
            acc = pair if acc is None else combine_lse([acc, pair])
        return acc

    # -- plan reductions -------------------------------------------------------------------
    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        r"""Rows (this rank's), columns and :math:`\langle C, P\rangle` (global) of the plan.
        Replicated: one all-reduce SUM of ``[columns | <C, P>]``. Ring: the ``y`` blocks
        visit for the rows and :math:`\langle C,P\rangle`, then the ``x`` blocks for the
        columns of this rank's ``y`` (this rank's own block is reduced once)."""
        kw = {"accumulate": accumulate}
        if round_to is not None:
            kw["round_to"] = round_to
        if not self.ring or self.world_size == 1:
            rows, cols, tc = self._local.plan_reduce(f, g, a, b, eps, **kw)
            if self.world_size == 1:
                return rows, cols, tc
            packed = sum_over_ranks(torch.cat([cols, tc.unsqueeze(-1)], -1), self.group)
            return rows, packed[..., :-1], packed[..., -1]
        rows = tc = cols = 0.0
        for owner, block in self._ring(self._pack(self.y, g, b), self._m_sizes):
            if owner == self.rank:
                r_b, cols, tc_b = self._local.plan_reduce(f, g, a, b, eps, **kw)
            else:
                r_b, _, tc_b = self._block(self.x, block[..., :-2]).plan_reduce(
                    f, block[..., -2], a, block[..., -1], eps, **kw
                )
            rows, tc = rows + r_b, tc + tc_b
        for owner, block in self._ring(self._pack(self.x, f, a), self._n_sizes):
            if owner != self.rank:
                cols = cols + self._block(block[..., :-2], self.y).plan_reduce(
                    block[..., -2], g, block[..., -1], b, eps, **kw
                )[1]
        return rows, cols, sum_over_ranks(tc, self.group)

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        """``P @ vec`` (``axis=1``: ``vec`` over this rank's columns, result over its rows)
        or ``P.T @ vec`` (``axis=0``: ``vec`` over this rank's rows)."""
        if not self.ring or self.world_size == 1:
            own = self._local.plan_matvec(f, g, a, b, eps, vec, axis)
            return own if axis == 1 or self.world_size == 1 else sum_over_ranks(own, self.group)
        out = 0.0
        if axis == 1:
            for owner, block in self._ring(self._pack(self.y, g, b, vec), self._m_sizes):
                if owner == self.rank:
                    out = out + self._local.plan_matvec(f, g, a, b, eps, vec, 1)
                else:
                    out = out + self._block(self.x, block[..., :-3]).plan_matvec(
                        f, block[..., -3], a, block[..., -2], eps, block[..., -1], 1
                    )
            return out
        for owner, block in self._ring(self._pack(self.x, f, a, vec), self._n_sizes):
            if owner == self.rank:
                out = out + self._local.plan_matvec(f, g, a, b, eps, vec, 0)
            else:
                out = out + self._block(block[..., :-3], self.y).plan_matvec(
                    block[..., -3], g, block[..., -2], b, eps, block[..., -1], 0
                )
        return out

    def row_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks' rows (all-reduce SUM)."""
        return sum_over_ranks(v.sum(-1), self.group)

    def col_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum over the columns: local when ``y`` is replicated, all-reduced in ring mode."""
        return sum_over_ranks(v.sum(-1), self.group) if self.ring else v.sum(-1)

    # -- materialisation ------------------------------------------------------------------------
    def plan(self, f, g, a, b, eps) -> torch.Tensor:
        """This rank's rows of the plan, ``(B, n_local, m)`` (replicated mode only)."""
        if self.ring:
            raise InputError(
                "ring mode never gathers all of y on one rank, so the plan rows cannot be "
                "materialised; use result.apply(v) / result.marginals() instead of result.plan."
            )
        return self._local.plan(f, g, a, b, eps)

    def cost_matrix(self) -> torch.Tensor:
        raise InputError(
            "ShardedPointCloud never materialises the cost matrix; solvers that need it (the "
            "Newton and smooth-OT solvers) do not run on a sharded geometry. Use entrokit.sinkhorn."
        )

    # -- differentiation ------------------------------------------------------------------------
    def check_grad_mode(self, grad: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if grad == "unroll":
            raise InputError(
                "grad='unroll' is not supported on ShardedPointCloud (the cross-rank reductions of "
                "the iterations have no backward); use grad='envelope', the exact gradient of value."
            )
        if not torch.is_grad_enabled():
            return
        if a.requires_grad or b.requires_grad:
            raise InputError(
                "gradients with respect to the weights a, b are not supported on ShardedPointCloud; "
                "detach them (gradients with respect to the points use grad='envelope')."
            )
        if grad == "implicit" and (self.x.requires_grad or self.y.requires_grad):
            raise InputError(
                "grad='implicit' is not supported on ShardedPointCloud (its adjoint solve needs "
                "inner products over every rank); pass grad='envelope' for the exact gradient of "
                "value with respect to the points."
            )
        if self.ring and self.y.requires_grad:
            raise InputError(
                "ring mode does not compute gradients with respect to y (its terms live on the "
                "other ranks); detach y, or use the replicated mode (ring=False)."
            )
