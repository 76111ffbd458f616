"""Count the per-call work of one public call with ``sys.setprofile`` (deterministic, no
timing): validation calls, ``PointCloud.__init__`` runs, ``make_problem`` and
``check_grad_mode`` calls, and reads of the dense-or-online decision.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/trace_calls.py

A call is a *validation call* when its function is defined in ``entrokit/_validation.py``
(private helpers, whose name starts with ``_``, excluded), is named ``check_*``, is ``make_problem`` or is ``PointCloud.__init__``. The
dense-or-online reads are the calls of ``is_online``, ``_materialised``, ``use_compiled``,
``_wide_tiles``, ``needs_wide_tiles``, ``dense_bytes`` and ``memory_budget``.
"""

from __future__ import annotations

import collections
import sys
import warnings

import torch

import entrokit

DECISIONS = {"is_online", "_materialised", "use_compiled", "_wide_tiles", "needs_wide_tiles", "dense_bytes",
             "memory_budget"}


def _kind(code) -> str | None:
    fn, name = code.co_filename, code.co_name
    if "entrokit" not in fn:
        return None
    if name in DECISIONS:
        return "decision"
    if code.co_qualname == "PointCloud.__init__" and fn.endswith("pointcloud.py"):
        return "PointCloud.__init__"
    if fn.endswith("_validation.py") and not name.startswith("_"):
        return name
    if name.startswith("check_") or name == "make_problem":
        return name
    return None


def trace(fn) -> collections.Counter:
    counts: collections.Counter = collections.Counter()

    def prof(frame, event, arg):
        if event == "call":
            k = _kind(frame.f_code)
            if k is not None:
                counts[k] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.setprofile(prof)
        try:
            fn()
        finally:
            sys.setprofile(None)
    return counts


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 2, generator=gen, requires_grad=True)
    y = torch.rand(250, 2, generator=gen)
    a64, b64 = torch.full((300,), 1 / 300, dtype=torch.float64), torch.full((250,), 1 / 250, dtype=torch.float64)
    pc = entrokit.PointCloud(x.detach().double(), y.double())
    from entrokit.regularizers import ELRLoss

    elr = ELRLoss(100, 10)
    logits, labels, index = torch.randn(8, 10, generator=gen), torch.arange(8) % 10, torch.arange(8)
    cases = {
        "sinkhorn_divergence dense (300x250, eps=1e-2, float32, + backward)":
            lambda: entrokit.sinkhorn_divergence(x, y, eps=1e-2).backward(),
        "sinkhorn_divergence online (chunk_size=64)":
            lambda: entrokit.sinkhorn_divergence(entrokit.PointCloud(x, y, chunk_size=64), eps=1e-2).backward(),
        "sinkhorn(PointCloud), float64": lambda: entrokit.sinkhorn(a64, b64, pc, 0.1),
        "solve(PointCloud), float64": lambda: entrokit.solve(a64, b64, pc, eps=0.1),
        "ELRLoss(100, 10) forward, logits (8, 10)": lambda: elr(logits, labels, index),
    }
    print("| call | validation calls | PointCloud.__init__ | make_problem | check_grad_mode | dense-or-online reads |")
    print("|---|---|---|---|---|---|")
    for label, fn in cases.items():
        c = trace(fn)
        valid = sum(v for k, v in c.items() if k != "decision")
        print(f"| {label} | {valid} | {c['PointCloud.__init__']} | {c['make_problem']} | {c['check_grad_mode']} "
              f"| {c['decision']} |")


if __name__ == "__main__":
    main()
