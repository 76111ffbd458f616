r"""Threading of the solver loops: small problems run on one thread.

A Sinkhorn or Newton iteration on a problem of a few hundred thousand entries is a chain of
small operations: ATen element-wise kernels on vectors of length ``n`` or ``m`` and, less
often, on the ``n x m`` kernel (``log``, ``sub``, ``add_``, ``exp_``), and one or two MKL
mat-vecs (``addmv``). With torch's default of one thread per core each element-wise kernel
opens an OpenMP parallel region whose barrier waits for every thread. When another process
holds a core, the thread scheduled there runs only every few milliseconds, so such a region
costs a scheduler time slice. Profiled on a 2-core machine at load (256 x 256 cost, 300
Sinkhorn iterations): ``aten::log`` takes 3 us per call on one thread and 43 ms on two,
``aten::sub`` 4.5 us and 1.7 ms, while MKL's ``addmv`` is not slowed (0.37 ms and 0.16 ms).
3,000 iterations take 60-70 s with 2 threads and 1.4-2 s with one
(``benchmarks/results/threads.md``).

:class:`solver_threads` therefore runs the loop of a problem with fewer than
:data:`SERIAL_MAX_ENTRIES` cost entries (``B n m``) on one thread, on CPU, and restores
the caller's setting afterwards (also when the solve raises). The public solvers
(:func:`~entrokit.solve`, :func:`~entrokit.sinkhorn`, :func:`~entrokit.sinkhorn_newton`)
run whole under it (:func:`small_problem_threads`), and so does the Sinkhorn loop that the
divergences and layers reuse. Backward passes run on the caller's setting. Larger problems
keep the caller's setting: their operations are long enough that a wait is a small part of
them (at load, 2 threads took 1.2-1.3x the 1-thread time at 2^24 entries, 2.3x at 2^22), and an idle machine can use the second core. The
threshold can be changed per process with the ``ENTROKIT_SERIAL_MAX_ENTRIES`` environment
variable (``0`` never switches). ``torch.set_num_threads`` is process-wide: solves that run
concurrently in several Python threads share the setting.
"""

from __future__ import annotations

import functools
import math
import os

import torch

__all__ = ["SERIAL_MAX_ENTRIES", "serial_max_entries", "solver_threads", "cost_entries", "small_problem_threads"]

# Problems below this many cost entries run their loop on one thread (measured in
# benchmarks/bench_threads.py: at load, 2 threads took 11-40x the 1-thread time up to
# 2^20 entries, 2.3x at 2^22, 1.5x at 2^23 and 1.2-1.3x at 2^24).
SERIAL_MAX_ENTRIES = 1 << 24


def compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling``, torch >= 2.3)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:  # torch 2.2
        check = torch._dynamo.is_compiling
    return bool(check())


def serial_max_entries() -> int:
    """:data:`SERIAL_MAX_ENTRIES`, or ``ENTROKIT_SERIAL_MAX_ENTRIES`` when set."""
    env = os.environ.get("ENTROKIT_SERIAL_MAX_ENTRIES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            from entrokit._errors import InputError

            raise InputError(
                f"ENTROKIT_SERIAL_MAX_ENTRIES must be a number of cost entries, got {env!r}."
            ) from None
    return SERIAL_MAX_ENTRIES


def cost_entries(cost) -> int:
    """``B n m`` of a geometry (this process's share of a sharded one) or of a cost array;
    0 for anything else (lists: small by nature)."""
    batch_shape = getattr(cost, "batch_shape", None)
    if batch_shape is not None:
        n, m = cost.shape
        return math.prod(batch_shape) * n * m
    shape = getattr(cost, "shape", None)
    return math.prod(shape) if shape is not None else 0


def small_problem_threads(fn):
    """Decorator of a public solver ``fn(a, b, cost, ...)``: the whole call (validation,
    loop, certification) under :class:`solver_threads` for the size of ``cost``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cost = args[2] if len(args) > 2 else kwargs.get("cost")
        device = getattr(cost, "device", "cpu")
        with solver_threads(cost_entries(cost), device if isinstance(device, (str, torch.device)) else "cpu"):
            return fn(*args, **kwargs)

    return wrapper


class solver_threads:
    """Context: one thread for a CPU problem of fewer than :func:`serial_max_entries`
    entries, the caller's thread count restored on exit (module docstring). A no-op on
    other devices, for larger problems, when the caller already runs one thread, and
    while ``torch.compile`` traces."""

    def __init__(self, entries: int, device: torch.device | str = "cpu"):
        self.switch = (
            torch.device(device).type == "cpu"
            and entries < serial_max_entries()
            and not compiling()
            and torch.get_num_threads() > 1
        )
        self.saved = None

    def __enter__(self):
        if self.switch:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None
        return False
