import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param


def random_problem(n, m, *, seed=0, dtype=torch.float64, device="cpu", zeros=False, batch=None):
    """Random weights (optionally with zeros) and a uniform [0, 1] cost."""
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    a = torch.rand(*shape, n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(*shape, m, generator=gen, dtype=torch.float64) + 0.1
    if zeros:
        a[..., 0] = 0.0
        b[..., -1] = 0.0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    C = torch.rand(*shape, n, m, generator=gen, dtype=torch.float64)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), C.to(dtype=dtype, device=device)
