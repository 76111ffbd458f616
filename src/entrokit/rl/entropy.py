r"""Token entropy of a policy's logits, exact and memory-flat.

For one position with logits :math:`z \in \mathbb{R}^V` (divided by the sampling temperature
:math:`\tau`), :math:`p = \mathrm{softmax}(z)` and :math:`\mathrm{lse} = \log \sum_j e^{z_j}`:

.. math::

    H = -\sum_j p_j \log p_j = \mathrm{lse} - \sum_j p_j z_j, \qquad
    \frac{\partial H}{\partial z_j} = -p_j\,(z_j - \mathrm{lse} + H).

The second form of the gradient stays finite where :math:`p_j` underflows and is exactly 0 on
``-inf`` entries (:math:`0 \log 0 = 0`). Both ops below are custom autograd Functions: the
forward keeps only per-row statistics in float32 (float64 for float64 inputs) and the backward
recomputes the softmax chunk by chunk, so autograd never stores a (rows, V) tensor.

``support=`` restricts the distribution to a per-row set :math:`S = \{j : z_j \ge t\}` and
re-normalises on it (AEnt's clamped entropy, SIREN's top-p entropy, top-k): the three supports
only differ in how the threshold :math:`t` of each row is found, and the entropy, its gradient
(zero off :math:`S`; the set is piecewise constant in :math:`z`) and the memory bound are shared.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._validation import check_positive
from entrokit.rl import _triton as _fused

__all__ = ["Clamp", "TopK", "TopP", "token_entropy", "token_logprob_entropy"]

# default working set of one chunk, in elements: 2 MiB of float32 per buffer on CPU (two buffers,
# reused across chunks); 64 MiB on an accelerator, where each chunk costs a dozen kernel launches
_CHUNK_ELEMS = {"cpu": 1 << 19}
_CHUNK_ELEMS_ACCEL = 1 << 24


def _chunk_elems(device: torch.device) -> int:
    return _CHUNK_ELEMS.get(device.type, _CHUNK_ELEMS_ACCEL)


# ----------------------------------------------------------------------------- supports
def _as_int(value: Any, name: str, *, minimum: int) -> int:
    """An integer option: Python, NumPy and 0-d integer tensors are accepted; bools are not."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}; pass e.g. {name}=16.")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass e.g. {name}=16."
        ) from None
    if v < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {v}.")
    return v


def _as_fraction(value: Any, name: str, *, low_open: bool = True, high_closed: bool = True) -> float:
    """A real fraction in (0, 1] (or [0, 1) with ``low_open=False, high_closed=False``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got bool {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v <= 1 if high_closed else v < 1
    if not (math.isfinite(v) and lo_ok and hi_ok):
        interval = ("(0" if low_open else "[0") + (", 1]" if high_closed else ", 1)")
        raise InputError(f"{name} must lie in {interval}, got {value!r}.")
    return v


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept)."""

    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _as_int(self.k, "TopK.k", minimum=1))


@dataclass(frozen=True)
class TopP:
    """Keep the smallest set of largest-probability tokens whose mass reaches ``p`` (nucleus;
    SIREN's top-p entropy). The token that crosses ``p`` is kept; ties at the cut are kept."""

    p: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _as_fraction(self.p, "TopP.p"))


@dataclass(frozen=True)
class Clamp:
    """AEnt's clamped entropy: drop the ``floor(fraction * V)`` lowest logits of each row
    (at least one token is kept; ties at the cut are kept)."""

    fraction: float

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "fraction", _as_fraction(self.fraction, "Clamp.fraction", low_open=False, high_closed=False)
        )


_SUPPORTS = (TopK, TopP, Clamp)


def _check_support(support: Any, vocab: int) -> Any:
    if support is None or support == "full":
        return None
    if not isinstance(support, _SUPPORTS):
        raise TypeError(
            "support must be None, 'full', TopK(k), TopP(p) or Clamp(fraction) from entrokit.rl, "
            f"got {type(support).__name__} {support!r}."
        )
    if isinstance(support, TopK) and support.k > vocab:
        raise InputError(f"TopK.k = {support.k} exceeds the vocabulary size V = {vocab}; pass k <= V.")
    if isinstance(support, TopK) and support.k == vocab:
        return None
    if isinstance(support, Clamp) and math.floor(support.fraction * vocab) == 0:
        return None
    return support


