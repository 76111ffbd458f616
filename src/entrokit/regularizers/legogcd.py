r"""LegoGCD: local entropy regularisation and dual-view KL for generalized category discovery.

Cao et al., "Solving the Catastrophic Forgetting Problem in Generalized Category
Discovery", CVPR 2024. Both terms are added on top of a SimGCD-style objective.

**Selection of potential known-class samples** (paper Sec. 3.2). For every unlabelled
row (each augmented view is a row) with prediction :math:`p_i = \mathrm{softmax}(z_i/\tau_s)`,

.. math::

    o_i = \mathbb 1[\text{unlabelled}_i]\;\mathbb 1[\max_k p_{ik} \ge \delta]\;
          \mathbb 1[\arg\max_k p_{ik} < |\mathcal Y_l|],

i.e. confident rows predicted as a known class (known classes occupy indices
``0 .. num_known-1``). Ground-truth labels of unlabelled rows are never used.

**Local entropy regularisation with the margin-aware pattern** (Eq. 9-10). With a
sharpened prediction :math:`q_i = \mathrm{softmax}(z_i/\tau_o)` and an EMA class prior
:math:`\tilde p`,

.. math::

    \mathcal L_{LER} = \frac1N\sum_{i=1}^N o_i\,\sum_k -q_{ik}\,
        \log\mathrm{softmax}\bigl(z_i/\tau_o + \lambda_{ler}\log\tilde p\bigr)_k .

With :math:`\lambda_{ler} = 0` this is the entropy :math:`H(q_i)` of Eq. 9. As in the
reference code, :math:`q_i` is not detached and the sum is divided by all ``N`` rows.

**Class prior** (reference code): :math:`\tilde p` starts uniform and after each
training call is updated as
:math:`\tilde p \leftarrow m\tilde p + (1-m)\,\frac1N\sum_i \mathrm{softmax}(z_i/T_p)`
with :math:`m = 0.999`, over all rows (labelled ones included); the loss of a call uses
the prior from before the update. The reference applies the softmax to the raw cosine
logits (:math:`T_p = 1`), which keeps :math:`\tilde p` close to uniform; set
``prior_temperature=tau_s`` to average the model's actual predictions instead.

Under ``torch.distributed`` (``sync=None`` with more than one rank, or ``sync=True``) the
batch mean is taken over the *global* batch: every rank all-reduces
:math:`\bigl(\sum_{i\in r}\mathrm{softmax}(z_i/T_p),\ N_r\bigr)` and uses
:math:`\frac{1}{\sum_r N_r}\sum_r\sum_{i\in r}\mathrm{softmax}(z_i/T_p)`, so the prior is
the same on every rank and equal to a single-process run on the concatenated batch (uneven
shards included). The reference code keeps :math:`\tilde p` per process (its multi-GPU
script ``train_mp.py`` has no LER at all).

**Dual-view KL** (Eq. 11): :math:`D_{KL}(p\,\|\,p') = \frac{1}{B}\sum_{i=1}^{B}\sum_k p_{ik}
\log(p_{ik}/p'_{ik})` between the predictions :math:`p = \mathrm{softmax}(z/\tau_s)` of the
two views of ``B`` images. Two details differ between the sources:

* *Gradient.* The paper's Algorithm 1 (appendix) writes
  ``x1_pred, x2_pred.detach() = s_pred.chunk(2)``: the second view is a fixed target and
  only the first view gets a gradient (``detach_second_view=True``). The released code
  (``model.py``, ``DistillLoss.forward``) detaches neither view
  (``detach_second_view=False``, the default).
* *Form.* The released code applies ``log_softmax`` to the *probabilities*,
  :math:`\sum_k p_{ik}(\log\mathrm{softmax}(p_i)_k - \log\mathrm{softmax}(p'_i)_k)`
  (``form="reference"``), a much flatter quantity than Eq. 11 (``form="paper"``, the
  default).

**Which DKL form matches the published numbers.** The paper's tables come from the released
training code, so the setting that matches them is ``form="reference",
detach_second_view=False`` (weight 1, inside the unsupervised classification term).
``form="paper", detach_second_view=True`` is Eq. 11 and Algorithm 1 as written. We have not
re-run the paper's benchmarks with either setting.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F

from entrokit._errors import InputError
from entrokit._stateful import Option, StatefulModule, boolean, integer
from entrokit._validation import (
    _check_row_vector,
    apply_reduction,
    check_choice,
    check_count,
    check_logits,
    check_nonneg_real,
    check_positive,
    check_reduction,
    check_same_shape,
    check_unit_interval,
    no_autocast,
    reject_meta,
    working_dtype,
)

__all__ = [
    "LocalEntropyRegularizer",
    "dual_view_kl",
    "local_entropy_loss",
    "select_known",
]


def _check_mask(
    mask: torch.Tensor, n: int, device: torch.device, name: str = "labeled_mask"
) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a bool torch.Tensor of shape [{n}], got {type(mask).__name__}."
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool, got {mask.dtype}; convert with {name}.bool()."
        )
    _check_row_vector(mask, name, n, device, entry="flag", hint="; with two views stacked, repeat it: torch.cat([m, m]).")
    return mask


def select_known(
    logits: torch.Tensor,
    labeled_mask: torch.Tensor,
    num_known: int,
    threshold: float = 0.7,
    tau_s: float = 0.1,
) -> torch.Tensor:
    r"""Mask :math:`o_i` of potential known-class samples (paper Sec. 3.2).

    Args:
        logits: ``[N, K]`` raw logits (cosine similarities in the reference model).
        labeled_mask: ``[N]`` bool, ``True`` for labelled rows.
        num_known: number of known classes :math:`|\mathcal Y_l|` (indices ``0..num_known-1``).
        threshold: confidence threshold :math:`\delta` on :math:`\max_k p_{ik}`.
        tau_s: student temperature used for the confidence.

    Returns:
        ``[N]`` bool mask.
    """
    logits = check_logits(logits, None)
    n, k = logits.shape
    num_known = check_count(num_known, "num_known")
    if num_known > k:
        raise InputError(f"num_known={num_known} exceeds the number of classes {k}.")
    labeled_mask = _check_mask(labeled_mask, n, logits.device)
    threshold = check_unit_interval(threshold, "threshold", closed_right=True, example="threshold=0.7")
    tau_s = check_positive(tau_s, "tau_s", example="tau_s=0.1")
    return _select(logits, labeled_mask, num_known, threshold, tau_s)


def _select(logits: torch.Tensor, labeled_mask: torch.Tensor, num_known: int, threshold: float,
            tau_s: float) -> torch.Tensor:
    """The selection :math:`o_i` of :func:`select_known`, unchecked."""
    conf, pred = F.softmax(logits.detach() / tau_s, dim=1).max(dim=1)
    return (~labeled_mask) & (conf >= threshold) & (pred < num_known)


def local_entropy_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    log_prior: torch.Tensor | None = None,
    tau_o: float = 0.05,
    lam_ler: float = 0.4,
    detach_target: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    r"""LER with the margin-aware pattern (Eq. 10); see the module docstring.

    Args:
        logits: ``[N, K]`` raw logits.
        mask: ``[N]`` bool selection :math:`o` (from :func:`select_known`).
        log_prior: ``[K]`` :math:`\log\tilde p`; ``None`` means no adjustment (Eq. 9).
        tau_o: sharpening temperature :math:`\tau_o`.
        lam_ler: logit-adjustment weight :math:`\lambda_{ler}`.
        detach_target: stop the gradient through :math:`q` (the reference does not).
        reduction: ``"mean"`` divides by all ``N`` rows (reference), ``"sum"``, ``"none"``.

    Returns:
        The loss in the dtype of ``logits``; float16/bfloat16 logits are computed in float32
        (autocast off), their gradient comes back in their own dtype.
    """
    logits = check_logits(logits, None)
    n, k = logits.shape
    mask = _check_mask(mask, n, logits.device, name="mask")
    if log_prior is not None:
        if not isinstance(log_prior, torch.Tensor):
            raise TypeError(
                f"log_prior must be a torch.Tensor of shape [{k}] or None, got "
                f"{type(log_prior).__name__}."
            )
        if log_prior.shape != (k,):
            raise InputError(
                f"log_prior must have shape [{k}] (one log-probability per class), got "
                f"{tuple(log_prior.shape)}; pass torch.log(prior) of the class prior."
            )
        if log_prior.device != logits.device:
            raise InputError(
                f"device mismatch: logits are on {logits.device} but log_prior is on "
                f"{log_prior.device}; move it with log_prior.to(logits.device)."
            )
    tau_o = check_positive(tau_o, "tau_o", example="tau_o=0.05")
    lam_ler = check_nonneg_real(lam_ler, "lam_ler", example="lam_ler=0.4")
    check_reduction(reduction)
    with no_autocast():  # float16/bfloat16 logits: computed in float32, returned in their dtype
        z = logits.to(working_dtype(logits.dtype))
        return apply_reduction(_ler_rows(z, mask, log_prior, tau_o, lam_ler, detach_target), reduction).to(logits.dtype)


def _ler_rows(logits: torch.Tensor, mask: torch.Tensor, log_prior: torch.Tensor | None, tau_o: float,
              lam_ler: float, detach_target: bool) -> torch.Tensor:
    """Per-row LER terms of :func:`local_entropy_loss` (Eq. 10), unchecked."""
    s = logits / tau_o
    q = F.softmax(s, dim=1)
    if detach_target:
        q = q.detach()
    adj = s if log_prior is None else s + lam_ler * log_prior.to(s.dtype)
    return -(q * F.log_softmax(adj, dim=1)).sum(dim=1) * mask.to(s.dtype)


def dual_view_kl(
    logits_view1: torch.Tensor,
    logits_view2: torch.Tensor,
    temperature: float = 0.1,
    form: Literal["paper", "reference"] = "paper",
    reduction: Literal["mean", "sum", "none"] = "mean",
    *,
    detach_second_view: bool = False,
) -> torch.Tensor:
    r"""Dual-view KL divergence :math:`D_{KL}(p\,\|\,p')` of LegoGCD (Eq. 11).

    With :math:`p = \mathrm{softmax}(z/\tau)`, :math:`p' = \mathrm{softmax}(z'/\tau)`:

    * ``form="paper"`` (default): :math:`\frac1B\sum_i\sum_k p_{ik}(\log p_{ik} - \log p'_{ik})`,
      a true KL (``>= 0``, zero iff the views agree).
    * ``form="reference"``: the reference code's expression
      :math:`\frac1B\sum_i\sum_k p_{ik}(\log\mathrm{softmax}(p_i)_k - \log\mathrm{softmax}(p'_i)_k)`,
      i.e. log-softmax applied to probabilities; it is zero for identical views but is
      not a divergence. It is the released code's form, the one behind the published
      numbers (see the module docstring).

    Gradients: by default both views receive a gradient (released code). With
    ``detach_second_view=True`` the second view is a constant target, as in the paper's
    Algorithm 1 (``x2_pred.detach()``): the gradient w.r.t. ``logits_view1`` is unchanged
    and the gradient w.r.t. ``logits_view2`` is exactly zero. For ``form="paper"``, per row,

    .. math::

        \frac{\partial D_{KL}}{\partial z_k} = \frac{1}{\tau}\,p_k\Bigl(\log\frac{p_k}{p'_k}
            - D_{KL}(p\,\|\,p')\Bigr),\qquad
        \frac{\partial D_{KL}}{\partial z'_k} = \frac{1}{\tau}\,(p'_k - p_k)
        \quad(0\text{ when detached}).

    Args:
        logits_view1: ``[B, K]`` logits of the first view.
        logits_view2: ``[B, K]`` logits of the second view (same samples, same order).
        temperature: student temperature :math:`\tau_s` (0.1).
        form: ``"paper"`` or ``"reference"``.
        reduction: ``"mean"`` over ``B`` (default), ``"sum"`` or ``"none"`` (``[B]``).
        detach_second_view: stop the gradient through ``logits_view2`` (Algorithm 1).

    Returns:
        The divergence in the dtype of the logits; float16/bfloat16 views are computed in
        float32 (autocast off).

    Examples:
        >>> import torch
        >>> z = torch.randn(4, 5)
        >>> float(dual_view_kl(z, z))
        0.0
    """
    logits_view1 = check_logits(logits_view1, None, name="logits_view1")
    check_same_shape(logits_view2, logits_view1, "logits_view2", "logits_view1",
                     "pass the two views of the same batch, e.g. logits.chunk(2).")
    if logits_view2.dtype != logits_view1.dtype:
        raise InputError(
            f"logits_view2 is {logits_view2.dtype} but logits_view1 is {logits_view1.dtype}; compute "
            "both views with one model (or use logits_view2.to(logits_view1))."
        )
    temperature = check_positive(temperature, "temperature", example="temperature=0.1")
    check_choice(form, "form", ("paper", "reference"))
    check_reduction(reduction)
    if not isinstance(detach_second_view, bool):
        raise TypeError(
            f"detach_second_view must be a bool, got {type(detach_second_view).__name__}; use "
            "True for the paper's Algorithm 1 or False for the released code."
        )
    if detach_second_view:
        logits_view2 = logits_view2.detach()
    wd = working_dtype(logits_view1.dtype)  # float32 for float16/bfloat16 views
    with no_autocast():
        lp1 = F.log_softmax(logits_view1.to(wd) / temperature, dim=1)
        lp2 = F.log_softmax(logits_view2.to(wd) / temperature, dim=1)
        if form == "paper":
            per = (lp1.exp() * (lp1 - lp2)).sum(dim=1)
        elif form == "reference":
            p1, p2 = lp1.exp(), lp2.exp()
            per = (p1 * (F.log_softmax(p1, dim=1) - F.log_softmax(p2, dim=1))).sum(dim=1)
        else:
            raise InputError(f"form must be 'paper' or 'reference'; got {form!r}.")
        return apply_reduction(per, reduction).to(logits_view1.dtype)


class LocalEntropyRegularizer(StatefulModule):
    r"""LegoGCD's local entropy regulariser (LER + margin-aware pattern) with its EMA prior.

    Call it on the logits of all rows of a batch (both views stacked, labelled and
    unlabelled) with a mask of the labelled rows; it selects the potential known-class
    rows, returns :math:`\mathcal L_{LER}` (see the module docstring) and, in training
    mode, updates the class prior buffer ``prior`` (``[num_classes]``, in ``state_dict``).
    Multiply the result by the LER weight β (reference: 2; paper: 1 for CIFAR-100,
    2 for CUB) and add it to the SimGCD loss. The number of rows selected in the last
    call is kept in ``num_selected`` (for logging).

    Args:
        num_classes: total number of classes ``K`` (known + novel).
        num_known: number of known classes; they must occupy indices ``0..num_known-1``.
        threshold: confidence threshold δ (reference default 0.7; scripts use 0.7-0.95).
        tau_s: student temperature for the confidence (0.1).
        tau_o: sharpening temperature τ_o (0.05).
        lam_ler: logit-adjustment weight λ_ler (0.4).
        momentum: EMA momentum of the prior (0.999).
        prior_temperature: temperature of the softmax averaged into the prior (reference: 1).
        detach_target: stop the gradient through the sharpened target (reference: False).
        check_inputs: value check (forces a device sync): in training mode, logits with a
            NaN or inf entry raise :class:`~entrokit.InputError` before the prior changes.
            With ``check_inputs=False`` such a batch leaves the prior unchanged silently.
            Under ``torch.distributed`` a non-finite batch on *any* rank raises on every rank
            (``check_inputs=True``) or is skipped on every rank (``False``), after the
            collective, so the ranks never disagree and none waits forever.
        sync: distributed prior update: ``None`` (default) all-reduces iff a process group
            with more than one rank is initialised, ``True`` always all-reduces (needs an
            initialised group), ``False`` keeps a per-process prior (reference behaviour).
            Every rank must then call the module the same number of times in training mode.

    Mixed precision: float16/bfloat16 logits (a model under ``torch.autocast``) are computed
    in float32 with autocast off, the prior update too, and the loss is returned in the
    logits' dtype (their gradient as well); the prior stays float32.

    The options (``threshold``, ``tau_s``, ``tau_o``, ``lam_ler``, ``momentum``,
    ``prior_temperature``, ``detach_target``, ``check_inputs``, ``sync``) are checked when they
    are set (at construction or later), not on every call.

    Shape:
        - logits ``[N, K]``, labeled_mask ``[N]`` (bool); output: scalar.

    Examples:
        >>> import torch
        >>> ler = LocalEntropyRegularizer(num_classes=10, num_known=5)
        >>> z = torch.randn(8, 10, requires_grad=True)
        >>> ler(z, torch.zeros(8, dtype=torch.bool)).backward()
    """

    state_name = "class prior"
    skip_without_sync = True
    num_classes: int = Option(integer(minimum=2, example="num_classes=100"), fixed=True)
    num_known: int = Option(integer(minimum=1, example="num_known=50"), fixed=True)
    threshold: float = Option(partial(check_unit_interval, closed_right=True, example="threshold=0.7"), default=0.7)
    tau_s: float = Option(partial(check_positive, example="tau_s=0.1"), default=0.1)
    tau_o: float = Option(partial(check_positive, example="tau_o=0.05"), default=0.05)
    lam_ler: float = Option(partial(check_nonneg_real, example="lam_ler=0.4"), default=0.4)
    momentum: float = Option(partial(check_unit_interval, closed_right=True, example="momentum=0.999"), default=0.999)
    prior_temperature: float = Option(partial(check_positive, example="prior_temperature=1.0"), default=1.0)
    detach_target: bool = Option(boolean, default=False)

    def _setup(self) -> None:
        # the EMA prior moves by the exact global mean: summed softmax and row count, both summed over ranks
        self.add_state("prior", torch.full((self.num_classes,), 1.0 / self.num_classes))
        self.add_statistic("prob_sum", sync="sum")
        self.add_statistic("count", sync="sum")
        self.num_selected = 0

    def _check_relations(self) -> None:
        if self.num_known > self.num_classes:
            raise InputError(
                f"num_known={self.num_known} exceeds num_classes={self.num_classes}; num_classes counts "
                "known and novel classes together."
            )

    @torch.no_grad()
    def update_prior(self, logits: torch.Tensor) -> None:
        r""":math:`\tilde p \leftarrow m\tilde p + (1-m)\,\mathrm{mean}_i\,\mathrm{softmax}(z_i/T_p)`.

        The mean runs over the global batch under ``torch.distributed`` (see ``sync``).
        Logits with a NaN or inf entry raise :class:`~entrokit.InputError`
        (``check_inputs=True``) or are skipped (``check_inputs=False``); the prior is left
        unchanged either way (on every rank).
        """
        logits = check_logits(logits, self.num_classes)
        self.update_state(logits, what="logits")

    def _measure(self, logits: torch.Tensor) -> dict[str, Any]:
        z = logits.detach().to(self.prior.dtype)
        probs = F.softmax(z / self.prior_temperature, dim=1)
        count = torch.full((), float(z.shape[0]), dtype=z.dtype, device=z.device)
        # the verdict is on the logits: the softmax of a -inf logit is finite
        return {"prob_sum": probs.sum(0), "count": count, self.INPUTS_FINITE: torch.isfinite(z).all()}

    def _write(self, stats: dict[str, Any]) -> None:
        mean_p = stats["prob_sum"] / stats["count"]
        self.prior.copy_(self.momentum * self.prior + (1.0 - self.momentum) * mean_p)

    @reject_meta
    def forward(self, logits: torch.Tensor, labeled_mask: torch.Tensor) -> torch.Tensor:
        """Return the LER loss of the batch and (in training mode) update the prior."""
        logits = check_logits(logits, self.num_classes)
        if self.prior.device != logits.device:
            raise InputError(
                f"LocalEntropyRegularizer keeps its prior on {self.prior.device} but logits are "
                f"on {logits.device}; move it with ler.to(logits.device)."
            )
        labeled_mask = _check_mask(labeled_mask, logits.shape[0], logits.device)
        with no_autocast():  # float16/bfloat16 logits: computed in float32, returned in their dtype
            z = logits.to(working_dtype(logits.dtype))
            mask = _select(z, labeled_mask, self.num_known, self.threshold, self.tau_s)
            rows = _ler_rows(z, mask, torch.log(self.prior), self.tau_o, self.lam_ler, self.detach_target)
            loss = rows.mean()  # divided by all N rows (reference)
            if self.training:
                self.update_state(z, what="logits")  # after the loss, as in the reference
        self.num_selected = int(mask.sum())
        return loss.to(logits.dtype)
