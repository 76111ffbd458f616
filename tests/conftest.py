import os

import pytest
import torch

from generators import random_problem  # noqa: F401  (re-exported for older imports)

# the kernel tests under the Triton interpreter run in their own process (tests/triton_helpers.py)
collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["*/interpreted_*.py"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param
