r"""Voxel-grid clustering and a block-sparse (truncated) point-cloud cost for low-dimensional
data: GeomLoss's multiscale trick, made batched and rigorous.

For :math:`d \le 3` the entropic plan
:math:`P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}` of the squared Euclidean
cost :math:`C_{ij} = \|x_i - y_j\|^2` is concentrated near the graph of the transport
map: most of its :math:`n m` entries are far below any tolerance. This module

1. bins the points in cubic voxels (:func:`grid_cluster`), so that every cluster is a
   contiguous range of the cluster-sorted points;
2. bounds, for every pair of clusters :math:`(I, J)`, the largest exponent and the total
   plan mass of the block :math:`I \times J` (:func:`cluster_pair_bounds`);
3. keeps only the blocks these bounds cannot rule out (:func:`truncation_mask`) and
   computes every reduction of the :class:`~entrokit.geometry.base.Geometry` contract on
   the kept blocks only (:class:`TruncatedPointCloud`).

**Block bound.** Give every cluster an anchor :math:`c_I` (the centre of its bounding box)
and a radius :math:`r_I = \max_{i \in I}\|x_i - c_I\|`. With
:math:`\delta_i = x_i - c_I`, :math:`\eta_j = y_j - c_J` and
:math:`\Delta = c_I - c_J`, expanding the squares gives the exact identity

.. math::

    C_{ij} = C(x_i, c_J) + C(c_I, y_j) - \|\Delta\|^2 - 2\langle\delta_i, \eta_j\rangle,

and :math:`\langle\delta_i,\eta_j\rangle \le r_I r_J`, hence for :math:`i \in I, j \in J`

.. math::
    :label: block-max

    f_i + g_j - C_{ij} \;\le\; \hat F_{IJ} + \hat G_{IJ} + \|\Delta\|^2 + 2 r_I r_J,
    \qquad \hat F_{IJ} = \max_{i\in I}\big(f_i - C(x_i, c_J)\big),\quad
    \hat G_{IJ} = \max_{j\in J}\big(g_j - C(c_I, y_j)\big),

.. math::
    :label: block-mass

    \sum_{i\in I,\, j\in J} P_{ij} \;\le\;
    \exp\Big(A_{IJ} + B_{IJ} + \frac{\|\Delta\|^2 + 2 r_I r_J}{\varepsilon}\Big),
    \quad A_{IJ} = \log\sum_{i\in I} a_i e^{(f_i - C(x_i, c_J))/\varepsilon},\quad
    B_{IJ} = \log\sum_{j \in J} b_j e^{(g_j - C(c_I, y_j))/\varepsilon}.

Both bounds cost one pass over the fine points against the other side's anchors
(:math:`O(n K_y + m K_x)`, like one coarse-to-fine soft-min). The term
:math:`2 r_I r_J` is the safety margin from the cluster diameters; the tilt
:math:`\hat F_{IJ}` (the fine potential *minus the cost to the other anchor*) captures that
the exponent varies little across a block near the transport map, which a bound built
from :math:`\max_{i\in I} f_i` and the distance of the boxes would miss by
:math:`2\|\Delta\|(r_I + r_J)/\varepsilon`.

**Keep rule** (:func:`truncation_mask`). A block is kept when

* its exponent bound :eq:`block-max` is :math:`\ge -\tau\varepsilon` (GeomLoss's rule,
  ``truncate`` :math:`=\tau`, evaluated with the safety margin: no entry with
  :math:`f_i + g_j - C_{ij} \ge -\tau\varepsilon` is ever dropped), or
* it is needed so that the dropped blocks' mass bounds :eq:`block-mass` sum to at most a
  budget (blocks are dropped in increasing order of their bound), or
* it is, for a row (column) cluster, the block with the largest bound on the soft-min
  sum, so that every point keeps a column (row) of positive weight and finite potentials.

**Zero weights** are handled on purpose: zero-weight points are clustered like the others
(their potentials are still computed, over their kept blocks); they do not enter the mass
bounds, the default grid extent or the centring of the coordinates, so zero-weight
padding points far from the data cost at most a few extra clusters.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from entrokit._errors import InputError
from entrokit._validation import as_float_tensor, check_positive_int, check_same_dtype_device
from entrokit.geometry._online import lse_online, tile_entries
from entrokit.geometry.base import PointGeometry, exp_floor, logsumexp_pair, plan_block
from entrokit.geometry.costs import SqEuclidean
from entrokit.geometry.pointcloud import check_point_shapes

__all__ = [
    "GridClusters",
    "grid_cluster",
    "default_cluster_scale",
    "PairBounds",
    "cluster_pair_bounds",
    "truncation_mask",
    "extrapolate_potentials",
    "TruncatedPointCloud",
    "DEFAULT_CELLS",
]

#: Cells of the default grid: a cube of diagonal ``diam`` is cut into this many voxels.
DEFAULT_CELLS = 2000
# Entries (rows x kept columns, padding included) computed per batched block product, and
# of one fine-points x anchors tile of the bounds: the tile table of the tiling engine
# (entrokit.geometry._online.TILES), by device.
# Clusters of more than this many budgets of entries are cut into row slices.
_SLICE_FACTOR = 4
# A group of clusters stops growing when padding would exceed this factor.
_MAX_PADDING = 1.25
# Voxel coordinates are clipped to +- this (only zero-weight outliers get near it).
_VOXEL_CLIP = 1 << 20
_SQ = SqEuclidean()


# ---------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GridClusters:
    r"""Voxel-grid clusters of a batch of ``B`` point clouds of ``n`` points each.

    The cluster structure is per problem; problems with fewer than ``K`` clusters are
    padded with empty clusters (count 0, weight 0) at the end.

    Attributes:
        perm: ``[B, n]`` long. ``perm[b, k]`` is the index, in the user's order, of the
            ``k``-th point in cluster-sorted order (cluster 0 first, then cluster 1, ...).
        labels: ``[B, n]`` long, the cluster of every point, in the user's order.
        offsets: ``[B, K + 1]`` long: cluster ``I`` of problem ``b`` holds the sorted
            positions ``offsets[b, I]:offsets[b, I + 1]``.
        counts: ``[B, K]`` long, points per cluster (0 for padding).
        n_clusters: ``[B]`` long, real clusters per problem (the first ``n_clusters[b]``).
        weights: ``[B, K]``, sum of the point weights of each cluster.
        centroids: ``[B, K, d]``, weighted mean of each cluster (plain mean where the
            cluster weighs 0; padding repeats cluster 0): the points of the coarse problem.
        anchors: ``[B, K, d]`` float64, centre of each cluster's bounding box.
        radii: ``[B, K]`` float64, :math:`\max_{i\in I}\|x_i - c_I\|` around the anchor.
        scale: ``[B]`` float64, the voxel side.
    """

    perm: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    n_clusters: torch.Tensor
    weights: torch.Tensor
    centroids: torch.Tensor
    anchors: torch.Tensor
    radii: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, n, K)``."""
        return (self.perm.shape[0], self.perm.shape[1], self.counts.shape[1])

    @property
    def real(self) -> torch.Tensor:
        """``[B, K]`` bool: the clusters that hold points."""
        return self.counts > 0