def _threshold(x: torch.Tensor, support: Any, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row threshold ``t`` (shape (rows, 1)) of the support, on the scaled logits ``x``.

    ``m`` and ``s`` are the row max and sum of exp(x - m) on the full vocabulary (top-p needs
    the probabilities). Everything stays on the device: no host copy, no loop over rows.
    """
    vocab = x.shape[-1]
    if isinstance(support, (TopK, Clamp)):
        k = support.k if isinstance(support, TopK) else max(1, vocab - math.floor(support.fraction * vocab))
        # the k-th largest = the (V - k + 1)-th smallest; kthvalue is a selection, not a sort
        return torch.kthvalue(x, vocab - k + 1, dim=-1, keepdim=True).values
    xs = torch.sort(x, dim=-1, descending=True).values
    ps = torch.exp(xs - m).div_(s)
    mass_before = torch.cumsum(ps, dim=-1).sub_(ps)
    n_keep = (mass_before < support.p).sum(-1, keepdim=True).clamp_(min=1)
    return xs.gather(-1, n_keep - 1)


# ----------------------------------------------------------------------------- checks
def _check_logits(logits: Any, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(logits).__name__}; "
            f"convert it with torch.as_tensor({name}, dtype=torch.float32)."
        )
    if logits.is_meta:
        raise InputError(
            f"{name} is a meta tensor (shape only, no values); entropies need real values. "
            "Materialise it on a real device first (e.g. model.to_empty(device='cpu') and load weights)."
        )
    if not logits.is_floating_point() or logits.is_complex():
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64, bfloat16 or float16), got "
            f"{logits.dtype}; convert it with {name}.float()."
        )
    if logits.dim() < 1:
        raise InputError(f"{name} must have at least one axis (..., V), got a 0-d tensor.")
    if logits.numel() == 0:
        raise InputError(
            f"{name} is empty (shape {tuple(logits.shape)}); expected at least one row and one "
            "vocabulary entry."
        )
    return logits


def _check_finite_values(t: torch.Tensor, name: str, *, allow_neg_inf: bool) -> None:
    """Value check (one device sync): no NaN and no +inf (and no -inf unless allowed)."""
    bad = torch.isnan(t).any() | (t == float("inf")).any()
    if not allow_neg_inf:
        bad = bad | (t == float("-inf")).any()
    if bool(bad):
        what = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
        hint = (
            " (-inf is allowed: it marks a token with probability 0)" if allow_neg_inf else ""
        )
        raise InputError(
            f"{name} contains {what}; expected finite values{hint}. Find where it came from, or "
            f"clean it with torch.nan_to_num({name}, nan=0.0, posinf=...)."
        )


def _check_mask(mask: Any, shape: torch.Size, device: torch.device, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of bools, got {type(mask).__name__}.")
    if mask.is_meta:
        raise InputError(f"{name} is a meta tensor (no values); pass a real boolean tensor.")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(
            f"{name} has shape {tuple(mask.shape)} but the rows have shape {tuple(shape)} "
            "(the logits' shape without the vocabulary axis); pass one flag per token."
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                f"{name} must be boolean (or 0/1 integers), got {mask.dtype}; use {name}.bool()."
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError(f"{name} holds integers other than 0 and 1; pass a boolean mask.")
        mask = mask != 0
    if mask.device != device:
        raise InputError(f"{name} is on {mask.device} but the logits are on {device}; move it.")
    return mask


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(chunk_size: Any, vocab: int, device: torch.device, n_rows: int) -> int:
    if chunk_size is None or chunk_size == "auto":
        # and at most 1/64 of the rows, so that a chunk stays small next to the logits
        return max(1, min(_chunk_elems(device) // vocab, -(-n_rows // 64)))
    return _as_int(chunk_size, "chunk_size", minimum=1)


# ----------------------------------------------------------------------------- token_entropy
def _chunk_stats(chunk: torch.Tensor, inv_t: float, wdt: torch.dtype, support: Any):
    """Scaled logits of one chunk and their row statistics (lse, H, threshold): the exact path
    for rows holding -inf entries and for restricted supports."""
    x = chunk.to(wdt, copy=True)
    if inv_t != 1.0:
        x.mul_(inv_t)
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that are all -inf
    thr = None
    if support is not None:
        y = x - m
        s_full = torch.exp(y).sum(-1, keepdim=True)
        thr = _threshold(x, support, m, s_full)
        del y
        x.masked_fill_(x < thr, float("-inf"))  # the row max is always kept, so m stays
    x.sub_(m).clamp_(min=torch.finfo(wdt).min)  # -inf -> finite floor whose exp is exactly 0
    e = torch.exp(x)
    s = e.sum(-1, keepdim=True)
    ez = (e.mul_(x)).sum(-1, keepdim=True)
    lse = m + torch.log(s)
    h = torch.log(s) - ez / s
    return lse.squeeze(-1), h.squeeze(-1), (None if thr is None else thr.squeeze(-1))


def _scaled_shift(chunk: torch.Tensor, shift: torch.Tensor | None, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """``out = chunk / temperature - shift`` in the working dtype (``out`` may be ``chunk``).

    Half chunks are first copied into ``out`` (a plain cast; mixed-dtype arithmetic would
    allocate a float32 temporary). ``shift=None``: the row max of the scaled chunk, whose value
    is returned in its place as ``(out, max)``.
    """
    if out.dtype != chunk.dtype:
        chunk = out.copy_(chunk)
    if shift is None:
        shift = chunk.amax(-1, keepdim=True)
        if inv_t != 1.0:
            shift.mul_(inv_t)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # rows all -inf
        return _scaled_shift(chunk, shift, inv_t, out), shift
    if inv_t == 1.0:
        return torch.sub(chunk, shift, out=out)
    return torch.add(shift.neg(), chunk, alpha=inv_t, out=out)


class _TokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, valid, inv_t, support, rows):
        wdt = _work_dtype(logits2d.dtype)
        n, vocab = logits2d.shape
        dev = logits2d.device
        lse = torch.empty(n, dtype=wdt, device=dev)
        h = torch.empty(n, dtype=wdt, device=dev)
        thr = torch.empty(n, dtype=wdt, device=dev) if support is not None else None
        # rows that hold -inf take the clamped path in the backward too
        slow = None
        if support is None:
            xbuf = torch.empty(min(rows, n) * vocab, dtype=wdt, device=dev)
            ebuf = torch.empty_like(xbuf)
        for i in range(0, n, rows):
            c = logits2d[i : i + rows]
            r = c.shape[0]
            if support is not None:
                lse[i : i + r], h[i : i + r], thr[i : i + r] = _chunk_stats(c, inv_t, wdt, support)
                continue
            # one pass per statistic: x = z - max, e = exp(x), s = sum e, H = log s - sum(e x) / s
            x, m = _scaled_shift(c, None, inv_t, xbuf[: r * vocab].view(r, vocab))
            e = torch.exp(x, out=ebuf[: r * vocab].view(r, vocab))
            s = e.sum(-1)
            ez = e.mul_(x).sum(-1)
            bad = torch.isnan(ez)  # 0 * (-inf): the row holds -inf entries (or no finite one)
            if bool(bad.any()):
                li, hi, _ = _chunk_stats(c, inv_t, wdt, None)
                lse[i : i + r], h[i : i + r] = li, hi
                if slow is None:
                    slow = torch.zeros(n, dtype=torch.bool, device=dev)
                slow[i : i + r] = bad
                continue
            logs = torch.log(s)
            lse[i : i + r] = m.squeeze(-1) + logs
            h[i : i + r] = logs - ez / s
        # a row with no finite logit has no distribution: H = 0 and no gradient (documented)
        ok = torch.isfinite(lse)
        if valid is not None:
            ok = ok & valid
        h = torch.where(ok, h, torch.zeros_like(h))
        ctx.save_for_backward(logits2d, lse, h, ok, thr, slow)
        ctx.inv_t, ctx.rows = inv_t, rows
        return h

    @staticmethod
    def backward(ctx, grad_h):
        logits2d, lse, h, ok, thr, slow = ctx.saved_tensors
        inv_t, rows = ctx.inv_t, ctx.rows
        wdt = lse.dtype
        n, vocab = logits2d.shape
        # a = -g / temperature per row: dH/dz = a p (log p + H)
        a = torch.where(ok, grad_h.to(wdt), torch.zeros_like(lse)).mul_(-inv_t)
        lse = torch.where(ok, lse, torch.zeros_like(lse))
        b = a * h
        grad = torch.empty_like(logits2d)
        fmin = torch.finfo(wdt).min
        same = logits2d.dtype == wdt
        xbuf = None if same else torch.empty(min(rows, n) * vocab, dtype=wdt, device=logits2d.device)
        pbuf = torch.empty(min(rows, n) * vocab, dtype=wdt, device=logits2d.device)
        for i in range(0, n, rows):
            c = logits2d[i : i + rows]
            r = c.shape[0]
            if thr is not None or (slow is not None and bool(slow[i : i + r].any())):
                x = c.to(wdt, copy=True)
                if inv_t != 1.0:
                    x.mul_(inv_t)
                if thr is not None:
                    x.masked_fill_(x < thr[i : i + r, None], float("-inf"))
                x.sub_(lse[i : i + r, None]).clamp_(min=fmin)  # log p, floored on -inf
                p = torch.exp(x)
                # multiply by p before a: the floor times a could overflow, times p it is 0
                x.add_(h[i : i + r, None]).mul_(p).mul_(a[i : i + r, None])
                grad[i : i + r] = x
                continue
            gi = grad[i : i + r]
            x = gi if same else xbuf[: r * vocab].view(r, vocab)
            _scaled_shift(c, lse[i : i + r, None], inv_t, x)  # log p
            p = torch.exp(x, out=pbuf[: r * vocab].view(r, vocab))
            torch.addcmul(b[i : i + r, None], a[i : i + r, None], x, out=x)  # a (log p + H)
            if same:
                x.mul_(p)
            else:
                gi.copy_(p.mul_(x))
        return grad, None, None, None, None


def token_entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    support: Any = None,
    chunk_size: int | str | None = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""Entropy of the softmax of each row of ``logits``, with an exact, chunked backward.

    .. math::

        H_i = \mathrm{lse}(z_i) - \sum_j p_{ij} z_{ij}, \quad z_i = \text{logits}_i / \tau,
        \qquad \frac{\partial H_i}{\partial \text{logits}_{ij}}
        = -\frac{p_{ij}}{\tau}\,(z_{ij} - \mathrm{lse}(z_i) + H_i)

    (anchors note, section 2). The forward keeps (lse, H) per row in float32 (float64 for
    float64 logits) and the backward recomputes the softmax ``chunk_size`` rows at a time: the
    extra memory of forward plus backward is the logits' gradient plus two float32 buffers of one
    chunk, reused from chunk to chunk. bfloat16 and float16 logits are accumulated in float32.
    Each chunk takes four passes over its entries in the forward (shift by the row max, exp, sum,
    sum of e x) and four in the backward (log p, p, :math:`a(\log p + H)`, times p); rows with
    ``-inf`` entries (found by the NaN of 0 * -inf in the forward) take an exact clamped path.

    Parameters
    ----------
    logits : Tensor (..., V)
        Floating logits (float32, float64, bfloat16, float16), on any device. ``-inf`` entries
        are tokens of probability 0 and contribute exactly 0 (:math:`0 \log 0 = 0`). A row whose
        entries are all ``-inf`` has no distribution: its entropy is defined as 0 and it gets a
        zero gradient (no NaN). NaN and ``+inf`` are refused.
    temperature : float > 0
        Sampling temperature :math:`\tau`; the logits are divided by it.
    mask : bool Tensor (...), optional
        Valid tokens (e.g. the response mask). Masked rows return 0 and get a zero gradient.
    support : None | 'full' | TopK | TopP | Clamp
        Re-normalised entropy on a per-row subset :math:`S_i = \{j : z_{ij} \ge t_i\}`:
        ``TopK(k)`` the k largest logits; ``TopP(p)`` SIREN's nucleus (the smallest
        top-probability set of mass >= p at temperature :math:`\tau`); ``Clamp(c)`` AEnt's clamp
        (drop the ``floor(c V)`` lowest logits). :math:`H_i = \mathrm{lse}_{S_i} - \sum_{j\in S_i}
        p^S_{ij} z_{ij}` and the gradient is the formula above on :math:`S_i` and 0 off it (the
        set is piecewise constant). Thresholds are found on the device (``kthvalue`` / a
        row sort), without host copies or loops over rows.
    chunk_size : int or 'auto'
        Rows per chunk; ``'auto'`` keeps a chunk near 2**19 elements on CPU and 2**24 on a GPU,
        and at most 1/64 of the rows. On CUDA with triton installed and the full support, a
        fused Triton kernel (one pass over each row, forward and backward;
        :mod:`entrokit.rl._triton`) runs instead and takes no chunk size.
    check_inputs : bool
        Read the values to refuse NaN and ``+inf`` (one device sync); set False in training loops.

    Returns
    -------
    Tensor (...)
        Entropies in nats, float32 (float64 for float64 logits).

    Examples
    --------
    >>> import torch
    >>> from entrokit.rl import token_entropy, TopK
    >>> z = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]])
    >>> token_entropy(z)
    tensor([0.6931, 1.0986])
    >>> token_entropy(z, support=TopK(1))
    tensor([0.6931, 1.0986])
    """
    logits = _check_logits(logits)
    temperature = check_positive(temperature, "temperature")
    vocab = logits.shape[-1]
    support = _check_support(support, vocab)
    lead = logits.shape[:-1]
    rows = _rows_per_chunk(chunk_size, vocab, logits.device, math.prod(lead))
    valid = None if mask is None else _check_mask(mask, lead, logits.device)
    if check_inputs:
        _check_finite_values(logits, "logits", allow_neg_inf=True)
    logits2d = logits.reshape(-1, vocab)
    if logits2d.shape[0] == 0:
        raise InputError(f"logits has no rows (shape {tuple(logits.shape)}); pass at least one token.")
    if support is None and _fused.use_fused(logits2d):  # CUDA: one fused pass per row (entrokit.rl._triton)
        h = _fused.token_entropy_rows(logits2d, 1.0 / temperature)
        if valid is not None:
            h = torch.where(valid.reshape(-1), h, torch.zeros_like(h))
        return h.reshape(lead)
    h = _TokenEntropy.apply(
        logits2d, None if valid is None else valid.reshape(-1), 1.0 / temperature, support, rows
    )
    return h.reshape(lead)


# ----------------------------------------------------------------------------- hidden states
def _hidden_tiles(n: int, vocab: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """Automatic (rows, columns, hidden block) of a tile of :func:`token_logprob_entropy`.

    On CPU the working set is kept under 1/28 of the logits' size for half inputs and 1/48 for
    float32/float64 ones (whose larger tiles make the GEMM's packing buffers count), so that the
    extra peak stays below 0.05x the logits: two float32 (rows, columns) tiles and, for half
    inputs, the float32 gradient of a row block of ``hidden`` (rows x d), float32 copies of
    one (rows + columns) x block slice of ``hidden`` and ``weight``, and the bfloat16 buffers of
    the backward's GEMMs (a (rows, columns) tile and a rows x block product; see
    :func:`_bf16_gemm`). The half-input budget is shared 0.45 / 0.3 / 0.25 between the row
    block's gradient, the tiles and the block copies. Tiles start at 512 x 1024 (GEMMs near
    peak).
    float32/float64 inputs need no copies (block = d). Accelerators: 4096 x 8192, block = d.
    """
    half = _work_dtype(dtype) != dtype
    if device.type != "cpu":
        return min(n, 4096), min(vocab, 8192), d
    elem = torch.empty((), dtype=dtype).element_size()
    # float32 tiles get a smaller share: the GEMM's own packing buffers grow with the tile
    # (measured: about as much again at 512 x 1024, d = 4096)
    budget = max(1 << 20, n * vocab * elem // (28 if half else 48))

    def pow2_at_most(x: float, lo: int, hi: int) -> int:
        p = lo
        while p * 2 <= min(x, hi):
            p *= 2
        return p

    if not half:
        rows, cols = min(n, 512), min(vocab, 1024)
        while 8 * rows * cols > budget and (rows > 16 or cols > 16):
            if cols >= rows and cols > 16 or rows <= 16:
                cols = max(16, cols // 2)
            else:
                rows = max(16, rows // 2)
        return rows, cols, d
    # shares: the row block's float32 gradient 0.45; two float32 tiles and the bfloat16 tile
    # 0.3; the float32 block copies and the bfloat16 block product 0.25
    rows = min(n, pow2_at_most(0.45 * budget / (4 * d), 16, 512))
    cols = min(vocab, pow2_at_most(0.3 * budget / (10 * rows), 16, 1024))
    block = min(d, pow2_at_most(0.25 * budget / (4 * (rows + cols) + 2 * rows), 32, 4096))
    return rows, cols, block


def _label_slices(lab: torch.Tensor, vocab: int, cols: int):
    """Rows of a block sorted by label, and for each vocabulary chunk the range of sorted rows
    whose label falls in it (one host copy per row block, no per-tile search)."""
    order = torch.argsort(lab)
    lab_sorted = lab[order]
    starts = torch.arange(0, vocab + cols, cols, device=lab.device).clamp_(max=vocab)
    bounds = torch.searchsorted(lab_sorted, starts).tolist()
    return order, lab_sorted, bounds


def _work(src: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """``src`` in the working dtype: itself, or its float32 copy in the reused buffer ``buf``."""
    if buf is None:
        return src
    return buf[: src.numel()].view(src.shape).copy_(src)


def _bf16_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward's two gradient products run as bfloat16 GEMMs: bfloat16 inputs on a
    CPU with native bfloat16 dot products (AVX512-BF16 or AMX), where oneDNN multiplies at about
    2.4x the float32 rate and reads the weight without a float32 copy."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


class _LogprobEntropy(torch.autograd.Function):
    """Rows outer, vocabulary inner: each row block is visited once, and its (m, s, t) state and
    (in the backward) its gradient stay in the working dtype while the vocabulary is swept."""

    @staticmethod
    def _logits(h_i, w_c, b_w, v0, inv_t, blocks, hbuf, wbuf, out):
        """One tile of scaled logits, ``(h_i w_c^T + b) / temperature``, summed over hidden blocks
        (half inputs: float32 copies of one block of each operand at a time)."""
        for j, (k0, k1) in enumerate(blocks):
            hb, wb = _work(h_i[:, k0:k1], hbuf), _work(w_c[:, k0:k1], wbuf)
            if j == 0:
                torch.mm(hb, wb.t(), out=out)
            else:
                out.addmm_(hb, wb.t())
        if b_w is not None:
            out.add_(b_w[v0 : v0 + out.shape[1]])
        if inv_t != 1.0:
            out.mul_(inv_t)
        return out

    @staticmethod
    def _buffers(hidden2d, weight, rows, cols, block, wdt):
        (n, d), vocab = hidden2d.shape, weight.shape[0]
        r0, c0 = min(rows, n), min(cols, vocab)
        dev = hidden2d.device
        half = wdt != hidden2d.dtype
        blocks = [(k0, min(k0 + block, d)) for k0 in range(0, d, block)] if half else [(0, d)]
        hbuf = torch.empty(r0 * min(block, d), dtype=wdt, device=dev) if half else None
        wbuf = torch.empty(c0 * min(block, d), dtype=wdt, device=dev) if half else None
        return blocks, hbuf, wbuf, torch.empty(r0 * c0, dtype=wdt, device=dev), torch.empty(r0 * c0, dtype=wdt, device=dev)

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, inv_t, rows, cols, block):
        wdt = _work_dtype(hidden2d.dtype)
        n, vocab = hidden2d.shape[0], weight.shape[0]
        dev = hidden2d.device
        blocks, hbuf, wbuf, zbuf, ebuf = _LogprobEntropy._buffers(hidden2d, weight, rows, cols, block, wdt)
        lse = torch.empty(n, dtype=wdt, device=dev)
        ent = torch.empty(n, dtype=wdt, device=dev)
        logp = torch.empty(n, dtype=wdt, device=dev)
        b_w = None if bias is None else bias.to(wdt)
        for i in range(0, n, rows):
            h_i = hidden2d[i : i + rows]
            r = h_i.shape[0]
            order, lab_sorted, bounds = _label_slices(labels[i : i + r], vocab, cols)
            m = torch.full((r,), float("-inf"), dtype=wdt, device=dev)
            s = torch.zeros(r, dtype=wdt, device=dev)
            t = torch.zeros(r, dtype=wdt, device=dev)  # sum_j e^{z_j - m} z_j
            zl = torch.zeros(r, dtype=wdt, device=dev)
            for k, v0 in enumerate(range(0, vocab, cols)):
                w_c = weight[v0 : v0 + cols]
                c = w_c.shape[0]
                z = _LogprobEntropy._logits(h_i, w_c, b_w, v0, inv_t, blocks, hbuf, wbuf, zbuf[: r * c].view(r, c))
                lo, hi = bounds[k], bounds[k + 1]
                if hi > lo:
                    sel = order[lo:hi]
                    zl[sel] = z[sel, lab_sorted[lo:hi] - v0]
                # online log-sum-exp: merge this tile's (max, sum e, sum e z) into the row state
                mn = torch.maximum(m, z.amax(1))
                scale = torch.exp(m - mn)
                e = ebuf[: r * c].view(r, c)
                torch.exp(torch.sub(z, mn[:, None], out=e), out=e)
                s.mul_(scale).add_(e.sum(1))
                t.mul_(scale).add_(e.mul_(z).sum(1))
                m = mn
            lse[i : i + r] = m + torch.log(s)
            ent[i : i + r] = lse[i : i + r] - t / s
            logp[i : i + r] = zl - lse[i : i + r]
        ctx.save_for_backward(hidden2d, weight, bias, labels, lse, ent)
        ctx.inv_t, ctx.tiles = inv_t, (rows, cols, block)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden2d, weight, bias, labels, lse, ent = ctx.saved_tensors
        inv_t, (rows, cols, block) = ctx.inv_t, ctx.tiles
        wdt = lse.dtype
        half = wdt != hidden2d.dtype
        (n, d), vocab = hidden2d.shape, weight.shape[0]
        blocks, hbuf, wbuf, zbuf, pbuf = _LogprobEntropy._buffers(hidden2d, weight, rows, cols, block, wdt)
        # dL/dz = g_logp (onehot - p) - g_ent p (log p + H) = p (a log p + b) + g_logp onehot,
        # a = -g_ent, b = -(g_ent H + g_logp); all times 1/temperature (the chain rule of z)
        gl = (torch.zeros_like(lse) if g_logp is None else g_logp.to(wdt)) * inv_t
        ge = (torch.zeros_like(lse) if g_ent is None else g_ent.to(wdt)) * inv_t
        a, b = -ge, -(ge * ent + gl)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(hidden2d) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        b_w = None if bias is None else bias.to(wdt)
        # half inputs: the row block's gradient in float32 over the whole vocabulary; the
        # weight's (and bias') gradient gets each tile's float32 product added, so it is rounded
        # once per row block (n / rows times; rows is set by the memory budget, ~1/80 of V / d)
        gh32 = torch.empty(min(rows, n), d, dtype=wdt, device=hidden2d.device) if half and need_h else None
        # bfloat16 GEMMs (see _bf16_gemm): each tile's dz rounded to bfloat16 once, then
        # dW += dz^T h (one rounding per row block, as in the float32 path) and, per hidden block,
        # dh += dz W into the float32 row-block gradient
        bf16 = _bf16_gemm(hidden2d.dtype, hidden2d.device)
        r0, c0 = min(rows, n), min(cols, vocab)
        dz16 = torch.empty(r0 * c0, dtype=torch.bfloat16) if bf16 else None
        gh16 = torch.empty(r0 * min(block, d), dtype=torch.bfloat16) if bf16 and need_h else None
        for i in range(0, n, rows):
            h_i = hidden2d[i : i + rows]
            r = h_i.shape[0]
            gh_i = None
            if need_h:
                gh_i = (gh32[:r] if half else gh[i : i + r]).zero_()
            order, lab_sorted, bounds = _label_slices(labels[i : i + r], vocab, cols)
            lse_i, a_i, b_i, gl_i = lse[i : i + r, None], a[i : i + r, None], b[i : i + r, None], gl[i : i + r]
            for k, v0 in enumerate(range(0, vocab, cols)):
                w_c = weight[v0 : v0 + cols]
                c = w_c.shape[0]
                z = _LogprobEntropy._logits(h_i, w_c, b_w, v0, inv_t, blocks, hbuf, wbuf, zbuf[: r * c].view(r, c))
                z.sub_(lse_i)  # log p
                p = torch.exp(z, out=pbuf[: r * c].view(r, c))
                dz = torch.addcmul(b_i, a_i, z, out=z).mul_(p)
                lo, hi = bounds[k], bounds[k + 1]
                if hi > lo:
                    sel = order[lo:hi]
                    dz[sel, lab_sorted[lo:hi] - v0] += gl_i[sel]
                if need_b:
                    gb[v0 : v0 + c].add_(dz.sum(0))
                if bf16:
                    dzb = dz16[: r * c].view(r, c).copy_(dz)
                    if need_w:
                        gw[v0 : v0 + c].addmm_(dzb.t(), h_i)
                    if need_h:
                        for k0, k1 in blocks:
                            part = torch.mm(dzb, w_c[:, k0:k1], out=gh16[: r * (k1 - k0)].view(r, k1 - k0))
                            gh_i[:, k0:k1].add_(part)
                    continue
                for k0, k1 in blocks:
                    if need_h:
                        gh_i[:, k0:k1].addmm_(dz, _work(w_c[:, k0:k1], wbuf))
                    if need_w and half:
                        gwb = torch.mm(dz.t(), _work(h_i[:, k0:k1], hbuf), out=wbuf[: c * (k1 - k0)].view(c, k1 - k0))
                        gw[v0 : v0 + c, k0:k1].add_(gwb)
                    elif need_w:
                        gw[v0 : v0 + c].addmm_(dz.t(), h_i)
            if need_h and half:
                gh[i : i + r].copy_(gh_i)
        return gh, gw, gb, None, None, None, None, None


def _check_hidden_inputs(hidden: Any, weight: Any, bias: Any, labels: Any) -> tuple:
    """``(hidden, weight, bias)`` of :func:`token_logprob_entropy` after the checks of their types,
    shapes, dtypes and devices, and of the labels' (no values are read)."""
    hidden = _check_logits(hidden, "hidden")
    weight = _check_logits(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"weight must have shape (V, d) with d = hidden.shape[-1] = {hidden.shape[-1]}, got "
            f"{tuple(weight.shape)}."
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise InputError(
            f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, "
            f"{hidden.device}); cast one of them, e.g. weight.to(hidden)."
        )
    if bias is not None:
        bias = _check_logits(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise InputError(
                f"bias must be a ({weight.shape[0]},) tensor like hidden ({hidden.dtype}, {hidden.device}), "
                f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}."
            )
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}.")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must hold integer token ids, got {labels.dtype}; use labels.long().")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise InputError(
            f"labels has shape {tuple(labels.shape)} but hidden's rows have shape "
            f"{tuple(hidden.shape[:-1])}; pass one label per hidden state."
        )
    if labels.device != hidden.device:
        raise InputError(f"labels is on {labels.device} but hidden is on {hidden.device}; move it.")
    return hidden, weight, bias


def _check_hidden_values(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor) -> None:
    """No NaN / inf in ``hidden``, ``weight``, ``bias``; labels in [0, V) (one device sync)."""
    vocab = weight.shape[0]
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None:
            _check_finite_values(t, name, allow_neg_inf=False)
    if bool(((labels < 0) | (labels >= vocab)).any()):
        raise InputError(
            f"labels must lie in [0, V) = [0, {vocab}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; mask padding with a valid id (e.g. 0)."
        )


def token_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | str | None = "auto",
    row_chunk_size: int | str | None = "auto",
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Label log-probability and entropy from hidden states, without forming the logits.

    With :math:`z = (h W^\top + b)/\tau`, returns :math:`\log p_{y}` and :math:`H` per row. The
    vocabulary is visited ``chunk_size`` columns at a time with an online log-sum-exp: the running
    state of each row is :math:`(m, s = \sum e^{z-m}, t = \sum e^{z-m} z)`, merged across chunks by
    rescaling with :math:`e^{m_\text{old} - m_\text{new}}`; then :math:`\mathrm{lse} = m + \log s`
    and :math:`H = \mathrm{lse} - t/s`. The backward recomputes each tile and applies

    .. math::

        \frac{\partial L}{\partial z_j} = g_{\log p}\,(\mathbb{1}[j = y] - p_j)
        - g_H\, p_j\,(z_j - \mathrm{lse} + H),

    then :math:`\partial L/\partial h = \tau^{-1} \partial_z L\, W`, :math:`\partial L/\partial W
    = \tau^{-1} \partial_z L^\top h`, :math:`\partial L/\partial b = \tau^{-1} \sum_i \partial_z L`.
    Both outputs have exact gradients with respect to ``hidden``, ``weight`` and ``bias``.
    The (rows, V) logits never exist. Row blocks are the outer loop and the vocabulary the
    inner one, so each row block's online state and gradient stay in the working dtype while the
    vocabulary is swept. float32 and float64 inputs accumulate straight into their gradients:
    the extra memory is two (row_chunk_size, chunk_size) tiles. bfloat16/float16 inputs are
    computed in float32: the row block's ``hidden`` gradient in a float32 (rows, d) buffer,
    rounded once; float32 copies of one (rows + chunk) x block slice of ``hidden`` and ``weight``
    at a time; the weight's (and bias') gradient gets each tile's float32 product added, so it is
    rounded once per row block (T / rows times; the automatic rows are the largest power of two
    up to 512 under the budget: 16 row blocks at T = 1k, d = 4096, V = 32k, 2 at d = 1024,
    V = 152k; each rounding is one bfloat16 rounding of a float32 partial sum).
    bfloat16 inputs on a CPU with bfloat16 dot-product instructions (AVX512-BF16 or AMX) run
    the backward's two gradient products as bfloat16 GEMMs with float32 accumulation: each
    tile's :math:`\partial_z L` is rounded to bfloat16 once (as it is in PyTorch's own bfloat16
    backward of a linear layer) and each chunk's ``hidden`` product once more before it is added
    to the float32 row-block gradient. The values are unchanged; the gradients' median relative
    error is about 1.2x (``hidden``) and 1.6x (``weight``) that of rounding the exact gradient
    once to bfloat16, and forward + backward take about 0.7x the CPU time of the float32
    products at T = 1k, V = 32k, d = 4096 (``benchmarks/results/rl_entropy.md``).
    The automatic tiles keep this working set under 1/28 of the logits' size (1/48 in float32).

    Parameters
    ----------
    hidden : Tensor (..., d)
        Last hidden states (floating).
    weight : Tensor (V, d)
        The LM head's weight (same dtype and device as ``hidden``).
    labels : int Tensor (...)
        Token ids in [0, V).
    bias : Tensor (V,), optional
    temperature : float > 0
    chunk_size, row_chunk_size : int or 'auto'
        Vocabulary columns and rows per tile. ``'auto'`` on CPU: from 1024 columns by 512 rows
        down until the working set above fits 1/28 (float32: 1/48) of the logits (at least
        1 MiB), which keeps the extra peak below 0.05x the logits; on a GPU 8192 x 4096.
        On CUDA with triton installed, the fused Triton path (:mod:`entrokit.rl._triton`) runs
        instead and picks its own tiles.
    check_inputs : bool
        Read the values (NaN / inf in ``hidden``, labels in range; one device sync).

    Returns
    -------
    (logp, entropy) : two Tensors (...)
        float32 (float64 for float64 inputs).
    """
    hidden, weight, bias = _check_hidden_inputs(hidden, weight, bias, labels)
    temperature = check_positive(temperature, "temperature")
    auto_rows, auto_cols, block = _hidden_tiles(math.prod(hidden.shape[:-1]), weight.shape[0], hidden.shape[-1],
                                                hidden.dtype, hidden.device)
    rows = auto_rows if row_chunk_size in (None, "auto") else _as_int(row_chunk_size, "row_chunk_size", minimum=1)
    cols = auto_cols if chunk_size in (None, "auto") else _as_int(chunk_size, "chunk_size", minimum=1)
    if check_inputs:
        _check_hidden_values(hidden, weight, bias, labels)
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if _fused.use_fused(hidden2d):  # CUDA: logits tiles in registers (entrokit.rl._triton)
        logp, ent = _fused.logprob_entropy_rows(hidden2d, weight, bias, labels.reshape(-1).long(), 1.0 / temperature)
    else:
        logp, ent = _LogprobEntropy.apply(
            hidden2d, weight, bias, labels.reshape(-1).long(), 1.0 / temperature, rows, cols, block
        )
    return logp.reshape(lead), ent.reshape(lead)
