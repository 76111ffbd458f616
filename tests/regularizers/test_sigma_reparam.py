import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from entrokit._errors import InputError
from entrokit.regularizers import (
    SigmaReparam,
    SigmaReparamLinear,
    convert_to_sigma_reparam,
    spectral_norm_step,
)
from entrokit.regularizers.sigma_reparam import SigmaReparamConv2d


def test_identity_at_init_linear_and_wrapper():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    y = lin(x)
    wrapped = SigmaReparam(lin)
    torch.testing.assert_close(wrapped.reparametrized_weight(), lin.weight)
    torch.testing.assert_close(wrapped(x), y)
    new = SigmaReparamLinear.from_linear(lin)
    torch.testing.assert_close(new(x), y)
    torch.testing.assert_close(new.gamma.detach(), torch.linalg.matrix_norm(lin.weight.detach(), ord=2))


def test_reference_init_and_spectral_norm_tracks_gamma():
    torch.manual_seed(1)
    lin = SigmaReparamLinear(20, 10, dtype=torch.float64)
    assert abs(lin.weight.std().item() - 0.02) < 0.01  # reference: trunc-normal std 0.02
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # change W and γ
        x = torch.randn(8, 20, generator=g, dtype=torch.float64)
        lin(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        lin.weight.add_(0.05 * torch.randn(10, 20, generator=g, dtype=torch.float64))
    for _ in range(100):  # power iteration: one step per training forward
        lin(torch.zeros(1, 20, dtype=torch.float64))
    true = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    torch.testing.assert_close(lin.sigma, true, rtol=1e-6, atol=0)
    lin.eval()
    W_hat = lin._reparam_weight(lin.weight).detach()
    torch.testing.assert_close(torch.linalg.matrix_norm(W_hat, ord=2), lin.gamma.detach().abs(), rtol=1e-6, atol=0)


def test_eval_does_not_update_state_and_train_does():
    torch.manual_seed(3)
    lin = SigmaReparamLinear(6, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))  # u no longer the top vector
    u0 = lin.u.clone()
    lin.eval()
    lin(torch.randn(2, 6, dtype=torch.float64))
    assert torch.equal(lin.u, u0)
    lin.train()
    lin(torch.randn(2, 6, dtype=torch.float64))
    assert not torch.equal(lin.u, u0)


def test_spectral_norm_step_converges_and_has_weight_gradient():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(6, generator=g, dtype=torch.float64), dim=0)
    for _ in range(200):
        sigma, u = spectral_norm_step(W, u)
    torch.testing.assert_close(sigma.detach(), torch.linalg.matrix_norm(W.detach(), ord=2))
    sigma.backward()
    U, S, Vh = torch.linalg.svd(W.detach())
    torch.testing.assert_close(W.grad, torch.outer(U[:, 0], Vh[0]).mul(torch.sign(U[:, 0] @ W.detach() @ Vh[0])), atol=1e-6, rtol=0)


def test_state_dict_round_trip():
    torch.manual_seed(5)
    a = SigmaReparamLinear(8, 4)
    for _ in range(3):
        a(torch.randn(2, 8))
    with torch.no_grad():
        a.gamma.mul_(1.7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = SigmaReparamLinear(8, 4)
    b.load_state_dict(torch.load(buf))
    assert set(a.state_dict()) == {"weight", "bias", "gamma", "u", "sigma"}
    for k in ("u", "sigma", "gamma"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    a.eval(), b.eval()
    x = torch.randn(3, 8)
    assert torch.equal(a(x), b(x))


def test_convert_model_keeps_function():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 2)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = model(x)
    convert_to_sigma_reparam(model, exclude=["3"])
    assert isinstance(model[0], SigmaReparamLinear) and isinstance(model[2][0], SigmaReparamLinear)
    assert type(model[3]) is nn.Linear
    torch.testing.assert_close(model(x), y)
    m2 = convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3)), wrap=True)
    assert isinstance(m2[0], SigmaReparam)
    mha = nn.Sequential(nn.MultiheadAttention(4, 2))
    convert_to_sigma_reparam(mha)
    assert type(mha[0].out_proj) is not SigmaReparamLinear  # skipped on purpose


def test_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        SigmaReparam(nn.Conv1d(2, 2, 1))
    with pytest.raises(InputError, match="from_linear"):
        convert_to_sigma_reparam(nn.Linear(2, 2))
    with pytest.raises(InputError, match="init_std"):
        SigmaReparamLinear(2, 2, init_std=-1.0)


