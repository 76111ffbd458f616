"""SinKD: batch-wise Sinkhorn distillation loss (default, debiased and legacy modes)."""

import inspect

import pytest
import torch

from entrokit import InputError
from entrokit.nn.sinkd import SinkhornKDLoss, _check_logits, sinkhorn_kd_loss

F64 = torch.float64


def released_sinkd(y_s, y_t):
    """The released loss (2018cx/SinKD, loss.py::Sinkhorn), re-typed from its published
    description: T = 2, L1 cdist, eps = 0.1, 20 probability-domain row/column
    normalisations starting from the kernel, marginals of ones, weight 0.001."""
    T = 2
    p_s = torch.softmax(y_s / T, dim=1)
    p_t = torch.softmax(y_t / T, dim=1)
    Wxy = torch.cdist(p_s, p_t, p=1)
    K = torch.exp(-Wxy / 0.1)
    P = K
    for _ in range(20):
        P = P / torch.sum(P, dim=1, keepdim=True)
        P = P / torch.sum(P, dim=0, keepdim=True)
    return 0.001 * torch.sum(P * Wxy)


def _logits(B, K, seed, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=g, dtype=dtype) * scale


def _pair(B=16, K=10, seed=0, scale=1.0, noise=0.5):
    zt = _logits(B, K, seed, scale)
    zs = zt + noise * _logits(B, K, seed + 1000)
    return zs, zt


# -- legacy: the released numbers -----------------------------------------------------------
@pytest.mark.parametrize("B,K", [(1, 3), (2, 2), (16, 2), (16, 10), (64, 100)])
def test_legacy_equals_released_formula(B, K):
    zs, zt = _pair(B, K, seed=B + K, scale=3.0, noise=2.0)
    zs1 = zs.clone().requires_grad_()
    zs2 = zs.clone().requires_grad_()
    ours = SinkhornKDLoss(legacy=True)(zs1, zt)
    ref = released_sinkd(zs2, zt)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(zs1.grad, zs2.grad, rtol=1e-10, atol=1e-10)


