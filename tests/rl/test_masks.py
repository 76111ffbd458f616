"""top_entropy_mask, distributed_quantile and aggregate: references written out, 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrokit import InputError
from entrokit.rl import AGG_MODES, aggregate, distributed_quantile, top_entropy_mask
from gloo_ranks import run_on_ranks


def _batch(seed=0, b=5, t=12):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    m = torch.rand(b, t, generator=g) > 0.35
    m[-1] = False  # one sequence without a valid token
    return h, m


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.05, 1.0])
def test_batch_mask_matches_torch_quantile(rho):
    h, m = _batch()
    keep = top_entropy_mask(h, m, top_fraction=rho)
    thr = torch.quantile(h[m], 1 - rho)
    assert torch.equal(keep, m & (h >= thr))
    assert abs(keep.sum().item() - rho * m.sum().item()) <= 1 + 1e-9


def test_batch_mask_fraction_one_keeps_every_valid_token():
    h, m = _batch(1)
    assert torch.equal(top_entropy_mask(h, m, top_fraction=1.0), m)
    assert torch.equal(top_entropy_mask(h, top_fraction=1.0), torch.ones_like(m))


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_sequence_mask_matches_row_loop(rho):
    h, m = _batch(2)
    keep = top_entropy_mask(h, m, top_fraction=rho, per="sequence")
    for b in range(h.shape[0]):
        if m[b].any():
            thr = torch.quantile(h[b][m[b]], 1 - rho)
            assert torch.equal(keep[b], m[b] & (h[b] >= thr))
        else:
            assert not keep[b].any()


def test_masks_ignore_values_at_invalid_positions():
    h, m = _batch(3)
    poisoned = h.masked_fill(~m, 1e9)
    for per in ("batch", "sequence"):
        assert torch.equal(top_entropy_mask(h, m, per=per), top_entropy_mask(poisoned, m, per=per))


def test_ties_are_kept():
    h = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert top_entropy_mask(h, top_fraction=0.25).tolist() == [[True, True, True, False]]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 9), rho=st.floats(0.01, 1.0), seed=st.integers(0, 10**6))
def test_sequence_mask_hypothesis(b, t, rho, seed):
    h, m = _batch(seed, b, t)
    keep = top_entropy_mask(h, m, top_fraction=rho, per="sequence")
    for i in range(b):
        if m[i].any():
            assert torch.equal(keep[i], m[i] & (h[i] >= torch.quantile(h[i][m[i]], 1 - rho)))


def test_empty_selection_keeps_nothing():
    h = torch.rand(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    assert not top_entropy_mask(h, m).any()
    assert not top_entropy_mask(h, m, per="sequence").any()


# ----------------------------------------------------------------------------- aggregate
def agg_reference(x, m, mode, normalizer=None, horizon=None):
    """Written out with Python loops over sequences."""
    m = m.double()
    rows = [i for i in range(x.shape[0]) if m[i].sum() > 0]
    if mode == "token-mean":
        total = sum(float((x[i] * m[i]).sum()) for i in range(x.shape[0]))
        den = float(m.sum()) if normalizer is None else normalizer
        return total / den if den > 0 else 0.0
    per_seq = []
    for i in rows:
        s = float((x[i] * m[i]).sum())
        per_seq.append(s / float(m[i].sum()) if mode == "seq-mean-token-mean" else s)
    den = len(rows) if normalizer is None else normalizer
    out = sum(per_seq) / den if den > 0 else 0.0
    if mode == "seq-mean-token-sum-norm":
        out /= x.shape[-1] if horizon is None else horizon
    return out


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_reference(mode):
    h, m = _batch(4)
    assert aggregate(h, m, mode).item() == pytest.approx(agg_reference(h, m, mode), rel=1e-12)
    w = torch.rand(h.shape, dtype=torch.float64)  # float weights
    assert aggregate(h, w, mode).item() == pytest.approx(agg_reference(h, w, mode), rel=1e-12)


def test_aggregate_horizon_and_defaults():
    h, m = _batch(5)
    assert aggregate(h, m, "seq-mean-token-sum-norm", horizon=100).item() == pytest.approx(
        agg_reference(h, m, "seq-mean-token-sum-norm", horizon=100), rel=1e-12)
    assert aggregate(h).item() == pytest.approx(h.mean().item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_normalizer_makes_micro_batches_sum_to_the_batch(mode):
    h, m = _batch(6, b=8)
    full = aggregate(h, m, mode)
    parts = [(h[i : i + 3], m[i : i + 3]) for i in range(0, 8, 3)]
    if mode == "token-mean":
        n = m.sum()
    else:
        n = (m.sum(-1) > 0).sum()
    total = sum(aggregate(x, mm, mode, normalizer=n, horizon=h.shape[-1]) for x, mm in parts)
    torch.testing.assert_close(total, full)
    # a Python number works as well as a tensor
    total = sum(aggregate(x, mm, mode, normalizer=int(n)) for x, mm in parts)
    torch.testing.assert_close(total, full)


def test_aggregate_gradient_and_masked_nan():
    h, m = _batch(7)
    x = h.masked_fill(~m, float("nan")).requires_grad_()
    for mode in AGG_MODES:
        out = aggregate(x, m, mode)
        assert torch.isfinite(out)
        (g,) = torch.autograd.grad(out, x)
        assert torch.equal(g[~m], torch.zeros_like(g[~m]))
        assert bool((g[m] > 0).all())


def test_aggregate_empty_selection_is_zero():
    x = torch.rand(2, 3, requires_grad=True)
    m = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGG_MODES:
        assert aggregate(x, m, mode).item() == 0.0


# ----------------------------------------------------------------------------- 2 gloo ranks
WORLD = 2


def _scenarios(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    n = 37 if rank == 0 else 11
    vals = torch.rand(n, generator=g, dtype=torch.float64)
    out = {"vals": vals, "q": {}, "empty_q": None}
    for q in (0.0, 0.3, 0.8, 1.0):
        out["q"][q] = distributed_quantile(vals, q)
    # one rank holds no value at all
    out["empty_q"] = distributed_quantile(vals if rank == 0 else vals[:0], 0.8)
    h = torch.rand(3, 9, generator=g, dtype=torch.float64)
    m = torch.rand(3, 9, generator=g) > 0.3
    out["h"], out["m"] = h, m
    out["mask"] = top_entropy_mask(h, m, top_fraction=0.2, group="world")
    out["local_mask"] = top_entropy_mask(h, m, top_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("rlq"), timeout_s=120)


def test_distributed_quantile_is_exact(ranks):
    allv = torch.cat([r["vals"] for r in ranks])
    for q in (0.0, 0.3, 0.8, 1.0):
        ref = torch.quantile(allv, q)
        for r in ranks:
            assert r["q"][q].item() == ref.item()
    assert ranks[0]["empty_q"].item() == ranks[1]["empty_q"].item() == torch.quantile(ranks[0]["vals"], 0.8).item()


def test_global_top_entropy_mask_equals_one_big_batch(ranks):
    h = torch.cat([r["h"] for r in ranks])
    m = torch.cat([r["m"] for r in ranks])
    ref = top_entropy_mask(h, m, top_fraction=0.2)
    got = torch.cat([r["mask"] for r in ranks])
    assert torch.equal(got, ref)
    # and differs from the rank-local rule on this data (the gather matters)
    assert not torch.equal(torch.cat([r["local_mask"] for r in ranks]), ref)


# ----------------------------------------------------------------------------- bad inputs
HB, MB = _batch(8)

BAD = [
    (lambda: top_entropy_mask(HB, MB[:, :-1]), InputError, r"mask has shape \(5, 11\)"),
    (lambda: top_entropy_mask(HB, MB, top_fraction=0.0), InputError, r"top_fraction must lie in \(0, 1\]"),
    (lambda: top_entropy_mask(HB, MB, top_fraction=1.2), InputError, r"top_fraction must lie in \(0, 1\]"),
    (lambda: top_entropy_mask(HB, MB, top_fraction="0.2x"), TypeError, "top_fraction must be a real number"),
    (lambda: top_entropy_mask(HB, MB, per="token"), InputError, "per must be 'batch' or 'sequence'"),
    (lambda: top_entropy_mask(HB[0], MB[0], per="sequence"), InputError, r"needs a \(batch, time\) tensor"),
    (lambda: top_entropy_mask(HB, MB, group="world"), InputError, "torch.distributed is not initialised"),
    (lambda: top_entropy_mask(HB, MB.double()), TypeError, "mask must be boolean here"),
    (lambda: top_entropy_mask(HB.long(), MB), TypeError, "entropy must be a floating tensor"),
    (lambda: top_entropy_mask(torch.empty(0, 3), None), InputError, "entropy is empty"),
    (lambda: top_entropy_mask(HB.to("meta"), None), InputError, "meta tensor"),
    (lambda: aggregate(HB, MB, "seq-sum"), InputError, "mode must be one of 'token-mean'"),
    (lambda: aggregate(HB, MB[:2]), InputError, r"mask has shape \(2, 12\)"),
    (lambda: aggregate(HB, MB, normalizer=0), InputError, "normalizer must be a finite number > 0"),
    (lambda: aggregate(HB, MB, normalizer="many"), TypeError, "normalizer must be a positive number"),
    (lambda: aggregate(HB, MB, normalizer=torch.ones(2)), InputError, "normalizer must be a scalar"),
    (lambda: aggregate(HB[0], MB[0], "seq-mean-token-mean"), InputError, r"needs a \(batch, time\) tensor"),
    (lambda: aggregate(HB, MB, "seq-mean-token-sum-norm", horizon=0), InputError, "horizon must be a finite"),
    (lambda: aggregate(torch.empty(0, 4)), InputError, "x is empty"),
    (lambda: distributed_quantile(HB.flatten(), 1.5), InputError, r"q must lie in \[0, 1\]"),
    (lambda: distributed_quantile(HB, 0.5), InputError, "values must be a 1-D floating tensor"),
]


@pytest.mark.parametrize("call,err,match", BAD)
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call()
