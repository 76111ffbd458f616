r"""Optimal-transport matching layer with a learnable dustbin (SuperGlue).

SuperGlue (Sarlin et al., CVPR 2020, ``log_optimal_transport``) matches ``M`` keypoints
of one image to ``N`` of another from a score matrix :math:`S \in \mathbb R^{M\times N}`.
It appends a *dustbin* row and column filled with one learnable scalar :math:`\alpha`
(``bin_score``), giving the couplings :math:`Z \in \mathbb R^{(M+1)\times(N+1)}`, and
solves entropic OT with :math:`\varepsilon = 1`, cost :math:`-Z` and the marginals

.. math::

    \mu = \tfrac{1}{M+N}(\underbrace{1, \dots, 1}_{M}, N), \qquad
    \nu = \tfrac{1}{M+N}(\underbrace{1, \dots, 1}_{N}, M):

every keypoint is matched once, to a keypoint or to the dustbin, and each dustbin can
absorb all the keypoints of the other image. The output is the log-assignment
:math:`\log P + \log(M+N)` of shape ``(B, M+1, N+1)``: in :math:`e^{\text{output}}`
the columns ``< N`` sum to 1 and the dustbin column to ``M`` (exactly: every iteration
ends with a column update), the rows ``< M`` to 1 and the dustbin row to ``N`` (up to
the marginal error).

**Iterations** are counted as in SuperGlue: one iteration is a row update then a column
update, starting from zero potentials (SuperGlue's ``u = v = 0``), so the output matches
SuperGlue's ``log_optimal_transport(scores, alpha, iters)`` for the same ``iters``
(default 100). They run in the library's Sinkhorn loop
(:func:`~entrokit.solvers.sinkhorn.sinkhorn_problem`).

**Padding.** A batch of images with different keypoint counts is padded to ``(M, N)``;
``valid0`` ``(B, M)`` and ``valid1`` ``(B, N)`` mark the real keypoints (``True``). Sample
``k`` is then solved with its own counts :math:`M_k, N_k`: padded rows and columns get
zero weight, the dustbins :math:`N_k` and :math:`M_k`, the normalisation
:math:`M_k + N_k`, so its real block equals the unpadded problem's output, and padded
entries of the output are :math:`-\infty` (probability 0; they receive no gradient).

**Gradients** (to the scores and to ``bin_score``):

* ``grad="implicit"`` (default): the loop runs without a graph and the potentials get
  implicit-function-theorem gradients at the fixed point; memory is the same for 1 or
  100 iterations. Exact at convergence (100 iterations of SuperGlue's problem are
  usually converged far below float32 resolution for moderate scores).
* ``grad="unroll"``: autograd through every iteration, as SuperGlue trains.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from entrokit._errors import InputError
from entrokit._validation import no_autocast, reject_meta
from entrokit.geometry.logit import LogitCost
from entrokit.nn.attention import attach_implicit, check_options, run_sinkhorn

__all__ = ["OTMatching", "log_optimal_transport"]

_HALF = (torch.float16, torch.bfloat16)


@no_autocast()
@reject_meta
def log_optimal_transport(
    scores: torch.Tensor,
    bin_score,
    n_iter: int = 100,
    *,
    grad: str = "implicit",
    tol: float | None = None,
    max_iter: int = 1000,
    valid0: torch.Tensor | None = None,
    valid1: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""SuperGlue's optimal-transport layer with a dustbin (module docstring).

    Args:
        scores: ``(B, M, N)`` matching scores (higher = better match). ``M = 0`` or ``N = 0``
            (no keypoint in one image) is the all-padding problem: every keypoint goes to
            the dustbin. Scores are not read for checks: a NaN or inf score propagates.
        bin_score: the dustbin score :math:`\alpha`, a finite scalar (a 0-d tensor or a
            :class:`torch.nn.Parameter` to learn it); checked (one value read).
        n_iter: Sinkhorn iterations (row + column update each); ignored with ``tol``.
        grad: ``"implicit"`` or ``"unroll"``.
        tol: iterate until the L1 marginal error (marginals of total mass 1) is ``<= tol``.
        max_iter: iterations allowed with ``tol``.
        valid0, valid1: optional bool masks ``(B, M)`` and ``(B, N)``, ``True`` for a real
            keypoint and ``False`` for padding (module docstring); every sample needs a
            real keypoint on at least one side.

    Returns:
        The log-assignment ``(B, M+1, N+1)``: :math:`\log P + \log(M_k+N_k)` per sample
        (:math:`-\infty` on padded rows and columns).

    Example:
        >>> import torch
        >>> from entrokit.nn.matching import log_optimal_transport
        >>> S = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> Z = log_optimal_transport(S, torch.tensor(1.0, dtype=torch.float64), 100)
        >>> Z.shape, Z.exp()[:, :-1].sum(-1).sub(1).abs().max() < 1e-6
        (torch.Size([2, 6, 5]), tensor(True))
    """
    n_iter, tol, max_iter, grad, _, _ = check_options(n_iter, tol, max_iter, grad, 1.0)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}.")
    if not scores.is_floating_point():
        raise TypeError(f"scores must have a floating dtype, got {scores.dtype}; use scores.float().")
    if scores.dim() != 3:
        raise InputError(
            f"scores must have shape (B, M, N), got {tuple(scores.shape)}; add a batch axis with "
            "scores.unsqueeze(0)."
        )
    B, M, N = scores.shape
    if M == 0 and N == 0:
        raise InputError(
            f"scores has no keypoint in either image (shape {tuple(scores.shape)}); expected M + N >= 1: "
            "there is nothing to match. Drop such samples from the batch."
        )
    _check_bin_score(bin_score)
    out_dtype = scores.dtype
    if out_dtype in _HALF:
        scores = scores.float()
    dtype, device = scores.dtype, scores.device
    alpha = torch.as_tensor(bin_score, dtype=dtype, device=device).reshape(1, 1, 1)
    bins0 = alpha.expand(B, M, 1)
    bins1 = alpha.expand(B, 1, N + 1)
    Z = torch.cat([torch.cat([scores, bins0], -1), bins1], 1)  # couplings (B, M+1, N+1)

    a, b, norm = _dustbin_weights(valid0, valid1, B, M, N, dtype, device)
    log_mu, log_nu = torch.log(a), torch.log(b)  # -inf on zero weights
    # zero-weight rows and columns hold logit 0: finite, and out of the way of the others
    Z = Z.masked_fill(~((a > 0).unsqueeze(-1) & (b > 0).unsqueeze(-2)), 0.0)

    geom = LogitCost(Z, 1.0)
    # SuperGlue starts from u = v = 0, i.e. potentials f = 0, g = -log nu (0 where nu = 0)
    init = (torch.zeros_like(a), torch.where(b > 0, -log_nu, 0.0))
    f, g, _ = run_sinkhorn(
        geom, a, b, 1.0, n_loop=n_iter, tol=tol, max_iter=max_iter, grad=grad, init=init,
        who="log_optimal_transport",
    )
    if grad == "implicit":
        f, g = attach_implicit(geom, f, g, a, b, 1.0)
    # log P = log mu_i + log nu_j + f_i + g_j + Z_ij; SuperGlue returns log P - norm
    out = Z + (f + log_mu - norm).unsqueeze(-1) + (g + log_nu).unsqueeze(-2)
    return out.to(out_dtype)


