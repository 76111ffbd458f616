import math

import pytest
import torch
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit.regularizers import (
    AttentionEntropyMaximization,
    aem_loss,
    cosine_annealed_lambda,
    negative_attention_entropy,
)


def test_uniform_attention_gives_minus_log_n():
    for n in (3, 10, 50):
        a = torch.full((2, n), 1.0 / n, dtype=torch.float64)
        torch.testing.assert_close(negative_attention_entropy(a), torch.full((2,), -math.log(n), dtype=torch.float64))
    # multi-row attention: summed over instances, averaged over rows
    a = torch.stack([torch.full((4,), 0.25), F.one_hot(torch.tensor(1), 4).float()])[None]
    torch.testing.assert_close(negative_attention_entropy(a), torch.tensor([-math.log(4) / 2]))


def test_aem_equals_ce_plus_lambda_neg_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    att = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(aem_loss(logits, y, att, lam=0.0), ce)
    ne = (att * att.log()).sum(-1).mean()
    torch.testing.assert_close(aem_loss(logits, y, att, lam=0.3), ce + 0.3 * ne)
    # uniform attention: loss = CE - λ log N
    uni = torch.full((4, 7), 1 / 7, dtype=torch.float64)
    torch.testing.assert_close(aem_loss(logits, y, uni, lam=0.1), ce - 0.1 * math.log(7))
    # binary head with float targets
    bl = torch.randn(4, generator=g, dtype=torch.float64)
    bt = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(aem_loss(bl, bt, uni, lam=0.0), F.binary_cross_entropy_with_logits(bl, bt))


def test_gradient_pushes_attention_toward_uniform():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(1, 2, dtype=torch.float64)
    loss = aem_loss(logits, torch.tensor([0]), s.softmax(-1), lam=1.0)
    loss.backward()
    with torch.no_grad():
        s2 = s - 0.1 * s.grad
    h = lambda z: -negative_attention_entropy(z.softmax(-1))  # noqa: E731
    assert h(s2) > h(s.detach())


def test_mask_and_topk():
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(negative_attention_entropy(a, m), torch.tensor([-math.log(2)], dtype=torch.float64))
    b = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    top = torch.tensor([0.4, 0.3], dtype=torch.float64) / 0.7
    torch.testing.assert_close(negative_attention_entropy(b, topk=2), (top * top.log()).sum().reshape(1))


def test_cosine_annealing_module():
    assert cosine_annealed_lambda(0, 10, 0.2, 0.0) == pytest.approx(0.2)
    assert cosine_annealed_lambda(5, 10, 0.2, 0.0) == pytest.approx(0.1)
    assert cosine_annealed_lambda(10, 10, 0.2, 0.02) == pytest.approx(0.02)
    assert cosine_annealed_lambda(20, 10, 0.2, 0.02) == pytest.approx(0.02)
    crit = AttentionEntropyMaximization(lam=0.2, anneal="cosine", total_steps=4)
    logits, y = torch.zeros(1, 2), torch.tensor([1])
    att = torch.full((1, 5), 0.2)
    vals = []
    for _ in range(5):
        vals.append(crit(logits, y, att).item())
        crit.step()
    lam = [cosine_annealed_lambda(t, 4, 0.2) for t in range(5)]
    for v, lt in zip(vals, lam):
        assert v == pytest.approx(math.log(2) - lt * math.log(5), rel=1e-6)
    assert int(crit.state_dict()["step_count"]) == 5
    plain = AttentionEntropyMaximization()
    assert plain.current_lam == 0.1


def test_errors():
    with pytest.raises(InputError, match="lam"):
        aem_loss(torch.zeros(1, 2), torch.tensor([0]), torch.full((1, 3), 1 / 3), lam=-0.1)
    with pytest.raises(InputError, match="sum to 1"):
        negative_attention_entropy(torch.full((1, 3), 0.5))
    with pytest.raises(InputError, match="bags, instances"):
        negative_attention_entropy(torch.full((3,), 1 / 3))
    with pytest.raises(InputError, match="total_steps"):
        AttentionEntropyMaximization(anneal="cosine")
    with pytest.raises(InputError, match="bags"):
        aem_loss(torch.zeros(2, 2), torch.tensor([0, 1]), torch.full((1, 3), 1 / 3))
    with pytest.raises(InputError, match="integer targets|float 0/1"):
        aem_loss(torch.zeros(2), torch.tensor([0, 1]), torch.full((2, 3), 1 / 3))
    with pytest.raises(InputError, match="reduction"):
        aem_loss(torch.zeros(1, 2), torch.tensor([0]), torch.full((1, 3), 1 / 3), reduction="avg")