def test_legacy_groups_are_independent_batches():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(3, 8, 5, dtype=F64, generator=g), torch.randn(3, 8, 5, dtype=F64, generator=g)
    per = SinkhornKDLoss(legacy=True, reduction="none")(zs, zt)
    assert per.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(per[i], released_sinkd(zs[i], zt[i]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(SinkhornKDLoss(legacy=True)(zs, zt), per.mean())


def test_legacy_is_batch_size_times_the_default_at_convergence():
    # marginals of ones: the released plan is B times the uniform one, so the released weight
    # 0.001 means 0.001 * B in the batch-size-invariant default
    B = 12
    zs, zt = _pair(B, 6, seed=4, scale=0.5, noise=0.3)
    legacy = SinkhornKDLoss(legacy=True, n_iter=3000)(zs, zt)
    default = SinkhornKDLoss(tol=1e-12)(zs, zt)
    torch.testing.assert_close(legacy, 0.001 * B * default, rtol=1e-8, atol=0)
    # and the released loss grows with the batch: duplicating it doubles the loss
    dup = released_sinkd(torch.cat([zs, zs]), torch.cat([zt, zt]))
    assert float(dup / released_sinkd(zs, zt)) == pytest.approx(2.0, rel=1e-3)


# -- default: batch-size invariant transport cost ----------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_default_is_invariant_to_duplicating_the_batch(dtype):
    zs, zt = _pair(16, 10, seed=5)
    zs, zt = zs.to(dtype), zt.to(dtype)
    tol = 1e-10 if dtype == F64 else 1e-5
    loss = SinkhornKDLoss(tol=tol)
    one = loss(zs, zt)
    for k in (2, 3):
        many = loss(zs.repeat(k, 1), zt.repeat(k, 1))
        torch.testing.assert_close(many, one, rtol=1e-7 if dtype == F64 else 1e-4, atol=0)
    assert 0.0 < float(one) < 2.0


def test_default_ignores_the_sample_order():
    # the batch-wise loss compares the two batches as sets (as the released loss does)
    zs, zt = _pair(10, 4, seed=6)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    loss = SinkhornKDLoss(tol=1e-10)
    torch.testing.assert_close(loss(zs[perm], zt), loss(zs, zt), rtol=1e-9, atol=0)
    torch.testing.assert_close(
        SinkhornKDLoss(legacy=True)(zs[perm], zt), SinkhornKDLoss(legacy=True)(zs, zt), rtol=1e-9, atol=0
    )


def test_default_is_the_transport_cost_of_the_uniform_entropic_plan():
    import entrokit

    zs, zt = _pair(9, 5, seed=7)
    C = torch.cdist(torch.softmax(zs / 3.0, -1), torch.softmax(zt / 3.0, -1), p=1)
    res = entrokit.sinkhorn(None, None, C, 0.2, tol=1e-12)
    torch.testing.assert_close((res.plan * C).sum(), res.transport_cost)
    ours = SinkhornKDLoss(temperature=3.0, eps=0.2, tol=1e-12, weight=0.5)(zs, zt)
    torch.testing.assert_close(ours, 0.5 * res.transport_cost, rtol=1e-10, atol=0)


def test_default_decreases_as_the_student_approaches_the_teacher():
    # not 0 at student == teacher (entropic blur of the plan) but minimal-ish there; the
    # debiased variant is exactly 0
    zt = _logits(16, 10, 8)
    direction = _logits(16, 10, 9)
    loss = SinkhornKDLoss(tol=1e-8)
    values = [float(loss(zt + s * direction, zt)) for s in (2.0, 1.0, 0.5, 0.25, 0.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] > 0  # the transport cost of identical batches is positive


def test_debiased_is_zero_iff_the_batches_match():
    zs, zt = _pair(16, 10, seed=10, scale=2.0)
    deb = SinkhornKDLoss(debias=True, tol=1e-10)
    assert abs(float(deb(zt, zt))) < 1e-9
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    assert abs(float(deb(zt[perm], zt))) < 1e-9  # the same set of distributions
    assert float(deb(zs, zt)) > 1e-3
    assert float(deb(zs, zt)) < float(SinkhornKDLoss(tol=1e-10)(zs, zt))


def test_groups_and_reductions():
    g = torch.Generator().manual_seed(11)
    zs, zt = torch.randn(3, 8, 5, dtype=F64, generator=g), torch.randn(3, 8, 5, dtype=F64, generator=g)
    per = SinkhornKDLoss(reduction="none", tol=1e-10)(zs, zt)
    assert per.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(per[i], SinkhornKDLoss(tol=1e-10)(zs[i], zt[i]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(SinkhornKDLoss(reduction="sum", tol=1e-10)(zs, zt), per.sum())


# -- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "debias", "legacy"])
def test_gradcheck(mode):
    zs, zt = _pair(5, 4, seed=12, scale=0.8, noise=0.6)
    kw = {"default": {}, "debias": {"debias": True}, "legacy": {"legacy": True}}[mode]
    loss = SinkhornKDLoss(tol=1e-13, **kw)
    zs = zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss(z, zt), (zs,), atol=1e-7, rtol=1e-5)


def test_envelope_gradient_holds_the_plan_fixed():
    import entrokit

    zs, zt = _pair(7, 4, seed=13)
    z1 = zs.clone().requires_grad_()
    SinkhornKDLoss(grad="envelope", tol=1e-12)(z1, zt).backward()
    z2 = zs.clone().requires_grad_()
    C = torch.cdist(torch.softmax(z2 / 2, -1), torch.softmax(zt / 2, -1), p=1)
    P = entrokit.sinkhorn(None, None, C.detach(), 0.1, tol=1e-12).plan
    (P * C).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-8, atol=1e-12)


def test_teacher_gets_no_gradient_and_float32_trains():
    zt = _logits(32, 10, 14, scale=3.0, dtype=torch.float32).requires_grad_()
    zs = _logits(32, 10, 15, dtype=torch.float32).requires_grad_()
    for kw in ({}, {"debias": True}, {"legacy": True}):
        loss = SinkhornKDLoss(**kw)(zs, zt)
        loss.backward()
        assert loss.dtype == torch.float32
        assert zt.grad is None
        assert bool(torch.isfinite(zs.grad).all()) and float(zs.grad.abs().sum()) > 0
        zs.grad = None


def test_half_precision_logits_are_computed_in_float32():
    zs, zt = _pair(8, 5, seed=16)
    zs_b = zs.to(torch.bfloat16).requires_grad_()
    out = SinkhornKDLoss()(zs_b, zt.to(torch.bfloat16))
    out.backward()
    assert out.dtype == torch.bfloat16 and zs_b.grad.dtype == torch.bfloat16
    ref = SinkhornKDLoss()(zs_b.detach().float(), zt.to(torch.bfloat16).float())
    assert float(out.detach()) == pytest.approx(float(ref), rel=1e-2)


# -- bad inputs ----------------------------------------------------------------------------
def test_bad_inputs():
    zs, zt = _pair(8, 5, seed=17)
    loss = SinkhornKDLoss()
    with pytest.raises(InputError, match="must have the same shape"):
        loss(zs, zt[:, :4])
    with pytest.raises(InputError, match="must have the same shape"):
        loss(zs, zt[:7])
    with pytest.raises(InputError, match=r"student_logits must have shape \[batch, classes\]"):
        loss(zs[0], zt[0])
    bad = zs.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(InputError, match=r"student_logits contain NaN or \+inf"):
        loss(bad, zt)
    bad = zt.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"teacher_logits contain NaN or \+inf"):
        loss(zs, bad)
    for v in (0.0, -0.1, float("inf")):
        with pytest.raises(InputError, match="eps must be a finite number > 0"):
            SinkhornKDLoss(eps=v)
        with pytest.raises(InputError, match="temperature must be a finite number > 0"):
            SinkhornKDLoss(temperature=v)
        with pytest.raises(InputError, match="temperature must be a finite number > 0"):
            sinkhorn_kd_loss(zs, zt, temperature=v)
    with pytest.raises(InputError, match="weight must be a finite number > 0"):
        SinkhornKDLoss(weight=-1.0)
    with pytest.raises(InputError, match="no debiased form"):
        SinkhornKDLoss(legacy=True, debias=True)
    with pytest.raises(InputError, match="reduction must be one of"):
        SinkhornKDLoss(reduction="batchmean")
    with pytest.raises(InputError, match="grad must be one of"):
        SinkhornKDLoss(grad="unroll")
    with pytest.raises(TypeError, match="must have a floating dtype"):
        loss(zs.long(), zt.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        loss(zs.numpy(), zt)


def test_module_options_are_the_functions():
    """The module takes the function's options with the same defaults, checks them the
    same way and passes them on unchanged."""
    fn = inspect.signature(sinkhorn_kd_loss).parameters
    mod = inspect.signature(SinkhornKDLoss.__init__).parameters
    options = {k: p.default for k, p in fn.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {k: p.default for k, p in mod.items() if k != "self"} == options
    zs, zt = _pair(8, 5, seed=19)
    for mode in ({}, {"debias": True}, {"legacy": True, "n_iter": 7}, {"weight": 0.3, "temperature": 3.0}):
        torch.testing.assert_close(SinkhornKDLoss(**mode)(zs, zt), sinkhorn_kd_loss(zs, zt, **mode), rtol=0, atol=0)
    with pytest.raises(TypeError, match="debias must be True or False, got int"):
        SinkhornKDLoss(debias=1)
    with pytest.raises(TypeError, match="legacy must be True or False, got str"):
        sinkhorn_kd_loss(zs, zt, legacy="yes")


def test_teacher_on_another_device_is_refused():
    """The device check itself (the public entry refuses a meta tensor before it)."""
    zs, zt = _pair(8, 5, seed=18)
    with pytest.raises(InputError, match=r"device mismatch: student_logits is on cpu but teacher_logits is on meta"):
        _check_logits(zs, zt.to("meta"), check_inputs=False)


@pytest.mark.parametrize("mode", [{}, {"debias": True}, {"legacy": True}, {"grad": "envelope"}])
def test_masked_classes_are_minus_inf_logits(mode):
    """-inf logits (masked classes) give probability exactly 0: the loss equals the loss
    with those classes removed, and the gradients are finite (0 at the masked logits).
    The class masked on every sample is removed exactly; the one masked on one sample is
    compared with a very negative finite logit there (softmax weight below 1e-300)."""
    zs, zt = _pair(16, 6, seed=21)
    mask = torch.zeros(16, 6, dtype=torch.bool)
    mask[:, 5] = True
    mask[3, 2] = True
    s = zs.clone().requires_grad_(True)
    loss = SinkhornKDLoss(**mode)
    out = loss(s.masked_fill(mask, float("-inf")), zt.masked_fill(mask, float("-inf")))
    out.backward()
    ref_s = zs[:, :5].clone()
    ref_t = zt[:, :5].clone()
    ref_s[3, 2] = ref_t[3, 2] = -2000.0  # exp(-1000) underflows to exactly 0 after /T
    ref = loss(ref_s, ref_t)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=0.0)
    assert bool(torch.isfinite(s.grad).all())
    assert float(s.grad[mask].abs().max()) == 0.0


def test_a_sample_with_every_class_masked_is_refused():
    zs, zt = _pair(8, 5, seed=22)
    zs[2] = float("-inf")
    with pytest.raises(InputError, match=r"student_logits mask every class of sample \(2,\)"):
        SinkhornKDLoss()(zs, zt)