def test_spectral_norm_step_and_init_std_validation():
    import pytest
    import torch

    from entrokit._errors import InputError
    from entrokit.regularizers import SigmaReparamLinear, spectral_norm_step

    with pytest.raises(InputError, match=r"u must have shape \(4,\).*got \(3,\)"):
        spectral_norm_step(torch.randn(2, 4), torch.ones(3))
    with pytest.raises(InputError, match=r"weight must be a matrix"):
        spectral_norm_step(torch.randn(4), torch.ones(4))
    with pytest.raises(InputError, match=r"init_std must be a finite number > 0, got inf; pass a positive value such as init_std=0.02, or None"):
        SigmaReparamLinear(4, 2, init_std=float("inf"))


# ---------------------------------------------------------------------------------------
# Conv2d: sigma is the spectral norm of the flattened kernel (out, in/groups*kh*kw), the
# reference definition (its SNConv2d is an SNLinear with in_features = in*kh*kw)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_sigma_matches_svd_of_flattened_kernel(groups):
    torch.manual_seed(10)
    conv = SigmaReparamConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64)
    assert conv.u.shape == (4 // groups * 9,)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move W away from its initial SVD so the power iteration has work
        conv.weight.add_(0.05 * torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    for _ in range(200):
        conv(x)
    flat = conv.weight.detach().reshape(6, -1)
    true = torch.linalg.svdvals(flat)[0]
    torch.testing.assert_close(conv.sigma, true, rtol=1e-8, atol=0)
    conv.eval()
    w_hat = conv._reparam_weight(conv.weight).detach()
    torch.testing.assert_close(torch.linalg.svdvals(w_hat.reshape(6, -1))[0], conv.gamma.detach().abs(),
                               rtol=1e-8, atol=0)
    # the layer is its own convolution with the reparameterised kernel
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1, groups=groups))


def test_conv2d_identity_at_init_wrapper_and_convert():
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(5, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = model(x)
    conv = model[0]
    torch.testing.assert_close(SigmaReparam(conv)(x), conv(x))
    new = SigmaReparamConv2d.from_conv2d(conv)
    assert new.padding_mode == "reflect" and new.padding == (1, 1)
    torch.testing.assert_close(new(x), conv(x))
    torch.testing.assert_close(new.gamma.detach(), torch.linalg.svdvals(conv.weight.detach().reshape(5, -1))[0])
    convert_to_sigma_reparam(model)
    assert isinstance(model[0], SigmaReparamConv2d) and isinstance(model[2], SigmaReparamConv2d)
    assert isinstance(model[4], SigmaReparamLinear)
    torch.testing.assert_close(model(x), y)
    m2 = convert_to_sigma_reparam(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Linear(2, 2)), include_conv2d=False)
    assert type(m2[0]) is nn.Conv2d and isinstance(m2[1], SigmaReparamLinear)
    m3 = convert_to_sigma_reparam(nn.Sequential(nn.Conv2d(2, 2, 3)), wrap=True)
    assert isinstance(m3[0], SigmaReparam) and isinstance(m3[0].module, nn.Conv2d)


# ---------------------------------------------------------------------------------------
# autocast: the power iteration and sigma stay float32
# ---------------------------------------------------------------------------------------


def _unconverged_linear(seed: int) -> SigmaReparamLinear:
    torch.manual_seed(seed)
    lin = SigmaReparamLinear(64, 48, init_std=None)
    with torch.no_grad():  # u is no longer the top singular vector
        lin.weight.mul_(torch.linspace(0.2, 3.0, 64))
    return lin


