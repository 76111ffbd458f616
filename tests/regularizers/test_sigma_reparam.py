import io

import pytest
import torch
from torch import nn

from entrokit._errors import InputError
from entrokit.regularizers import (
    SigmaReparam,
    SigmaReparamLinear,
    convert_to_sigma_reparam,
    spectral_norm_step,
)


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
    with pytest.raises(InputError, match=r"init_std must be a finite number > 0 or None, got inf"):
        SigmaReparamLinear(4, 2, init_std=float("inf"))
