import math

import pytest
import torch

from entrokit._errors import InputError
from entrokit.regularizers import (
    EntropyBandRegularizer,
    LearnableSoftmaxTemperature,
    ScaledFFN,
    SpectralNormLinear,
    WeightNormLinear,
    attention_entropy,
    entropy_band_penalty,
    temperature_softmax,
)

EMAX = math.log(16)


def _ent(values, L=1, B=1, H=1):
    return torch.tensor(values, dtype=torch.float64).reshape(L, B, H, -1)


def test_penalty_zero_inside_band_and_quadratic_outside():
    theta = torch.tensor([[0.5]], dtype=torch.float64)
    tau, m = 0.5 * EMAX, 0.2 * EMAX
    inside = _ent([tau, tau + 0.99 * m, tau - 0.99 * m])
    assert entropy_band_penalty(inside, theta, EMAX, 0.2) == 0
    d1, d2 = 1.5 * m, -1.2 * m
    outside = _ent([tau + d1, tau + d2, tau])
    # hard gate: full squared deviation, summed over positions (code form)
    torch.testing.assert_close(entropy_band_penalty(outside, theta, EMAX, 0.2), torch.tensor(d1**2 + d2**2, dtype=torch.float64))
    smooth = entropy_band_penalty(outside, theta, EMAX, 0.2, gate="smooth")
    torch.testing.assert_close(smooth, torch.tensor((abs(d1) - m) ** 2 + (abs(d2) - m) ** 2, dtype=torch.float64))
    # per-head (Algorithm 1) uses the mean entropy: mean deviation (d1+d2)/3 is inside the band
    assert entropy_band_penalty(outside, theta, EMAX, 0.2, mode="per_head") == 0
    far = _ent([tau + 2 * m, tau + 3 * m])
    torch.testing.assert_close(entropy_band_penalty(far, theta, EMAX, 0.2, mode="per_head"), torch.tensor((2.5 * m) ** 2, dtype=torch.float64))


def test_penalty_averages_over_heads_and_layers():
    theta = torch.zeros(2, 3, dtype=torch.float64)
    e = torch.zeros(2, 1, 3, 1, dtype=torch.float64)
    e[1, 0, 2, 0] = 1.0  # one head of one layer at entropy 1, margin 0.1
    torch.testing.assert_close(entropy_band_penalty(e, theta, 1.0, 0.1), torch.tensor(1.0 / 6, dtype=torch.float64))
    e2 = [e[0], e[1]]  # list form
    torch.testing.assert_close(entropy_band_penalty(e2, theta, 1.0, 0.1), torch.tensor(1.0 / 6, dtype=torch.float64))


def test_thresholds_learnable_and_move_toward_entropies():
    g = torch.Generator().manual_seed(0)
    T = 16
    attn = [torch.full((2, 2, T, T), 1.0 / T, dtype=torch.float64) for _ in range(2)]  # entropy = log T
    reg = EntropyBandRegularizer(2, 2, lam=1.0, gamma=0.1, theta_init=0.3, dtype=torch.float64)
    loss = reg(attn)
    assert loss > 0
    loss.backward()
    # d/dθ (E - θE)^2 = -2E(E - θE) < 0 when E > θE: gradient descent raises θ toward E/E_max = 1
    assert (reg.theta.grad < 0).all()
    expected = -2 * EMAX * (EMAX - 0.3 * EMAX) * (2 * T) / (2 * 2)  # Σ over B·T, /H, /L
    torch.testing.assert_close(reg.theta.grad, torch.full((2, 2), expected, dtype=torch.float64))
    # gradient also reaches the attention logits
    logits = torch.randn(2, 2, T, T, generator=g, dtype=torch.float64, requires_grad=True)
    reg2 = EntropyBandRegularizer(1, 2, lam=1.0, gamma=0.0, theta_init=0.1, dtype=torch.float64)
    reg2([logits.softmax(-1)]).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_regularizer_lambda_scaling_and_errors():
    attn = [torch.softmax(torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)), -1)]
    r1 = EntropyBandRegularizer(1, 2, lam=1.0, theta_init=0.0)
    r2 = EntropyBandRegularizer(1, 2, lam=0.25, theta_init=0.0)
    torch.testing.assert_close(r2(attn), 0.25 * r1(attn))
    with pytest.raises(InputError, match="lam"):
        EntropyBandRegularizer(1, 2, lam=-1.0)
    with pytest.raises(InputError, match="gamma"):
        EntropyBandRegularizer(1, 2, gamma=-0.1)
    with pytest.raises(InputError, match="layers"):
        r1(attn + attn)
    with pytest.raises(InputError, match="theta must have shape"):
        entropy_band_penalty(torch.zeros(1, 1, 3, 2), torch.zeros(1, 2), 1.0)
    with pytest.raises(InputError, match="mode"):
        entropy_band_penalty(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2), 1.0, mode="mean")
    with pytest.raises(InputError, match="max_entropy"):
        entropy_band_penalty(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2), 0.0)