def test_power_iteration_stays_float32_under_cpu_bf16_autocast():
    ref, lin = _unconverged_linear(13), _unconverged_linear(13)
    x = torch.randn(4, 64)
    for _ in range(3):
        y_ref = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
    assert y.dtype == torch.bfloat16 and y_ref.dtype == torch.float32  # the matmul is autocast
    assert lin.u.dtype == torch.float32 and lin.sigma.dtype == torch.float32
    # same state as without autocast, to float32 rounding (bfloat16 would be off by ~1e-3)
    torch.testing.assert_close(lin.u, ref.u, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.sigma, ref.sigma, rtol=1e-6, atol=0)
    # spectral_norm_step itself: float32 sigma with a float32 gradient under autocast
    w = ref.weight.detach().clone().requires_grad_(True)
    u0 = F.normalize(torch.linspace(-1, 1, 64), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_ac, u_ac = spectral_norm_step(w, u0)
    s_fp, u_fp = spectral_norm_step(w.detach(), u0)
    assert s_ac.dtype == torch.float32 and u_ac.dtype == torch.float32
    torch.testing.assert_close(s_ac.detach(), s_fp, rtol=1e-6, atol=0)
    torch.testing.assert_close(u_ac, u_fp, rtol=0, atol=1e-6)
    s_ac.backward()
    assert w.grad.dtype == torch.float32
    # the check is sensitive: the same step left to autocast is visibly off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_bf = F.normalize(w.detach() @ u0, dim=0)
        u_bf = F.normalize(w.detach().t() @ v_bf, dim=0)
    assert u_bf.dtype == torch.bfloat16 and (u_bf.float() - u_fp).abs().max() > 1e-4


def test_conv2d_power_iteration_float32_under_autocast_and_bf16_weights():
    torch.manual_seed(14)
    a = SigmaReparamConv2d(3, 8, 3, init_std=None)
    b = SigmaReparamConv2d(3, 8, 3, init_std=None)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 7, 7)
    a(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = b(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(b.u, a.u, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.sigma, a.sigma, rtol=1e-6, atol=0)
    # bfloat16 weights: sigma is still computed (and returned) in float32
    w16 = a.weight.detach().to(torch.bfloat16)
    s, u = spectral_norm_step(w16, a.u.to(torch.bfloat16))
    assert s.dtype == torch.float32 and u.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# reference re-initialisation (convert_to_sn builds new layers)
# ---------------------------------------------------------------------------------------


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(300, 200)
        self.conv = nn.Conv2d(16, 32, 3)


def test_reinit_follows_reference_recipe():
    torch.manual_seed(15)
    model = _Two()
    w_lin0 = model.lin.weight.detach().clone()
    torch.manual_seed(16)
    convert_to_sigma_reparam(model, reinit=True, linear_init_gain=2.0, conv_init_gain=0.5)
    lin, conv = model.lin, model.conv
    assert isinstance(lin, SigmaReparamLinear) and isinstance(conv, SigmaReparamConv2d)
    assert not torch.equal(lin.weight.detach(), w_lin0)
    # weight ~ N(0, (0.02 gain)^2), truncated at +-2 absolute (PyTorch default), i.e. not at 2 std
    for layer, std in ((lin, 0.04), (conv, 0.01)):
        w = layer.weight.detach()
        assert abs(w.std().item() - std) < 0.03 * std and abs(w.mean().item()) < 0.05 * std
        assert w.abs().max().item() > 2.5 * std
        fan_in = w[0].numel()
        assert layer.bias.abs().max().item() <= 1 / fan_in**0.5
        flat = w.reshape(w.shape[0], -1).double()
        _, s, vh = torch.linalg.svd(flat, full_matrices=False)
        torch.testing.assert_close(layer.gamma.detach().double(), s[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(layer.sigma.double(), s[0], rtol=1e-5, atol=0)
        assert abs(abs(layer.u.double() @ vh[0]) - 1) < 1e-5
    # W_hat = W at conversion, so the new layer is a plain layer with the new weights
    x = torch.randn(3, 300)
    lin.eval()
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    # reproducible from the global seed; default keeps the weights
    torch.manual_seed(15)
    again = _Two()
    torch.manual_seed(16)
    convert_to_sigma_reparam(again, reinit=True, linear_init_gain=2.0, conv_init_gain=0.5)
    assert torch.equal(again.lin.weight, lin.weight) and torch.equal(again.conv.bias, conv.bias)
    torch.manual_seed(15)
    kept = convert_to_sigma_reparam(_Two())
    assert torch.equal(kept.lin.weight.detach(), w_lin0)


def test_reinit_wrap_and_sigma_reparam_layer_init_std_bounds():
    torch.manual_seed(17)
    m = convert_to_sigma_reparam(nn.Sequential(nn.Linear(400, 300)), wrap=True, reinit=True)
    w = m[0].module.weight.detach()
    assert abs(w.std().item() - 0.02) < 0.001
    torch.testing.assert_close(m[0].gamma.detach(), torch.linalg.svdvals(w)[0], rtol=1e-5, atol=0)
    lin = SigmaReparamLinear(400, 300)  # the layer's own init: the reference SNLinear's
    assert abs(lin.weight.std().item() - 0.02) < 0.001 and lin.weight.abs().max().item() > 0.05


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"linear_init_gain": 0.0}, InputError, r"linear_init_gain must be a finite number > 0, got 0.0"),
        ({"conv_init_gain": float("inf")}, InputError, r"conv_init_gain must be a finite number > 0, got inf"),
        ({"linear_init_gain": True}, TypeError, r"linear_init_gain must be a positive real number, got bool True"),
        ({"reinit": "yes"}, TypeError, r"reinit must be a bool, got str"),
        ({"include_conv2d": 1}, TypeError, r"include_conv2d must be a bool, got int"),
        ({"wrap": None}, TypeError, r"wrap must be a bool, got NoneType"),
    ],
)
def test_convert_options_validate(kwargs, exc, match):
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(exc, match=match):
        convert_to_sigma_reparam(model, **kwargs)
    assert type(model[0]) is nn.Linear  # nothing converted