def _check_bin_score(bin_score) -> None:
    """The dustbin score: a finite real number or scalar tensor."""
    if isinstance(bin_score, bool) or not isinstance(bin_score, (int, float, torch.Tensor)):
        raise TypeError(f"bin_score must be a number or a scalar tensor, got {type(bin_score).__name__}.")
    if isinstance(bin_score, torch.Tensor) and bin_score.numel() != 1:
        raise InputError(f"bin_score must be a scalar, got a tensor of shape {tuple(bin_score.shape)}.")
    if isinstance(bin_score, torch.Tensor) and bin_score.device.type == "meta":
        raise InputError("bin_score is a meta tensor (no values); pass a real scalar, e.g. torch.tensor(1.0).")
    score = float(bin_score.detach()) if isinstance(bin_score, torch.Tensor) else float(bin_score)
    if not math.isfinite(score):
        raise InputError(
            f"bin_score must be finite, got {score}: a NaN or infinite dustbin score makes "
            "every entry of the assignment NaN. Pass a finite score (SuperGlue initialises it to 1.0); "
            "a learned one went non-finite in training: lower the learning rate or clip gradients."
        )


def _dustbin_weights(valid0, valid1, B: int, M: int, N: int, dtype, device):
    """SuperGlue's marginals ``(a, b, norm)``: 1 per real keypoint, ``N_k`` and ``M_k`` on
    the dustbins, over ``M_k + N_k`` (0 on padding), and ``norm = -log(M_k + N_k)``."""
    ones = torch.ones(B, 1, dtype=torch.bool, device=device)
    row_live = torch.cat([_check_valid(valid0, "valid0", (B, M), device), ones], 1)  # (B, M+1)
    col_live = torch.cat([_check_valid(valid1, "valid1", (B, N), device), ones], 1)
    M_k = row_live[:, :M].sum(1, keepdim=True).to(dtype)  # real keypoints per sample
    N_k = col_live[:, :N].sum(1, keepdim=True).to(dtype)
    if bool((M_k + N_k == 0).any()):
        empty = (M_k + N_k == 0).squeeze(1).nonzero().squeeze(1).tolist()
        raise InputError(
            f"samples {empty} have no real keypoint in either image (valid0 and valid1 all False); "
            "drop them from the batch: there is nothing to match."
        )
    mu = torch.where(row_live, 1.0, 0.0).to(dtype)
    mu[:, M:] = N_k
    nu = torch.where(col_live, 1.0, 0.0).to(dtype)
    nu[:, N:] = M_k
    a, b = mu / (M_k + N_k), nu / (M_k + N_k)
    return a, b, -torch.log(M_k + N_k)  # norm (B, 1)


