"""Running a layer as a training loop under ``torch.autocast`` on CPU runs it (mixed-precision tests)."""

import torch


def under_autocast(fn, *inputs):
    """``(out, ref)``: ``fn`` on the bfloat16 versions of the floating ``inputs`` under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``, and ``fn`` on the same (rounded) values
    in float32 without autocast: the two differ only by what the layer computes in bfloat16."""
    low = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    ref = fn(*[t.float() if t.is_floating_point() else t for t in low])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*low)
    return out, ref