def test_conv2d_errors():
    with pytest.raises(InputError, match=r"model is itself an nn.Conv2d.*from_conv2d"):
        convert_to_sigma_reparam(nn.Conv2d(2, 2, 3))
    with pytest.raises(InputError, match=r"init_std must be a finite number > 0, got -1.0.*or None to keep nn.Conv2d"):
        SigmaReparamConv2d(2, 2, 3, init_std=-1.0)
    with pytest.raises(TypeError, match=r"expected nn.Conv2d, got Linear"):
        SigmaReparamConv2d.from_conv2d(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"SigmaReparam wraps nn.Linear or nn.Conv2d, got Conv1d"):
        SigmaReparam(nn.Conv1d(2, 2, 1))
    with pytest.raises(InputError, match=r"u must have shape \(18,\)"):
        spectral_norm_step(torch.randn(4, 2, 3, 3), torch.ones(9))


def test_bfloat16_input_under_autocast():
    from mixed_precision import under_autocast

    g = torch.Generator().manual_seed(25)
    torch.manual_seed(0)
    layer = SigmaReparamLinear(6, 3)
    layer.eval()  # no power-iteration update between the two calls
    out, ref = under_autocast(layer, torch.randn(4, 6, generator=g))
    assert out.dtype == torch.bfloat16  # autocast's dtype for a linear layer
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_zero_weight_gives_finite_outputs_and_gradients():
    # sigma(0) = 0: gamma / sigma is taken as 1, so W_hat = W = 0 and the weight still learns
    torch.manual_seed(0)
    layer = SigmaReparamLinear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    torch.testing.assert_close(out, layer.bias.expand(5, 3))  # W_hat = 0
    out.pow(2).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    # the plain layer's gradient at W = 0: d/dW sum (x W^T + b)^2 = 2 (x W^T + b)^T x
    torch.testing.assert_close(layer.weight.grad, 2 * layer.bias.detach().expand(5, 3).T @ x)
    assert torch.linalg.vector_norm(layer.u) > 0.99  # the power-iteration vector is kept
    with torch.no_grad():  # once the weight is non-zero, the reparameterisation is back
        layer.weight.add_(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)))
    for _ in range(50):
        layer(x)
    torch.testing.assert_close(layer.sigma, torch.linalg.matrix_norm(layer.weight.detach(), 2), rtol=1e-4, atol=0)


@pytest.mark.parametrize("make", [lambda: SigmaReparamLinear(0, 3), lambda: SigmaReparamLinear(3, 0),
                                  lambda: SigmaReparamConv2d(0, 3, 3)])
def test_empty_weight_is_a_typed_error(make):
    with pytest.raises(InputError, match=r"needs a weight with at least one entry, got shape \(.*0.*\)"):
        make()


def test_copies_keep_every_setting_and_refuse_other_layers():
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False).double()
    new = SigmaReparamConv2d.from_conv2d(conv)
    assert (new.stride, new.padding, new.dilation, new.groups, new.bias) == ((2, 1), (1, 0), (1, 2), 2, None)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(new(x), conv(x))
    lin = nn.Linear(5, 3, bias=False)
    new_lin = SigmaReparamLinear.from_linear(lin)
    assert new_lin.bias is None and new_lin.weight.dtype == lin.weight.dtype
    torch.testing.assert_close(new_lin.weight, lin.weight)
    with pytest.raises(TypeError, match=r"expected nn.Linear, got Conv2d"):
        SigmaReparamLinear.from_linear(conv)