def test_temperature_monotone_and_limits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) * 3
    ents = [attention_entropy(temperature_softmax(logits, torch.full((1, 4), t, dtype=torch.float64))).mean().item()
            for t in (0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 1000.0)]
    assert all(a < b for a, b in zip(ents, ents[1:]))
    assert ents[0] < 1e-3 and abs(ents[-1] - math.log(8)) < 1e-3
    mod = LearnableSoftmaxTemperature(1, 4, dtype=torch.float64)
    torch.testing.assert_close(mod(logits), logits.softmax(-1))  # t = 1 at init
    mod(logits).pow(2).sum().backward()
    assert mod.raw.grad.shape == (1, 4) and mod.raw.grad.abs().sum() > 0
    with pytest.raises(InputError, match="max_len"):
        mod(torch.zeros(1, 1, 5, 5, dtype=torch.float64))


def test_pi_friendly_layers():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    wn = WeightNormLinear(6, 4, dtype=torch.float64)
    torch.testing.assert_close(wn(x), x @ wn.weight.T + wn.bias)  # g = ‖v‖ at init
    with torch.no_grad():
        wn.g.fill_(2.0)
    torch.testing.assert_close(wn.normalized_weight().norm(dim=1), torch.full((4,), 2.0, dtype=torch.float64))
    sn = SpectralNormLinear(6, 4, dtype=torch.float64)
    W = sn.weight.detach().clone()
    y = sn(x)
    torch.testing.assert_close(y, x @ (W / torch.linalg.matrix_norm(W, ord=2)).T + sn.bias, rtol=1e-6, atol=1e-8)
    ffn = torch.nn.Linear(6, 6, dtype=torch.float64)
    sc = ScaledFFN(ffn, alpha_init=2.0, beta_init=0.5)
    torch.testing.assert_close(sc(x), 0.5 * x + ffn(x) / 2.0)
    with pytest.raises(InputError, match="alpha_init"):
        ScaledFFN(ffn, alpha_init=0.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "mean"}, InputError, r"mode must be 'per_position' or 'per_head'; got 'mean'"),
        ({"gate": "soft"}, InputError, r"gate must be 'hard' or 'smooth'; got 'soft'"),
        ({"theta_init": float("nan")}, InputError, r"theta_init must be a finite number, got nan"),
        ({"theta_init": 1.5}, InputError, r"theta_init must lie in \[0, 1\].*theta \* max_entropy"),
        ({"theta_init": "0.5"}, TypeError, r"theta_init must be a real number, got str"),
        ({"max_entropy": float("inf")}, InputError, r"max_entropy must be a finite number > 0, got inf"),
        ({"max_entropy": 0.0}, InputError, r"max_entropy must be a finite number > 0.*math.log\(T\)"),
        ({"max_entropy": -1.0}, InputError, r"max_entropy must be a finite number > 0"),
        ({"lam": float("nan")}, InputError, r"lam must be a finite number >= 0"),
        ({"eps": -1e-9}, InputError, r"eps must be a finite number >= 0"),
        ({"atol": 0.0}, InputError, r"atol must be a finite number > 0"),
        ({"dtype": torch.long}, TypeError, r"dtype must be a floating torch.dtype"),
    ],
)
def test_band_regularizer_validates_options_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EntropyBandRegularizer(2, 4, **kwargs)


