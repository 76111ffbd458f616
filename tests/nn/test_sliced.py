"""``SlicedWassersteinLoss``: the module equals the function it wraps, its options are checked."""

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit.losses.sliced import sliced_wasserstein
from entrokit.nn.sliced import SlicedWassersteinLoss

D = torch.float64
CVS = [None, "lower", "upper"]
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=D)
Y = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=D)
U5 = torch.full((5,), 0.2, dtype=D)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cv", CVS)
def test_module_gradcheck_and_options(cv):
    g = torch.Generator().manual_seed(0)
    loss = SlicedWassersteinLoss(n_projections=6, control_variate=cv, generator=g)
    assert f"control_variate={cv!r}" in repr(loss) and "n_projections=6" in repr(loss)
    x = torch.randn(5, 3, generator=gen(1), dtype=D, requires_grad=True)
    y = torch.randn(6, 3, generator=gen(2), dtype=D, requires_grad=True)

    def f(x, y):
        g.manual_seed(0)  # same directions at every evaluation
        return loss(x, y)

    assert torch.autograd.gradcheck(f, (x, y))
    a = torch.rand(5, generator=gen(3), dtype=D) + 0.05
    a = a / a.sum()
    ref = sliced_wasserstein(x, y, a=a, n_projections=6, control_variate=cv, generator=gen(0))
    g.manual_seed(0)
    torch.testing.assert_close(loss(x, y, a=a), ref, rtol=0, atol=0)
    assert entrokit.nn.sliced.SlicedWassersteinLoss is SlicedWassersteinLoss


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(p=0), InputError, r"p must be a finite real >= 1"),
        (dict(n_projections=-3), InputError, "n_projections must be an int >= 1"),
        (dict(control_variate="both"), InputError, "control_variate must be one of"),
        (dict(control_variate="upper", p=3), InputError, "needs p=2"),
        (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_module_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SlicedWassersteinLoss(**kwargs)


def test_module_bad_forward_inputs_raise():
    with pytest.raises(InputError, match="same dimension"):
        SlicedWassersteinLoss(n_projections=3)(X, torch.randn(6, 4, dtype=D))
    with pytest.raises(InputError, match="total masses differ"):
        SlicedWassersteinLoss(n_projections=3)(X, Y, a=U5, b=2 * torch.full((6,), 1 / 6, dtype=D))