def _positive_weight_box(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` ``[B, d]`` of the points of positive weight (all points where a
    problem has none)."""
    x = x.detach()
    if w is None:
        return x.amin(1), x.amax(1)
    pos = (w.detach() > 0).unsqueeze(-1)
    none = ~pos.any(1)  # (B, 1)
    pos = pos | none.unsqueeze(1)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    return torch.where(pos, x, inf).amin(1), torch.where(pos, x, -inf).amax(1)


def default_cluster_scale(x: torch.Tensor, y: torch.Tensor | None = None, a: torch.Tensor | None = None,
                          b: torch.Tensor | None = None, *, cells: int = DEFAULT_CELLS) -> torch.Tensor:
    r"""GeomLoss's default voxel side, per problem: :math:`s = D / (\sqrt d\, N^{1/d})`
    with :math:`D` the diagonal of the joint bounding box of the points of positive weight
    of ``x`` (and ``y``) and :math:`N` = ``cells`` (2000).

    A cube of diagonal :math:`D` (side :math:`D/\sqrt d`) is cut into exactly :math:`N`
    cubic cells, so each cloud occupies at most about :math:`N` cells (fewer when its box
    is elongated or it fills it sparsely: about 1000-2000 in practice). A problem whose
    points all coincide gets :math:`s = 1`. Shapes: ``x [B, n, d]``, ``a [B, n]``;
    returns ``[B]`` float64.
    """
    lo, hi = _positive_weight_box(x, a)
    if y is not None:
        lo_y, hi_y = _positive_weight_box(y, b)
        lo, hi = torch.minimum(lo, lo_y), torch.maximum(hi, hi_y)
    d = x.shape[-1]
    diam = (hi - lo).to(torch.float64).norm(dim=-1)
    s = diam / (math.sqrt(d) * cells ** (1.0 / d))
    return torch.where(s > 0, s, torch.ones_like(s))


def grid_cluster(x: torch.Tensor, weights: torch.Tensor | None = None,
                 cluster_scale: float | torch.Tensor | None = None) -> GridClusters:
    r"""Bin a batch of point clouds ``x [B, n, d]`` in cubic voxels of side ``cluster_scale``.

    Voxel ``k`` of problem ``b`` is :math:`\lfloor (x - o_b)/s_b \rfloor` with :math:`o_b`
    the lower corner of the box of the points of positive weight; voxels are ordered
    lexicographically (last coordinate fastest), so neighbouring voxels are close in the
    sorted order. Like pykeops' ``grid_cluster`` + ``sort_clusters``, in plain torch and
    batched (one sort of ``B n`` keys).

    Args:
        x: points ``[B, n, d]``.
        weights: ``[B, n]`` nonnegative weights (default 1); they give the cluster
            weights and centroids, and only points of positive weight set the grid origin
            and the default scale.
        cluster_scale: voxel side, a float or a ``[B]`` tensor (default
            :func:`default_cluster_scale`).
    """
    with torch.no_grad():
        x = x.detach()
        B, n, d = x.shape
        dev = x.device
        w = torch.ones(B, n, dtype=x.dtype, device=dev) if weights is None else weights.detach().to(x.dtype)
        if cluster_scale is None:
            scale = default_cluster_scale(x, None, w)
        else:
            scale = torch.as_tensor(cluster_scale, dtype=torch.float64, device=dev).expand(B).clone()
        lo, _ = _positive_weight_box(x, w)
        rel = (x.to(torch.float64) - lo.to(torch.float64).unsqueeze(1)) / scale.view(B, 1, 1)
        vox = torch.floor(rel).clamp(-_VOXEL_CLIP, _VOXEL_CLIP).to(torch.int64)
        vox = vox - vox.amin(1, keepdim=True)
        extent = vox.amax(1) + 1  # (B, d)
        span = int(extent.prod(-1).max())
        if span * B < (1 << 62):
            key = vox[..., 0]
            for k in range(1, d):
                key = key * extent[:, k].unsqueeze(1) + vox[..., k]
            key = key + torch.arange(B, device=dev).unsqueeze(1) * span
            sorted_key, order = torch.sort(key.reshape(-1), stable=True)
            new = torch.ones_like(sorted_key, dtype=torch.bool)
            new[1:] = sorted_key[1:] != sorted_key[:-1]
        else:  # pathological coordinates (zero-weight outliers): lexicographic unique
            rows = torch.cat([torch.arange(B, device=dev).repeat_interleave(n).unsqueeze(1), vox.reshape(-1, d)], 1)
            _, inv = torch.unique(rows, dim=0, return_inverse=True)
            _, order = torch.sort(inv, stable=True)
            s_inv = inv[order]
            new = torch.ones_like(s_inv, dtype=torch.bool)
            new[1:] = s_inv[1:] != s_inv[:-1]
        # problem b owns the sorted positions [b n, (b + 1) n): the key starts with b
        new = new.view(B, n).clone()
        new[:, 0] = True
        local_sorted = new.to(torch.int64).cumsum(1) - 1  # cluster of each sorted point
        n_clusters = local_sorted[:, -1] + 1
        K = int(n_clusters.max())
        perm = order.view(B, n) - torch.arange(B, device=dev).unsqueeze(1) * n
        labels = torch.empty_like(perm).scatter_(1, perm, local_sorted)
        counts = torch.zeros(B, K, dtype=torch.int64, device=dev).scatter_add_(1, local_sorted, torch.ones_like(local_sorted))
        offsets = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=dev), counts.cumsum(1)], 1)

        idx = labels.unsqueeze(-1).expand(B, n, d)
        csum = torch.zeros(B, K, dtype=x.dtype, device=dev).scatter_add_(1, labels, w)
        wx = torch.zeros(B, K, d, dtype=x.dtype, device=dev).scatter_add_(1, idx, w.unsqueeze(-1) * x)
        sx = torch.zeros(B, K, d, dtype=x.dtype, device=dev).scatter_add_(1, idx, x)
        cnt = counts.clamp_min(1).to(x.dtype).unsqueeze(-1)
        heavy = (csum > 0).unsqueeze(-1)
        centroids = torch.where(heavy, wx / torch.where(heavy, csum.unsqueeze(-1), torch.ones_like(cnt)), sx / cnt)
        x64 = x.to(torch.float64)
        box_lo = torch.full((B, K, d), float("inf"), dtype=torch.float64, device=dev).scatter_reduce_(1, idx, x64, "amin")
        box_hi = torch.full((B, K, d), -float("inf"), dtype=torch.float64, device=dev).scatter_reduce_(1, idx, x64, "amax")
        real = (counts > 0).unsqueeze(-1)
        anchors = torch.where(real, 0.5 * (box_lo + box_hi), torch.zeros_like(box_lo))
        dist = (x64 - anchors.gather(1, idx)).norm(dim=-1)
        radii = torch.zeros(B, K, dtype=torch.float64, device=dev).scatter_reduce_(1, labels, dist, "amax")
        # padding clusters: copy cluster 0 (finite, never kept: they hold no point)
        centroids = torch.where(real, centroids, centroids[:, :1])
        anchors = torch.where(real, anchors, anchors[:, :1])
        return GridClusters(perm=perm, labels=labels, offsets=offsets, counts=counts, n_clusters=n_clusters,
                            weights=csum, centroids=centroids, anchors=anchors, radii=radii, scale=scale)


# ---------------------------------------------------------------------------------------
# block bounds and the keep rule
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PairBounds:
    r"""Bounds on every cluster pair ``(I, J)`` (``-inf`` where a cluster is empty).

    Attributes:
        max_exponent: ``[B, K_x, K_y]`` float64, right-hand side of :eq:`block-max`, in
            cost units.
        log_mass: ``[B, K_x, K_y]`` float64, logarithm of the right-hand side of
            :eq:`block-mass` (``-inf`` where a cluster weighs 0).
        row_best: ``[B, K_x]`` long, for every row cluster the column cluster of largest
            bound on its soft-min sum, :math:`\hat F_{IJ}/\varepsilon + B_{IJ} + m_{IJ}` with
            :math:`m_{IJ} = (\|\Delta\|^2 + 2r_Ir_J)/\varepsilon` (it has positive weight).
        col_best: ``[B, K_y]`` long, the same for columns,
            :math:`A_{IJ} + \hat G_{IJ}/\varepsilon + m_{IJ}`.
        rows_real, cols_real: ``[B, K_x]``, ``[B, K_y]`` bool, the clusters that hold points.
        eps: the :math:`\varepsilon` they were computed for.
    """

    max_exponent: torch.Tensor
    log_mass: torch.Tensor
    row_best: torch.Tensor
    col_best: torch.Tensor
    rows_real: torch.Tensor
    cols_real: torch.Tensor
    eps: float

    def dropped_mass(self, keep: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64: bound on the plan mass outside the kept blocks (sum of
        :eq:`block-mass` over the dropped ones)."""
        lm = self.log_mass.masked_fill(keep.to(self.log_mass.device), -float("inf"))
        return torch.exp(lm).flatten(1).sum(-1)


def _side_bounds(points: torch.Tensor, pot: torch.Tensor, log_w: torch.Tensor, cl: GridClusters,
                 other_anchors: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per (own cluster, other anchor): :math:`\max_{i\in I}(f_i - C(x_i, c_J))` and
    :math:`\log\sum_{i\in I} w_i e^{(f_i - C(x_i, c_J))/\varepsilon}`, ``[B, K, K_o]``
    float64, one pass over the points in tiles of whole clusters."""
    B, n, _ = points.shape
    K, Ko = cl.counts.shape[1], other_anchors.shape[1]
    dev = points.device
    mx = torch.full((B, K, Ko), -float("inf"), dtype=torch.float64, device=dev)
    lse = torch.full((B, K, Ko), -float("inf"), dtype=torch.float64, device=dev)
    tile = max(1, tile_entries(dev) // max(Ko, 1))
    for b in range(B):
        kb = int(cl.n_clusters[b])
        offs = cl.offsets[b, : kb + 1].tolist()
        i0 = 0
        while i0 < kb:
            i1 = max(i0 + 1, min(kb, bisect.bisect_right(offs, offs[i0] + tile) - 1))
            idx = cl.perm[b, offs[i0]: offs[i1]]
            lengths = cl.counts[b, i0:i1]
            # squared distances of centred float64 coordinates (rounding ~1e-16 of the norms)
            z = _SQ.tile(points[b, idx], other_anchors[b]).neg_().add_(pot[b, idx].unsqueeze(1))  # f_i - C(x_i, c_J)
            mx[b, i0:i1] = torch.segment_reduce(z, "max", lengths=lengths, axis=0)
            z.div_(eps).add_(log_w[b, idx].unsqueeze(1))  # log w_i + (f_i - C(x_i, c_J))/eps
            top = torch.segment_reduce(z, "max", lengths=lengths, axis=0)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            z.sub_(top.repeat_interleave(lengths, 0)).exp_()
            lse[b, i0:i1] = torch.segment_reduce(z, "sum", lengths=lengths, axis=0).log_().add_(top)
            i0 = i1
    return mx, lse


def cluster_pair_bounds(x: torch.Tensor, y: torch.Tensor, x_clusters: GridClusters, y_clusters: GridClusters,
                        f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        eps: float) -> PairBounds:
    r"""Bounds :eq:`block-max` and :eq:`block-mass` for every cluster pair, in float64.

    Shapes: ``x [B, n, d]``, ``y [B, m, d]``, potentials and weights ``[B, n]``/``[B, m]``
    (the user's order). Cost: :math:`O(n K_y + m K_x)` (one pass over the fine points
    against the other side's anchors, in tiles) and a few ``[B, K_x, K_y]`` arrays.
    """
    from entrokit.problem import log_weights

    with torch.no_grad():
        origin = _centre(x_clusters, y_clusters).unsqueeze(1)  # distances are translation invariant
        x64, y64 = x.detach().to(torch.float64) - origin, y.detach().to(torch.float64) - origin
        xa, ya = x_clusters.anchors - origin, y_clusters.anchors - origin
        f64, g64 = f.detach().to(torch.float64), g.detach().to(torch.float64)
        la, lb = log_weights(a.detach().to(torch.float64)), log_weights(b.detach().to(torch.float64))
        max_f, lse_f = _side_bounds(x64, f64, la, x_clusters, ya, eps)  # (B, Kx, Ky)
        max_g, lse_g = _side_bounds(y64, g64, lb, y_clusters, xa, eps)  # (B, Ky, Kx)
        max_g, lse_g = max_g.transpose(1, 2), lse_g.transpose(1, 2)
        # the margin |Delta|^2 + 2 r_I r_J of (block-max), in place to keep few K_x x K_y arrays
        margin = torch.cdist(xa, ya).square_()
        margin.baddbmm_(x_clusters.radii.unsqueeze(2), y_clusters.radii.unsqueeze(1), alpha=2.0)
        rows_real, cols_real = x_clusters.real, y_clusters.real
        row_best = (max_f + margin).div_(eps).add_(lse_g).argmax(2)
        col_best = (max_g + margin).div_(eps).add_(lse_f).argmax(1)
        max_exponent = max_f.add_(max_g).add_(margin)  # (block-max)
        del max_g
        log_mass = lse_f.add_(lse_g).add_(margin.div_(eps))  # (block-mass)
        real = rows_real.unsqueeze(2) & cols_real.unsqueeze(1)
        max_exponent.masked_fill_(~real, -float("inf"))
        log_mass.masked_fill_(~real, -float("inf"))
        return PairBounds(max_exponent, log_mass, row_best, col_best, rows_real, cols_real, float(eps))


def truncation_mask(bounds: PairBounds, *, truncate: float = 5.0, mass_budget: float | torch.Tensor | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    r"""The kept blocks ``[B, K_x, K_y]`` bool (module docstring, *Keep rule*): exponent
    bound :math:`\ge -\tau\varepsilon` (``truncate`` :math:`= \tau`), the best block of every
    real row and column cluster, and, with ``mass_budget`` (a float or ``[B]``), the blocks
    of largest mass bound until the dropped ones sum to at most the budget. ``keep``
    (optional) is a previous mask to enlarge."""
    with torch.no_grad():
        out = bounds.max_exponent >= -truncate * bounds.eps
        if keep is not None:
            out |= keep.to(out.device)
        B, Kx, Ky = out.shape
        # every real row / column cluster keeps its best block (finite soft-mins)
        bi = torch.arange(B, device=out.device)
        rows = bounds.rows_real.nonzero()
        out[rows[:, 0], rows[:, 1], bounds.row_best[rows[:, 0], rows[:, 1]]] = True
        cols = bounds.cols_real.nonzero()
        out[cols[:, 0], bounds.col_best[cols[:, 0], cols[:, 1]], cols[:, 1]] = True
        out &= bounds.rows_real.unsqueeze(2) & bounds.cols_real.unsqueeze(1)
        if mass_budget is not None:
            budget = torch.as_tensor(mass_budget, dtype=torch.float64).expand(B).tolist()
            for p in bi.tolist():
                cand = bounds.log_mass[p][~out[p]]
                if cand.numel() == 0:
                    continue
                srt = torch.sort(cand).values  # drop the smallest bounds first
                cum = torch.cumsum(torch.exp(srt), 0)
                n_drop = int((cum <= budget[p]).sum())
                if n_drop < srt.numel():
                    out[p] |= bounds.log_mass[p] >= srt[n_drop]
        return out


def extrapolate_potentials(x: torch.Tensor, y: torch.Tensor, x_clusters: GridClusters, y_clusters: GridClusters,
                           f_coarse: torch.Tensor, g_coarse: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fine potentials from coarse ones by one soft-min each (GeomLoss's extrapolation):

    .. math::

        f_i = -\varepsilon\log\sum_J \bar b_J e^{(\bar g_J - C(x_i, \bar y_J))/\varepsilon},
        \qquad
        g_j = -\varepsilon\log\sum_I \bar a_I e^{(\bar f_I - C(\bar x_I, y_j))/\varepsilon},

    with :math:`\bar x, \bar a` (:math:`\bar y, \bar b`) the centroids and weights of the
    clusters: the soft :math:`c`-transforms of the coarse potentials, evaluated at the
    points, on the tiles of :mod:`entrokit.geometry._online` (:math:`O(n K_y + m K_x)`);
    returns ``[B, n]``, ``[B, m]`` in the user's order and the points' dtype.
    """
    from entrokit.problem import log_weights

    with torch.no_grad():
        origin = _centre(x_clusters, y_clusters).to(x.dtype).unsqueeze(1)
        x, y = x.detach() - origin, y.detach() - origin
        xc = x_clusters.centroids.to(x.dtype) - origin
        yc = y_clusters.centroids.to(x.dtype) - origin
        # soft-mins on the tiling engine (squared Euclidean tiles, centred)
        f = -eps * lse_online(x, yc, g_coarse.to(x.dtype) + eps * log_weights(y_clusters.weights.to(x.dtype)), eps, _SQ)
        g = -eps * lse_online(y, xc, f_coarse.to(x.dtype) + eps * log_weights(x_clusters.weights.to(x.dtype)), eps, _SQ)
        return f, g


# ---------------------------------------------------------------------------------------
# block layout
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Group:
    """``G`` "out" clusters computed together: ``rows [G, R]`` and ``cols [G, L]`` index
    the flattened points (``b * n + i``, user order; the last index is a dummy point),
    ``problem [G]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    problem: torch.Tensor


@dataclass(frozen=True, eq=False)
class _Layout:
    """The kept blocks seen from one side: each "out" cluster reduces over the points of
    its kept "in" clusters. ``gather_back [B n_out]`` maps every out point to its row in
    the concatenated group outputs (the last row is a dummy, the empty reduction)."""

    groups: tuple[_Group, ...]
    gather_back: torch.Tensor
    n_out: int
    n_in: int
    batch: int
    max_entries: int
    max_in_entries: int
    computed_entries: int


def _index_dtype(size: int) -> torch.dtype:
    return torch.int32 if size < (1 << 31) - 1 else torch.int64


def _size_bucket(v: torch.Tensor) -> torch.Tensor:
    """Integer bucket of a positive size: exact up to 8, then geometric by 15%."""
    v = v.to(torch.float64)
    geo = 8 + torch.floor(torch.log(v / 8.0) / math.log(1.15)).to(torch.int64)
    return torch.where(v <= 8, v.to(torch.int64), geo + 1)


@dataclass(frozen=True, eq=False)
class _Runs:
    """Runs of consecutive kept in-clusters (contiguous ranges of sorted in-points), by
    out cluster ``c = b * K_out + k``: run ``r`` starts at the flat sorted in-position
    ``start[r]`` and holds ``length[r]`` points; the runs of ``c`` are
    ``ptr[c]:ptr[c + 1]`` and hold ``columns[c]`` points in all."""

    start: torch.Tensor
    length: torch.Tensor
    ptr: torch.Tensor
    columns: torch.Tensor


def _kept_runs(keep: torch.Tensor, in_cl: GridClusters) -> _Runs:
    """The :class:`_Runs` of ``keep [B, K_out, K_in]``."""
    dev = keep.device
    B, Ko, Ki = keep.shape
    k8 = torch.nn.functional.pad(keep.reshape(B * Ko, Ki).to(torch.int8), (1, 1))
    dk = k8[:, 1:] - k8[:, :-1]
    starts = (dk == 1).nonzero()  # (run, [out cluster, first in-cluster]) sorted by out cluster
    stops = (dk == -1).nonzero()  # (run, [out cluster, last in-cluster + 1])
    run_row = starts[:, 0]
    run_b = run_row // Ko
    in_off = in_cl.offsets
    start = in_off[run_b, starts[:, 1]] + run_b * in_cl.perm.shape[1]  # flat sorted position
    length = in_off[run_b, stops[:, 1]] - in_off[run_b, starts[:, 1]]
    columns = torch.zeros(B * Ko, dtype=torch.int64, device=dev).index_add_(0, run_row, length)
    ptr = torch.zeros(B * Ko + 1, dtype=torch.int64, device=dev)
    ptr[1:] = torch.bincount(run_row, minlength=B * Ko).cumsum(0)
    return _Runs(start, length, ptr, columns)


def _units(R: torch.Tensor, L: torch.Tensor, budget: int) -> tuple[list[int], list[int], list[int]]:
    """The units of work, in packing order, as ``(cluster, first row, rows)`` lists: an out
    cluster with ``R`` rows against ``L`` columns, or a slice of its rows when rows x
    columns exceed :data:`_SLICE_FACTOR` budgets (slices copy the column list, so only huge
    clusters are cut); ordered by buckets of ~15% of rows, then of columns (padding at most
    ~1.3x), largest first."""
    dev = R.device
    active = ((R > 0) & (L > 0)).nonzero().squeeze(1)
    Ra = R[active]
    cap = _SLICE_FACTOR * budget
    slices = torch.clamp((Ra * L[active] + cap - 1) // cap, min=1)
    unit_rows = (Ra + slices - 1) // slices  # rows per slice
    n_split = (Ra + unit_rows - 1) // unit_rows  # no empty slice
    unit_cid = active.repeat_interleave(n_split)
    unit_first = torch.arange(unit_cid.numel(), device=dev) - torch.repeat_interleave(n_split.cumsum(0) - n_split, n_split)
    unit_r0 = unit_first * unit_rows.repeat_interleave(n_split)
    unit_R = torch.minimum(unit_rows.repeat_interleave(n_split), R[unit_cid] - unit_r0)
    order = torch.zeros(0, dtype=torch.int64, device=dev)
    if unit_cid.numel():
        r_bucket, l_bucket = _size_bucket(unit_R), _size_bucket(L[unit_cid])
        order = torch.argsort(r_bucket * (int(l_bucket.max()) + 1) + l_bucket, descending=True, stable=True)
    return unit_cid[order].tolist(), unit_r0[order].tolist(), unit_R[order].tolist()


def _pack(rows: list[int], cols: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """Consecutive units (``rows x cols`` each) packed greedily into groups of at most
    ``budget`` padded entries and :data:`_MAX_PADDING` times their useful entries:
    ``(first unit, end, padded rows, padded columns)`` per group."""
    groups, pos = [], 0
    while pos < len(rows):
        r_g, l_g = rows[pos], cols[pos]
        useful, end = r_g * l_g, pos + 1
        while end < len(rows):
            r_new, l_new = max(r_g, rows[end]), max(l_g, cols[end])
            padded = (end + 1 - pos) * r_new * l_new
            useful_new = useful + rows[end] * cols[end]
            if padded > budget or padded > _MAX_PADDING * useful_new:
                break
            r_g, l_g, useful = r_new, l_new, useful_new
            end += 1
        groups.append((pos, end, r_g, l_g))
        pos = end
    return groups


def _group_cols(cid: torch.Tensor, l_g: int, runs: _Runs, in_gperm: torch.Tensor) -> torch.Tensor:
    """``[G, l_g]``: the concatenated runs of each out cluster ``cid``, as flat user indices
    of the in-points, padded with the dummy point (the last entry of ``in_gperm``)."""
    dev = cid.device
    nr = runs.ptr[cid + 1] - runs.ptr[cid]
    slot_of_run = torch.repeat_interleave(torch.arange(cid.numel(), device=dev), nr)
    run_ids = torch.repeat_interleave(runs.ptr[cid], nr) + (
        torch.arange(int(nr.sum()), device=dev) - torch.repeat_interleave(nr.cumsum(0) - nr, nr))
    lens = runs.length[run_ids]
    within = lens.cumsum(0) - lens  # exclusive offsets over all runs of the group
    # offset of each run inside its own cluster's column list
    within = within - torch.repeat_interleave(within[nr.cumsum(0) - nr], nr)
    ent_run = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens)
    t = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    cols = torch.full((cid.numel(), l_g), in_gperm.shape[0] - 1, dtype=torch.int64, device=dev)
    cols[slot_of_run[ent_run], within[ent_run] + t] = in_gperm[runs.start[run_ids][ent_run] + t]
    return cols


def _flat_perm(cl: GridClusters) -> torch.Tensor:
    """Flat user index ``b * n + i`` of every sorted position of a batch of clusters."""
    B, n = cl.perm.shape
    return (cl.perm + torch.arange(B, device=cl.perm.device).unsqueeze(1) * n).reshape(-1)


def _gather_back(lay: _Layout, parts: list, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """``[B, n_out]``: each out point's entry of the concatenated group outputs ``parts``
    (``fill``, the empty reduction, for a point in no group)."""
    dummy = torch.full((1,), fill, dtype=dtype, device=lay.gather_back.device)
    return torch.cat([*parts, dummy]).index_select(0, lay.gather_back).view(lay.batch, lay.n_out)


def _build_layout(keep: torch.Tensor, out_cl: GridClusters, in_cl: GridClusters, budget: int) -> _Layout:
    """Runs of consecutive kept in-clusters (contiguous ranges of sorted in-points) per
    out-cluster, packed into groups of similar (columns, rows) of at most ``budget``
    padded entries (clusters larger than the budget are cut into row slices)."""
    dev = keep.device
    B, Ko, _ = keep.shape
    n_out, n_in = out_cl.perm.shape[1], in_cl.perm.shape[1]
    dummy_out, dummy_in = B * n_out, B * n_in
    # flat user index of every sorted position (+ a dummy)
    out_gperm = _flat_perm(out_cl)
    in_gperm = torch.cat([_flat_perm(in_cl), torch.tensor([dummy_in], device=dev)])
    runs = _kept_runs(keep, in_cl)
    u_cid, u_r0, u_R = _units(out_cl.counts.reshape(-1), runs.columns, budget)
    Ls = runs.columns.tolist()
    out_off = (out_cl.offsets[:, :-1] + torch.arange(B, device=dev).unsqueeze(1) * n_out).reshape(-1)
    idt_out, idt_in = _index_dtype(dummy_out + 1), _index_dtype(dummy_in + 1)

    groups: list[_Group] = []
    gather_back = torch.full((B * n_out,), -1, dtype=torch.int64, device=dev)
    out_rows = max_entries = max_in = computed = 0
    for pos, end, r_g, l_g in _pack(u_R, [Ls[c] for c in u_cid], budget):
        cid = torch.tensor(u_cid[pos:end], device=dev)
        r0 = torch.tensor(u_r0[pos:end], device=dev)
        n_rows = torch.tensor(u_R[pos:end], device=dev)
        G = end - pos
        # rows: (a slice of) the out cluster's sorted range, padded with the dummy point
        ar = torch.arange(r_g, device=dev)
        rvalid = ar.unsqueeze(0) < n_rows.unsqueeze(1)
        rpos = (out_off[cid].unsqueeze(1) + r0.unsqueeze(1) + ar).clamp_max(dummy_out - 1)
        rows = torch.where(rvalid, out_gperm[rpos], torch.full_like(rpos, dummy_out))
        cols = _group_cols(cid, l_g, runs, in_gperm)
        # where each out point's result lands in the concatenated outputs
        loc = out_rows + torch.arange(G * r_g, device=dev).view(G, r_g)
        gather_back[rows[rvalid]] = loc[rvalid]
        out_rows += G * r_g
        groups.append(_Group(rows.to(idt_out), cols.to(idt_in), torch.div(cid, Ko, rounding_mode="floor")))
        max_entries = max(max_entries, G * r_g * l_g)
        max_in = max(max_in, G * l_g)
        computed += G * r_g * l_g
    gather_back = torch.where(gather_back < 0, torch.full_like(gather_back, out_rows), gather_back)
    return _Layout(tuple(groups), gather_back, n_out, n_in, B, max_entries, max_in, computed)


# ---------------------------------------------------------------------------------------
# the geometry
# ---------------------------------------------------------------------------------------
class TruncatedPointCloud(PointGeometry):
    r"""Squared Euclidean cost :math:`C_{ij} = \|x_i - y_j\|^2` restricted to kept blocks
    of voxel clusters: the plan is :math:`P_{ij} = a_i b_j e^{(f_i+g_j-C_{ij})/\varepsilon}`
    on the kept blocks and 0 elsewhere, and every primitive (log-sum-exp pairs along both
    axes, :meth:`plan_reduce`, :meth:`plan_matvec`, marginals, :meth:`cost_bounds`) runs
    over the kept blocks only, in batched products of padded groups of clusters (a Python
    loop over groups of about :math:`2^{20}` entries, never over pairs).

    Points, potentials and weights are in the user's order (the cluster sort is inside
    the gather indices). Build it from potentials with :meth:`from_potentials` (or
    :meth:`from_coarse_potentials`); the driver is
    :func:`entrokit.solvers.multiscale.multiscale_sinkhorn`.

    Args:
        x: source points ``[..., n, d]``.
        y: target points ``[..., m, d]`` (same batch axes).
        keep: ``[B, K_x, K_y]`` bool, the kept cluster pairs (``B`` = product of the batch
            axes, 1 for one problem).
        x_clusters, y_clusters: the :class:`GridClusters` of ``x`` and ``y`` (flattened
            batch).
        block_entries: padded entries per batched block product (memory of one tile).

    :meth:`cost_matrix` returns the *full* dense cost (not truncated); :meth:`plan` the
    dense plan with zeros outside the kept blocks. The workspace buffers make an instance
    unsafe to share between threads.
    """

    def __init__(self, x, y, keep: torch.Tensor, *, x_clusters: GridClusters, y_clusters: GridClusters,
                 block_entries: int | None = None):
        x = as_float_tensor(x, "x")
        y = as_float_tensor(y, "y")
        check_same_dtype_device({"x": x, "y": y})
        check_point_shapes(x, y)
        batch_shape = tuple(x.shape[:-2])
        B = math.prod(batch_shape)
        n, m = x.shape[-2], y.shape[-2]
        if tuple(x_clusters.perm.shape) != (B, n) or tuple(y_clusters.perm.shape) != (B, m):
            raise InputError(
                f"clusters do not match the points: x_clusters for {tuple(x_clusters.perm.shape)} and y_clusters "
                f"for {tuple(y_clusters.perm.shape)} points, expected {(B, n)} and {(B, m)}; build them with "
                "grid_cluster(x.reshape(B, n, d), ...)."
            )
        if keep.dtype != torch.bool or tuple(keep.shape) != (B, x_clusters.counts.shape[1], y_clusters.counts.shape[1]):
            raise InputError(
                f"keep must be a bool tensor of shape {(B, x_clusters.counts.shape[1], y_clusters.counts.shape[1])} "
                f"(problems, x clusters, y clusters), got {keep.dtype} {tuple(keep.shape)}."
            )
        budget = check_positive_int(block_entries, "block_entries", allow_none=True) or tile_entries(x.device)
        self._block_entries = budget
        keep = keep.to(x.device)
        self.x, self.y = x, y
        self.keep = keep
        self.x_clusters, self.y_clusters = x_clusters, y_clusters
        self._batch_shape = batch_shape
        self._B = B
        # centring of the coordinates (C is translation invariant): the box of the
        # anchors of clusters of positive weight, so float32 keeps its digits
        self._origin = _centre(x_clusters, y_clusters).to(x.dtype)
        self._layouts = {1: _build_layout(keep, x_clusters, y_clusters, budget),
                         0: _build_layout(keep.transpose(1, 2).contiguous(), y_clusters, x_clusters, budget)}
        self._cache: dict = {}

    # -- construction from potentials --------------------------------------------------
    @classmethod
    def from_potentials(cls, x, y, f, g, eps: float, *, a=None, b=None, truncate: float = 5.0,
                        mass_budget: float | None = None, cluster_scale: float | None = None,
                        clusters: tuple[GridClusters, GridClusters] | None = None,
                        block_entries: int | None = None) -> TruncatedPointCloud:
        r"""Cluster the points (unless ``clusters`` is given) and keep the blocks that the
        bounds :eq:`block-max`/:eq:`block-mass` of the *fine* potentials ``f [..., n]``,
        ``g [..., m]`` at ``eps`` cannot rule out (:func:`truncation_mask`).

        ``a``, ``b`` (default uniform) enter the mass bounds; ``mass_budget`` enables the
        mass rule; ``truncate`` is :math:`\tau`.
        """
        x = as_float_tensor(x, "x")
        y = as_float_tensor(y, "y")
        check_point_shapes(x, y)
        B = math.prod(x.shape[:-2])
        n, m, d = x.shape[-2], y.shape[-2], x.shape[-1]
        x3, y3 = x.reshape(B, n, d), y.reshape(B, m, d)
        a3 = torch.full((B, n), 1.0 / n, dtype=x.dtype, device=x.device) if a is None else a.reshape(B, n)
        b3 = torch.full((B, m), 1.0 / m, dtype=x.dtype, device=x.device) if b is None else b.reshape(B, m)
        if clusters is None:
            scale = default_cluster_scale(x3, y3, a3, b3) if cluster_scale is None else cluster_scale
            clusters = (grid_cluster(x3, a3, scale), grid_cluster(y3, b3, scale))
        xc, yc = clusters
        bounds = cluster_pair_bounds(x3, y3, xc, yc, f.reshape(B, n), g.reshape(B, m), a3, b3, eps)
        keep = truncation_mask(bounds, truncate=truncate, mass_budget=mass_budget)
        return cls(x, y, keep, x_clusters=xc, y_clusters=yc, block_entries=block_entries)

    @classmethod
    def from_coarse_potentials(cls, x, y, f_coarse, g_coarse, eps: float, *, clusters: tuple[GridClusters, GridClusters],
                               a=None, b=None, truncate: float = 5.0, mass_budget: float | None = None,
                               block_entries: int | None = None) -> TruncatedPointCloud:
        r"""From potentials on the clusters ``[B, K_x]``, ``[B, K_y]`` (a coarse solve on the
        centroids): extrapolate them to the points by one soft-min
        (:func:`extrapolate_potentials`), then :meth:`from_potentials`."""
        B = math.prod(x.shape[:-2])
        x3, y3 = x.reshape(B, *x.shape[-2:]), y.reshape(B, *y.shape[-2:])
        f, g = extrapolate_potentials(x3, y3, *clusters, f_coarse, g_coarse, eps)
        return cls.from_potentials(x, y, f, g, eps, a=a, b=b, truncate=truncate, mass_budget=mass_budget,
                                   clusters=clusters, block_entries=block_entries)

    def with_keep(self, keep: torch.Tensor) -> TruncatedPointCloud:
        """The same points and clusters with another kept set."""
        return TruncatedPointCloud(self.x, self.y, keep, x_clusters=self.x_clusters, y_clusters=self.y_clusters,
                                   block_entries=self._block_entries)

    def pair_bounds(self, f, g, a, b, eps: float) -> PairBounds:
        """:func:`cluster_pair_bounds` for potentials/weights ``[B, n]``, ``[B, m]``."""
        B, (n, m) = self._B, self.shape
        return cluster_pair_bounds(self._x3, self._y3, self.x_clusters, self.y_clusters,
                                   f.reshape(B, n), g.reshape(B, m), a.reshape(B, n), b.reshape(B, m), eps)

    def dropped_mass_bound(self, f, g, a, b, eps: float) -> torch.Tensor:
        r"""``[B]`` float64 upper bound on :math:`\sum_{(i,j)\ \text{dropped}} P_{ij}` for the
        dense plan of these potentials (:eq:`block-mass` summed over the dropped blocks):
        the row and column marginals of the dense plan differ from the truncated plan's
        by at most this much in L1 each."""
        return self.pair_bounds(f, g, a, b, eps).dropped_mass(self.keep)

    # -- statistics -----------------------------------------------------------------------
    @property
    def kept_entries(self) -> torch.Tensor:
        """``[B]`` long: number of kept ``(i, j)`` pairs per problem."""
        cx, cy = self.x_clusters.counts, self.y_clusters.counts
        return (self.keep.to(torch.int64) * cx.unsqueeze(2) * cy.unsqueeze(1)).flatten(1).sum(-1)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """``[B]`` float64: kept pairs over :math:`n m`."""
        n, m = self.shape
        return self.kept_entries.to(torch.float64) / (n * m)

    @property
    def padding_overhead(self) -> float:
        """Entries computed per kept entry (padding of the batched block products)."""
        lay = self._layouts[1]
        return lay.computed_entries / max(1, int(self.kept_entries.sum()))

    def __repr__(self) -> str:
        frac = ", ".join(f"{float(v):.3g}" for v in self.kept_fraction[:4])
        return (
            f"TruncatedPointCloud(n={self.shape[0]}, m={self.shape[1]}, d={self.x.shape[-1]}, "
            f"clusters=({self.x_clusters.counts.shape[1]}, {self.y_clusters.counts.shape[1]}), "
            f"kept_fraction=[{frac}], batch={self.batch_shape})"
        )

    # -- metadata ---------------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self._batch_shape

    @property
    def is_online(self) -> bool:
        return True

    @property
    def _x3(self) -> torch.Tensor:
        return self.x.reshape(self._B, *self.x.shape[-2:])

    @property
    def _y3(self) -> torch.Tensor:
        return self.y.reshape(self._B, *self.y.shape[-2:])

    def _share(self, x, y, batch_shape=None, keep_cache: bool = False) -> TruncatedPointCloud:
        out = object.__new__(TruncatedPointCloud)
        out.__dict__.update(self.__dict__)
        out.x, out.y = x, y
        out._batch_shape = tuple(batch_shape) if batch_shape is not None else tuple(x.shape[:-2])
        out._origin = self._origin.to(x.dtype)
        out._cache = self._cache if keep_cache else {}
        return out

    def reshape_batch(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        if math.prod(batch_shape) != self._B:
            raise InputError(f"cannot reshape a batch of {self._B} problems to {batch_shape}.")
        (n, m), d = self.shape, self.x.shape[-1]
        return self._share(self.x.reshape(*batch_shape, n, d), self.y.reshape(*batch_shape, m, d), batch_shape,
                           keep_cache=True)

    def detach(self) -> TruncatedPointCloud:
        if not (self.x.requires_grad or self.y.requires_grad):
            return self
        return self._share(self.x.detach(), self.y.detach(), keep_cache=True)

    def rebuild(self, x, y):
        return self._share(x, y)

    # -- dense views ------------------------------------------------------------------------
    def cost_matrix(self) -> torch.Tensor:
        """The full dense cost ``[..., n, m]`` (not truncated; materialises n m entries)."""
        o = self._origin.view(self._B, 1, -1)
        return _SQ.tile(self._x3 - o, self._y3 - o).reshape(*self.batch_shape, *self.shape)

    def plan(self, f, g, a, b, eps) -> torch.Tensor:
        """The dense plan ``[B, n, m]``: kept blocks, zeros elsewhere (materialised)."""
        B, (n, m) = self._B, self.shape
        vals, flat = [], []
        for grp, P in self._plan_blocks(1, f, g, a, b, eps):
            rows, cols = grp.rows.long(), grp.cols.long()
            valid = (rows < B * n).unsqueeze(-1) & (cols < B * m).unsqueeze(1)
            pb = grp.problem.view(-1, 1, 1)
            index = rows.unsqueeze(-1) * m + cols.unsqueeze(1) - pb * m  # flat (b, i, j)
            vals.append(P[valid])
            flat.append(index[valid])
        out = torch.zeros(B * n * m, dtype=self.dtype, device=self.device)
        if vals:
            out = out.index_put((torch.cat(flat),), torch.cat(vals))
        return out.view(B, n, m)

    # -- features -----------------------------------------------------------------------------
    def _coords(self, axis: int, grad: bool):
        """Centred flattened coordinates (out side, in side), each with a dummy row."""
        o = self._origin.view(self._B, 1, -1)
        d = self.x.shape[-1]
        xs, ys = self._x3, self._y3
        if not grad:
            xs, ys = xs.detach(), ys.detach()
        z = torch.zeros(1, d, dtype=self.dtype, device=self.device)
        X = torch.cat([(xs - o).reshape(-1, d), z])
        Y = torch.cat([(ys - o).reshape(-1, d), z])
        return (X, Y) if axis == 1 else (Y, X)

    def _out_features(self, axis: int):
        """Cached (no-grad) out-side coordinates ``[G, R, d]``, squared norms and augmented
        coordinates ``(x_i, 1)`` per group."""
        key = ("out", axis)
        feats = self._cache.get(key)
        if feats is None:
            P_out, _ = self._coords(axis, grad=False)
            feats = []
            for grp in self._layouts[axis].groups:
                xo = P_out.index_select(0, grp.rows.reshape(-1)).view(*grp.rows.shape, -1)
                xa = torch.cat([xo, torch.ones_like(xo[..., :1])], -1)  # (x_i, 1), scaled per call
                feats.append((xo, (xo * xo).sum(-1), xa))
            self._cache[key] = feats
        return feats

    def _workspace(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        key = ("ws", name, dtype)
        buf = self._cache.get(key)
        # a buffer made under torch.inference_mode() cannot be written outside it (a result
        # built there is used afterwards): make a normal one then
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if buf is None or stale or buf.numel() < size:
            buf = torch.empty(size, dtype=dtype, device=self.device)
            self._cache[key] = buf
        return buf

    @staticmethod
    def _needs_grad(*ts) -> bool:
        return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)

    # -- log-sum-exp ------------------------------------------------------------------------
    def lse(self, h, log_w, eps, axis):
        r"""Partial pairs ``(M, S)`` of :math:`z = (h + \varepsilon\log w - C)/\varepsilon`
        over the kept blocks (``axis=1``: over ``j`` for every ``i``; ``axis=0``: over
        ``i`` for every ``j``)."""
        lay = self._layouts[axis]
        grad = self._needs_grad(h, log_w, self.x, self.y)
        hw = (h + eps * log_w).reshape(-1)
        M_parts, S_parts = [], []
        if not grad:
            # z_ij = <2 x_i/eps, y_j> + (hw_j - |y_j|^2)/eps - |x_i|^2/eps (centred points):
            # one product of augmented coordinates per group, into a reused workspace; the
            # row term -|x_i|^2/eps is added after the reduction (exact)
            _, P_in = self._coords(axis, grad=False)
            u = torch.cat([(hw.detach() - (P_in[:-1] ** 2).sum(-1)) / eps, hw.new_full((1,), -float("inf"))])
            in_feat = torch.cat([P_in, u.unsqueeze(1)], 1)
            ws = self._workspace("z", lay.max_entries, self.dtype)
            ws_in = self._workspace("in", lay.max_in_entries * in_feat.shape[1], self.dtype)
            scale = torch.full((in_feat.shape[1],), 2.0 / eps, dtype=self.dtype, device=self.device)
            scale[-1] = 1.0
            for grp, (_, xx, xa_unit) in zip(lay.groups, self._out_features(axis)):
                G, R = grp.rows.shape
                L = grp.cols.shape[1]
                yi = torch.index_select(in_feat, 0, grp.cols.reshape(-1), out=ws_in[: G * L * in_feat.shape[1]].view(G * L, -1))
                xa = xa_unit * scale  # (2 x_i / eps, 1)
                z = torch.bmm(xa, yi.view(G, L, -1).transpose(1, 2), out=ws[: G * R * L].view(G, R, L))
                M, S = logsumexp_pair(z, -1, overwrite=True)
                M_parts.append((M - xx / eps).reshape(-1))
                S_parts.append(S.reshape(-1))
        else:
            P_out, P_in = self._coords(axis, grad=True)
            hw_flat = torch.cat([hw, hw.new_full((1,), -float("inf"))])
            for grp in lay.groups:
                M, S = checkpoint(_group_lse, P_out, P_in, hw_flat, grp.rows, grp.cols, eps, use_reentrant=False)
                M_parts.append(M.reshape(-1))
                S_parts.append(S.reshape(-1))
        return _gather_back(lay, M_parts, -math.inf, self.dtype), _gather_back(lay, S_parts, 0.0, self.dtype)

    # -- plan products ----------------------------------------------------------------------
    def _plan_blocks(self, axis, f, g, a, b, eps, *, with_cost: bool = False):
        """Yield ``(group, P)`` (and ``C``) for every group of the layout ``axis`` (axis=0:
        the transposed plan ``Pᵀ``, rows are the ``y`` points). Without autograd, ``P`` and
        ``C`` are views of reused workspaces, valid until the next item."""
        grad = self._needs_grad(f, g, a, b, self.x, self.y)
        u, v, wu, wv = (f, g, a, b) if axis == 1 else (g, f, b, a)
        zero1 = torch.zeros(1, dtype=self.dtype, device=self.device)
        u_flat, wu_flat = torch.cat([u.reshape(-1), zero1]), torch.cat([wu.reshape(-1), zero1])
        v_flat, wv_flat = torch.cat([v.reshape(-1), zero1]), torch.cat([wv.reshape(-1), zero1])
        lay = self._layouts[axis]
        P_out, P_in = self._coords(axis, grad=grad)
        if grad:
            for grp in lay.groups:
                P, C = checkpoint(_group_plan, P_out, P_in, u_flat, v_flat, wu_flat, wv_flat, grp.rows, grp.cols,
                                  eps, use_reentrant=False)
                yield (grp, P, C) if with_cost else (grp, P)
            return
        u_flat, v_flat, wu_flat, wv_flat = (t.detach() for t in (u_flat, v_flat, wu_flat, wv_flat))
        ws_P = self._workspace("z", lay.max_entries, self.dtype)
        ws_C = self._workspace("C", lay.max_entries, self.dtype)
        ws_in = self._workspace("in", lay.max_in_entries * P_in.shape[1], self.dtype)
        for grp, (xo, xx, _) in zip(lay.groups, self._out_features(axis)):
            G, R = grp.rows.shape
            L = grp.cols.shape[1]
            cols = grp.cols.reshape(-1)
            yi = torch.index_select(P_in, 0, cols, out=ws_in[: G * L * P_in.shape[1]].view(G * L, -1)).view(G, L, -1)
            # C = |x|^2 + |y|^2 - 2 x.y of centred points, clamped at 0 (as _group_cost)
            C = torch.baddbmm((yi * yi).sum(-1).unsqueeze(1), xo, yi.transpose(1, 2), alpha=-2.0,
                              out=ws_C[: G * R * L].view(G, R, L))
            C.add_(xx.unsqueeze(-1)).clamp_min_(0.0)
            rows = grp.rows.reshape(-1)
            # P = a_i b_j exp((f_i + g_j - C_ij)/eps), the operations of plan_block in place
            P = torch.add(u_flat.index_select(0, rows).view(G, R, 1), v_flat.index_select(0, cols).view(G, 1, L),
                          out=ws_P[: G * R * L].view(G, R, L))
            P.sub_(C).div_(eps).clamp_(exp_floor(P.dtype), 0.5 * math.log(torch.finfo(P.dtype).max)).exp_()
            P.mul_(wu_flat.index_select(0, rows).view(G, R, 1)).mul_(wv_flat.index_select(0, cols).view(G, 1, L))
            yield (grp, P, C) if with_cost else (grp, P)

    def plan_reduce(self, f, g, a, b, eps, *, accumulate=None, round_to=None):
        r"""Row sums, column sums and :math:`\langle C, P\rangle` of the truncated plan
        (summed in ``accumulate``; entries rounded to ``round_to`` first)."""
        B, m = self._B, self.shape[1]
        acc = accumulate if accumulate is not None else self.dtype
        lay = self._layouts[1]
        grad = self._needs_grad(f, g, a, b, self.x, self.y)
        row_parts, col_parts, col_idx, tc_parts, tc_idx = [], [], [], [], []
        cols_out = torch.zeros(B * m + 1, dtype=acc, device=self.device)
        if not grad:
            _, P_in = self._coords(1, grad=False)
            P_in = P_in.to(acc)
            feats = self._out_features(1)
        for k, (grp, P, C) in enumerate(self._plan_blocks(1, f, g, a, b, eps, with_cost=True)):
            if round_to is not None:
                P = P.to(round_to)
            if grad:
                P, C = P.to(acc), C.to(acc)
                row_parts.append(P.sum(-1).reshape(-1))
                col_parts.append(P.sum(-2).reshape(-1))
                col_idx.append(grp.cols.reshape(-1))
                tc_parts.append((P * C).sum((-2, -1)))
            else:
                G, R, L = P.shape
                if P.dtype != acc:  # widen into a workspace (sum(dtype=...) is slow on CPU)
                    P = self._workspace("P_acc", lay.max_entries, acc)[: P.numel()].view(G, R, L).copy_(P)
                # sums as matrix products (BLAS); <C, P> from the plan's moments,
                # sum_ij P_ij |x_i - y_j|^2 = sum_i |x_i|^2 r_i + sum_j |y_j|^2 c_j - 2 sum_i <x_i, (P y)_i>
                # (centred coordinates: the cancellation costs ~|x|^2 / <C, P> of 1e-16)
                row = torch.bmm(P, P.new_ones(G, L, 1)).view(G, R)
                col = torch.bmm(P.new_ones(G, 1, R), P).view(G, L)
                xo = feats[k][0].to(acc)
                yi = P_in.index_select(0, grp.cols.reshape(-1)).view(G, L, -1)
                Py = torch.bmm(P, yi)
                tc_parts.append(((xo * xo).sum(-1) * row).sum(-1) + ((yi * yi).sum(-1) * col).sum(-1)
                                - 2.0 * (xo * Py).sum((-2, -1)))
                row_parts.append(row.reshape(-1))
                cols_out.index_add_(0, grp.cols.reshape(-1), col.reshape(-1))
            tc_idx.append(grp.problem)
        if grad and col_parts:
            cols_out = cols_out.index_add(0, torch.cat(col_idx), torch.cat(col_parts))
        rows = _gather_back(lay, row_parts, 0.0, acc)
        tc = torch.zeros(B, dtype=acc, device=self.device)
        if tc_parts:
            tc = tc.index_add(0, torch.cat(tc_idx), torch.cat(tc_parts))
        return rows, cols_out[:-1].view(B, m), tc

    def plan_matvec(self, f, g, a, b, eps, vec, axis):
        """``P @ vec`` (axis=1, ``vec [B, m]``) or ``Pᵀ @ vec`` (axis=0, ``vec [B, n]``)."""
        lay = self._layouts[axis]
        v_flat = torch.cat([vec.reshape(-1), torch.zeros(1, dtype=vec.dtype, device=vec.device)])
        parts = []
        for grp, P in self._plan_blocks(axis, f, g, a, b, eps):
            vc = v_flat.index_select(0, grp.cols.reshape(-1)).view(*grp.cols.shape, 1)
            parts.append(torch.bmm(P, vc.to(P.dtype)).reshape(-1))
        return _gather_back(lay, parts, 0.0, self.dtype)

    @property
    def has_transport_cost_vjp(self) -> bool:
        return True

    def transport_cost_vjp(self, Pv, PTu, r, c):
        r"""The squared Euclidean cost's closed form
        (:meth:`~entrokit.geometry.costs.SqEuclidean.transport_cost_vjp`) for the truncated
        plan (one plan product per coordinate)."""

        def each(apply):
            return lambda V: torch.stack([apply(V[..., k]) for k in range(V.shape[-1])], -1)

        return _SQ.transport_cost_vjp(self.x.detach(), self.y.detach(), each(Pv), each(PTu), r, c)

    def cost_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min C, max C)`` over the kept blocks, per problem (one pass, cached)."""
        cached = self._cache.get("bounds")
        if cached is None:
            B = self._B
            lo = torch.full((B,), float("inf"), dtype=self.dtype, device=self.device)
            hi = torch.full((B,), -float("inf"), dtype=self.dtype, device=self.device)
            n, m = self.shape
            with torch.no_grad():
                P_out, P_in = self._coords(1, grad=False)
                for grp in self._layouts[1].groups:
                    C = _group_cost(P_out, P_in, grp.rows, grp.cols)
                    valid = (grp.rows.long() < B * n).unsqueeze(-1) & (grp.cols.long() < B * m).unsqueeze(1)
                    inf = torch.tensor(float("inf"), dtype=C.dtype, device=C.device)
                    lo = lo.scatter_reduce(0, grp.problem, torch.where(valid, C, inf).flatten(1).amin(-1), "amin")
                    hi = hi.scatter_reduce(0, grp.problem, torch.where(valid, C, -inf).flatten(1).amax(-1), "amax")
            cached = self._cache["bounds"] = (lo, hi)
        return cached


def _centre(xc: GridClusters, yc: GridClusters) -> torch.Tensor:
    """``[B, d]`` centre of the box of the anchors of the clusters of positive weight."""
    anchors = torch.cat([xc.anchors, yc.anchors], 1)
    heavy = torch.cat([xc.weights > 0, yc.weights > 0], 1)
    heavy = heavy | ~heavy.any(1, keepdim=True)
    inf = torch.tensor(float("inf"), dtype=anchors.dtype, device=anchors.device)
    lo = torch.where(heavy.unsqueeze(-1), anchors, inf).amin(1)
    hi = torch.where(heavy.unsqueeze(-1), anchors, -inf).amax(1)
    return 0.5 * (lo + hi)


def _group_cost(P_out, P_in, rows, cols) -> torch.Tensor:
    """``C [G, R, L]`` of a group from centred coordinates (squared norms minus twice the
    product; the coordinates are centred, so float32 keeps about 7 digits of C)."""
    G, R = rows.shape
    L = cols.shape[1]
    xo = P_out.index_select(0, rows.reshape(-1)).view(G, R, -1)
    yi = P_in.index_select(0, cols.reshape(-1)).view(G, L, -1)
    return _SQ.tile(xo, yi)


def _group_lse(P_out, P_in, hw_flat, rows, cols, eps):
    """Differentiable partial log-sum-exp pair of one group (the autograd path)."""
    C = _group_cost(P_out, P_in, rows, cols)
    hw = hw_flat.index_select(0, cols.reshape(-1)).view(cols.shape)
    return logsumexp_pair((hw.unsqueeze(1) - C) / eps, -1)


def _group_plan(P_out, P_in, u_flat, v_flat, wu_flat, wv_flat, rows, cols, eps):
    """``(P, C)`` of one group: :math:`P = w^u_i w^v_j e^{(u_i + v_j - C_{ij})/\\varepsilon}`
    (:func:`~entrokit.geometry.base.plan_block`); dummy rows/columns have weight 0."""
    r_flat, c_flat = rows.reshape(-1), cols.reshape(-1)
    G, R = rows.shape
    L = cols.shape[1]
    C = _group_cost(P_out, P_in, rows, cols)
    u = u_flat.index_select(0, r_flat).view(G, R)
    wu = wu_flat.index_select(0, r_flat).view(G, R)
    v = v_flat.index_select(0, c_flat).view(G, L)
    wv = wv_flat.index_select(0, c_flat).view(G, L)
    return plan_block(u, v, wu, wv, C, eps), C
