"""Smooth OT under the one implicit wrapper: exact gradients of plan and transport cost."""

import pytest
import torch

import entrokit

D = torch.float64


@pytest.mark.parametrize("reg", ["l2", "entropy"])
@pytest.mark.parametrize("formulation", ["dual", "semi_dual"])
def test_gradcheck_plan_and_transport_cost(reg, formulation):
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(5, 4, generator=gen, dtype=D, requires_grad=True)
    a, b = torch.full((5,), 0.2, dtype=D), torch.full((4,), 0.25, dtype=D)
    kw = dict(reg=reg, gamma=0.5, formulation=formulation, tol=1e-12, sparse_plan=False)

    assert torch.autograd.gradcheck(lambda C: entrokit.smooth_ot(a, b, C, **kw).transport_cost, (C,), atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda C: entrokit.smooth_ot(a, b, C, **kw).plan, (C,), atol=1e-5, rtol=1e-4)


def test_envelope_freezes_the_plan():
    gen = torch.Generator().manual_seed(1)
    C = torch.rand(6, 5, generator=gen, dtype=D, requires_grad=True)
    res = entrokit.smooth_ot(None, None, C, reg="l2", gamma=0.3, grad="envelope")
    (g,) = torch.autograd.grad(res.transport_cost, C)
    torch.testing.assert_close(g, res.plan.to_dense())
    assert res.grad == "envelope" and not res.plan.requires_grad


def test_point_cloud_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=gen, dtype=D, requires_grad=True)
    y = torch.randn(5, 2, generator=gen, dtype=D)

    def cost(x):
        return entrokit.smooth_ot(None, None, entrokit.PointCloud(x, y), reg="l2", gamma=1.0, tol=1e-12).transport_cost

    assert torch.autograd.gradcheck(cost, (x,), atol=1e-5, rtol=1e-4)


def test_bad_grad_and_options():
    C = torch.rand(3, 3, dtype=D)
    with pytest.raises(entrokit.InputError, match="grad='unroll' is not available for smooth_ot"):
        entrokit.smooth_ot(None, None, C, gamma=0.1, grad="unroll")
    with pytest.raises(entrokit.InputError, match="eps_scaling must be True, False or 'auto'"):
        entrokit.smooth_ot(None, None, C, gamma=0.1, eps_scaling="yes")
    seen = []
    entrokit.smooth_ot(None, None, C, gamma=0.1, callback=lambda i, e: seen.append((i, e)), eps_scaling=False)
    assert seen and seen[-1][1] <= 1e-6