def test_band_regularizer_rejects_non_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    reg = EntropyBandRegularizer(1, 4)
    with pytest.raises(InputError, match=r"attentions\[0\] has negative entries.*not logits"):
        reg([logits])
    with pytest.raises(InputError, match=r"attentions\[0\] rows must sum to 1 over valid keys \(atol=0.0001\)"):
        reg([logits.abs()])
    with pytest.raises(InputError, match=r"attentions\[1\] contains NaN or inf"):
        EntropyBandRegularizer(2, 4)([logits.softmax(-1), torch.full((2, 4, 6, 6), float("nan"))])
    # tolerance follows the dtype: float32 rounding passes, half gets 1e-2
    p = logits.softmax(-1)
    assert torch.isfinite(reg([p]))
    reg_h = EntropyBandRegularizer(1, 4, dtype=torch.float16)
    assert torch.isfinite(reg_h([(p * (1 + 5e-3)).half()]))
    with pytest.raises(InputError, match=r"atol=1e-06"):
        EntropyBandRegularizer(1, 4, dtype=torch.float64)([(p.double() * (1 + 1e-5))])
    # check_inputs=False skips the value checks (no device sync)
    quiet = EntropyBandRegularizer(1, 4, check_inputs=False)
    quiet([logits.abs()])
    # metadata checks always run
    with pytest.raises(InputError, match=r"attentions have 4 heads but theta has 3"):
        EntropyBandRegularizer(1, 3, check_inputs=False)([p])
    with pytest.raises(InputError, match=r"1 key\(s\).*pass max_entropy"):
        reg([torch.ones(2, 4, 6, 1)])
    with pytest.raises(TypeError, match=r"attentions must be a list"):
        reg(42)


def test_band_penalty_validates_inputs():
    e = torch.zeros(1, 2, 2, 3)
    theta = torch.zeros(1, 2)
    with pytest.raises(InputError, match=r"max_entropy must be a finite number > 0, got inf"):
        entropy_band_penalty(e, theta, float("inf"))
    with pytest.raises(InputError, match=r"gate must be 'hard' or 'smooth'"):
        entropy_band_penalty(e, theta, 1.0, gate="soft")
    with pytest.raises(TypeError, match=r"query_mask must be a bool tensor"):
        entropy_band_penalty(e, theta, 1.0, query_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match=r"query_mask must have shape \(batch, queries\) = \(2, 3\)"):
        entropy_band_penalty(e, theta, 1.0, query_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"entropies\[0\] must be a floating torch.Tensor"):
        entropy_band_penalty([torch.zeros(2, 2, 3, dtype=torch.long)], theta, 1.0)
    with pytest.raises(TypeError, match=r"entropies must be a floating tensor"):
        entropy_band_penalty(e.long(), theta, 1.0)


def test_temperature_and_ffn_options():
    with pytest.raises(InputError, match=r"init must be a finite number > 0, got inf"):
        LearnableSoftmaxTemperature(2, 4, init=float("inf"))
    with pytest.raises(InputError, match=r"parametrization must be 'log' or 'direct'"):
        LearnableSoftmaxTemperature(2, 4, parametrization="exp")
    with pytest.raises(InputError, match=r"max_len must be an int >= 1"):
        LearnableSoftmaxTemperature(2, 0)
    with pytest.raises(InputError, match=r"temperature of shape \(3,\) does not broadcast"):
        temperature_softmax(torch.zeros(1, 2, 4, 4), torch.ones(3))
    with pytest.raises(TypeError, match=r"temperature must be a torch.Tensor"):
        temperature_softmax(torch.zeros(1, 2, 4, 4), 1.0)
    ffn = torch.nn.Linear(3, 3)
    with pytest.raises(InputError, match=r"alpha_init.*must be a finite number > 0, got inf"):
        ScaledFFN(ffn, alpha_init=float("inf"))
    with pytest.raises(InputError, match=r"beta_init must be a finite number, got nan"):
        ScaledFFN(ffn, beta_init=float("nan"))