def test_validation_of_shapes_and_options():
    import torch

    from entrokit._errors import InputError
    from entrokit.regularizers import (
        AttentionEntropyMaximization,
        aem_loss,
        negative_attention_entropy,
    )

    att = torch.softmax(torch.randn(2, 5), -1)
    with pytest.raises(InputError, match=r"mask of shape \(3,\) does not broadcast to attention \(2, 5\)"):
        negative_attention_entropy(att, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        negative_attention_entropy(att, [True] * 5)
    with pytest.raises(InputError, match=r"must have one row per bag"):
        aem_loss(torch.randn(3, 2), torch.tensor([0, 1]), att)
    with pytest.raises(InputError, match=r"attention has 2 bags but logits has 3"):
        aem_loss(torch.randn(3, 2), torch.tensor([0, 1, 1]), att)
    with pytest.raises(TypeError, match=r"logits must have a floating dtype"):
        aem_loss(torch.tensor([[1, 0], [0, 1]]), torch.tensor([0, 1]), att)
    with pytest.raises(InputError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
        aem_loss(torch.randn(2, 2), torch.tensor([0, 1]), att, reduction="avg")
    with pytest.raises(InputError, match=r"topk must be an int >= 1 or None, got 0"):
        AttentionEntropyMaximization(topk=0)
    with pytest.raises(InputError, match=r"reduction must be one of"):
        AttentionEntropyMaximization(reduction="avg")
    with pytest.raises(InputError, match=r"anneal='cosine' needs total_steps"):
        AttentionEntropyMaximization(anneal="cosine", total_steps=True)


# --- score (log-softmax) path ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 9)])
@pytest.mark.parametrize("topk", [None, 3])
def test_score_path_equals_probability_path(shape, topk):
    g = torch.Generator().manual_seed(2)
    s = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    s2 = s.detach().clone().requires_grad_(True)
    from_scores = negative_attention_entropy(scores=s, topk=topk)
    from_probs = negative_attention_entropy(s2.softmax(-1), topk=topk)
    torch.testing.assert_close(from_scores, from_probs)
    from_scores.sum().backward()
    from_probs.sum().backward()
    torch.testing.assert_close(s.grad, s2.grad)
    # and through the full loss, with the module too
    logits, y = torch.randn(shape[0], 2, generator=g, dtype=torch.float64), torch.arange(shape[0]) % 2
    torch.testing.assert_close(
        aem_loss(logits, y, lam=0.3, scores=s.detach(), topk=topk),
        aem_loss(logits, y, s.detach().softmax(-1), lam=0.3, topk=topk),
    )
    crit = AttentionEntropyMaximization(lam=0.3, topk=topk, reduction="none")
    torch.testing.assert_close(crit(logits, y, scores=s.detach()), crit(logits, y, s.detach().softmax(-1)))


def test_score_path_with_mask_matches_unpadded_bags():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    got = negative_attention_entropy(scores=s.masked_fill(~mask, 1e4), mask=mask)  # padded scores ignored
    want = torch.stack([negative_attention_entropy(scores=s[:1])[0], negative_attention_entropy(scores=s[1:, :3])[0]])
    torch.testing.assert_close(got, want)
    # probability path with the same mask (softmax over the real instances) agrees
    a = s.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(negative_attention_entropy(a, mask), want)
    # a score of -inf is zero attention, without NaN in value or gradient
    s3 = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    v = negative_attention_entropy(scores=s3)
    v.backward()
    torch.testing.assert_close(v.detach(), torch.tensor([-math.log(2)], dtype=torch.float64))
    assert torch.isfinite(s3.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_bag_with_large_score_spread_does_not_underflow(dtype):
    # 100k instances: a block of 1,000 with spread scores carries the attention, the other
    # 99,000 lie 60 to ~250 below it, so most of their softmax weights are exactly 0 in
    # float32 (all but a few in float16). The entropy and its gradient must still be right.
    g = torch.Generator().manual_seed(4)
    s64 = torch.cat(
        [3 * torch.randn(1, 1000, generator=g, dtype=torch.float64),
         -60 - 40 * torch.randn(1, 99_000, generator=g, dtype=torch.float64).abs()], dim=1,
    )
    s = s64.to(dtype).requires_grad_(True)
    assert (s.detach().softmax(-1) == 0).float().mean() > 0.4  # the weights do underflow
    sq = s.detach().double().requires_grad_(True)  # the rounded scores, in float64
    ref = (sq.softmax(-1) * sq.log_softmax(-1)).sum(-1)
    ref.backward()
    got = negative_attention_entropy(scores=s)
    assert got.dtype == dtype  # computed in float32, returned in the caller's dtype
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref.detach(), rtol=rtol, atol=1e-6)
    got.sum().backward()
    atol = 1e-6 if dtype == torch.float32 else 1e-3  # the gradient is stored in `dtype`
    torch.testing.assert_close(s.grad.double(), sq.grad, rtol=1e-2, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_uniform_bag_in_half_precision(dtype):
    # uniform attention over 100k instances is 1e-5, a subnormal float16 number: the weights
    # lose precision, the scores do not.
    n = 100_000
    flat = negative_attention_entropy(scores=torch.zeros(1, n, dtype=dtype))
    assert flat.dtype == dtype
    # -log n rounded once to `dtype`
    torch.testing.assert_close(flat.double(), torch.tensor([-math.log(n)], dtype=torch.float64),
                               rtol=torch.finfo(dtype).eps / 2, atol=0)
    w = torch.zeros(1, n, dtype=dtype).softmax(-1)  # accepted: row-sum tolerance 1e-2 in half
    assert abs(negative_attention_entropy(w).item() + math.log(n)) < 0.1


def test_score_path_errors():
    s = torch.randn(2, 5)
    with pytest.raises(InputError, match="exactly one of attention= .* got both"):
        negative_attention_entropy(s.softmax(-1), scores=s)
    with pytest.raises(InputError, match="exactly one of attention= .* got neither"):
        negative_attention_entropy()
    with pytest.raises(InputError, match="exactly one of attention="):
        aem_loss(torch.zeros(2, 2), torch.tensor([0, 1]), lam=0.1)
    with pytest.raises(TypeError, match="scores must be a floating torch.Tensor"):
        negative_attention_entropy(scores=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"scores must be \(bags, instances\)"):
        negative_attention_entropy(scores=torch.randn(5))
    with pytest.raises(InputError, match="must not contain NaN or \\+inf"):
        negative_attention_entropy(scores=torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputError, match="must not contain NaN or \\+inf"):
        negative_attention_entropy(scores=torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(InputError, match="at least one real instance"):
        negative_attention_entropy(scores=s, mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(InputError, match="scores has 2 bags but logits has 3"):
        aem_loss(torch.randn(3, 2), torch.tensor([0, 1, 1]), scores=s)
    with pytest.raises(InputError, match="pass the raw scores as scores="):
        negative_attention_entropy(torch.full((1, 3), 0.5))


def test_lambda_default_is_documented_as_readme_value():
    # 0.1 is the value of the reference README's AEM command; main.py's own default is 0.0
    import inspect

    assert inspect.signature(aem_loss).parameters["lam"].default == 0.1
    assert AttentionEntropyMaximization().lam == 0.1
    doc = inspect.getmodule(aem_loss).__doc__
    assert "--lamda 0.0" in doc and "README" in doc


def test_bfloat16_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(26)
    scores = torch.randn(3, 7, generator=g)
    logits = torch.randn(3, generator=g)
    target = torch.tensor([1.0, 0.0, 1.0])
    out, ref = under_autocast(lambda z, s: AttentionEntropyMaximization(lam=0.1)(z, target, scores=s), logits, scores)
    # computed in float32 for half inputs and returned in the caller's dtype (module docstring)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    z, s = logits.bfloat16().requires_grad_(True), scores.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        AttentionEntropyMaximization(lam=0.1)(z, target, scores=s).backward()
    assert z.grad.dtype == s.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["scores", "attention"])
def test_half_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype, path):
    from mixed_precision import assert_half_in_half_out

    # 3,000 instances and 500 classes: sums that lose several units in the last place when
    # accumulated in half precision
    g = torch.Generator().manual_seed(27)
    logits, scores = 3 * torch.randn(6, 500, generator=g), 2 * torch.randn(6, 3000, generator=g)
    target = torch.randint(0, 500, (6,), generator=g)

    def loss(z, s):
        if path == "scores":
            return aem_loss(z, target, scores=s, lam=0.5, reduction="none")
        # the weights rounded to `dtype` sum to 1 only to its precision: no row-sum check
        return aem_loss(z, target, s, lam=0.5, reduction="none", check_inputs=False)

    assert_half_in_half_out(loss, logits, scores if path == "scores" else scores.softmax(-1), dtype=dtype)
    assert_half_in_half_out(lambda s: negative_attention_entropy(scores=s), scores, dtype=dtype)


def test_out_of_range_target_is_an_input_error():
    # the same error as ELRLoss and PSKDLoss for a class id outside [0, C)
    attention = torch.full((3, 4), 0.25)
    for bad, got in ((torch.tensor([0, 5, 1]), "got 5"), (torch.tensor([0, -1, 1]), "got -1")):
        with pytest.raises(InputError, match=rf"target out of range: {got}, expected 0 <= target < num_classes=2"):
            aem_loss(torch.randn(3, 2), bad, attention)
        with pytest.raises(InputError, match="target out of range"):
            AttentionEntropyMaximization()(torch.randn(3, 2), bad, attention)


def test_topk_larger_than_the_bag_is_the_whole_bag():
    a = torch.softmax(torch.randn(2, 5, generator=torch.Generator().manual_seed(3)), -1)
    torch.testing.assert_close(negative_attention_entropy(a, topk=50), negative_attention_entropy(a))