def _check_valid(valid, name: str, shape: tuple[int, int], device) -> torch.Tensor:
    """The keypoint mask ``valid`` as bool ``shape`` (all ``True`` when ``None``)."""
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(valid).__name__}.")
    if valid.dtype != torch.bool:
        raise TypeError(f"{name} must be bool (True = real keypoint), got {valid.dtype}; convert with {name}.bool().")
    if tuple(valid.shape) != shape:
        raise InputError(f"{name} must have shape {shape} (batch, keypoints) to match scores, got {tuple(valid.shape)}.")
    return valid.to(device)


class OTMatching(torch.nn.Module):
    """SuperGlue's matching layer with a learnable dustbin score (module docstring).

    Args:
        n_iter: Sinkhorn iterations (SuperGlue: 100); ignored with ``tol``.
        bin_score_init: initial dustbin score (SuperGlue: 1.0), learned as ``bin_score``.
        grad: ``"implicit"`` (memory independent of ``n_iter``) or ``"unroll"``.
        tol: iterate to this L1 marginal error instead of ``n_iter`` iterations.
        max_iter: iterations allowed with ``tol``.

    Example:
        >>> import torch
        >>> from entrokit.nn.matching import OTMatching
        >>> layer = OTMatching()
        >>> Z = layer(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)))
        >>> Z.shape, layer.bin_score.requires_grad
        (torch.Size([1, 4, 5]), True)
    """

    def __init__(
        self,
        n_iter: int = 100,
        bin_score_init: float = 1.0,
        grad: str = "implicit",
        tol: float | None = None,
        max_iter: int = 1000,
    ):
        super().__init__()
        self.n_iter, self.tol, self.max_iter, self.grad, _, _ = check_options(n_iter, tol, max_iter, grad, 1.0)
        if isinstance(bin_score_init, bool) or not isinstance(bin_score_init, Real) or not math.isfinite(bin_score_init):
            raise InputError(f"bin_score_init must be a finite number, got {bin_score_init!r}; SuperGlue uses 1.0.")
        self.bin_score = torch.nn.Parameter(torch.tensor(float(bin_score_init)))

    def extra_repr(self) -> str:
        it = f"tol={self.tol:g}, max_iter={self.max_iter}" if self.tol is not None else f"n_iter={self.n_iter}"
        return f"{it}, grad={self.grad!r}"

    def forward(
        self, scores: torch.Tensor, valid0: torch.Tensor | None = None, valid1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-assignment of ``scores`` ``(B, M, N)``; ``valid0``/``valid1`` mark the real
        keypoints of padded batches (:func:`log_optimal_transport`)."""
        return log_optimal_transport(
            scores, self.bin_score, self.n_iter, grad=self.grad, tol=self.tol, max_iter=self.max_iter,
            valid0=valid0, valid1=valid1,
        )
