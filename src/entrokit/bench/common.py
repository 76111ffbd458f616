"""Shared benchmark utilities: tables, machine description, bandwidth, time budgets.

Every benchmark runs entrokit and the anchors on the same problem in one process and
reports ratios against the anchors (absolute times on shared machines are noisy).
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import platform
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "Table",
    "machine_info",
    "measure_bandwidth",
    "timed",
    "TimeLimitExceeded",
    "call_with_time_limit",
    "fmt_time",
    "write_results",
    "retain_freed_memory",
]


@dataclass
class Table:
    """A titled table of strings with optional notes."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append([str(x) for x in row])

    def render(self) -> str:
        cols = [str(c) for c in self.columns]
        widths = [len(c) for c in cols]
        for r in self.rows:
            widths = [max(w, len(str(x))) for w, x in zip(widths, r)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        out = [self.title, "=" * len(self.title), line, "-" * len(line)]
        out += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def to_markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        out += ["| " + " | ".join(str(x) for x in r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def machine_info() -> str:
    """One line describing the machine the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    try:
        load = "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load average n/a"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}, {load}"
    )


def measure_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5, device: str = "cpu") -> float:
    """Sustained read bandwidth in bytes/s: best of ``repeats`` sums over a large buffer.

    A Sinkhorn iteration on a dense n x m float64 kernel must read it twice (``K v`` and
    ``K^T u``), so ``16 n m / bandwidth`` is its lower bound.
    """
    x = torch.ones(n_bytes // 8, dtype=torch.float64, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory (``mallopt``: no ``mmap``-ed chunks, no
    trimming), so that no timed step pays page faults for memory the previous step gave
    back: the strongest setting for every library alike (a loop that allocates fresh n x m
    tensors at every step gains most). ``False`` where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, float]:
    """Run ``fn`` once and return ``(result, seconds)`` (synchronising CUDA)."""
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


class TimeLimitExceeded(Exception):
    """A call run by :func:`call_with_time_limit` was killed at its time limit."""


def _send_outcome(fn: Callable[[], Any], conn, cpu_seconds: int | None = None) -> None:
    if cpu_seconds is not None:  # the kernel ends the child (SIGXCPU) at this much CPU time
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    try:
        conn.send((True, fn()))
    except BaseException as exc:  # noqa: BLE001  (re-raised in the parent)
        conn.send((False, exc))
    finally:
        conn.close()


def call_with_time_limit(fn: Callable[[], Any], limit: float, *, cpu: bool = False) -> Any:
    """``fn()`` run in a forked child process that is killed after ``limit`` seconds.

    Anchors' compiled solvers cannot be interrupted from inside the process, so a
    benchmark that must end in bounded time runs them here. The result (or the
    exception ``fn`` raised) comes back pickled; on the time limit the child is killed
    and :class:`TimeLimitExceeded` is raised. Time ``fn`` inside itself: the fork and
    the transfer are not part of the measured call.

    With ``cpu=True`` the limit is the child's CPU time (``RLIMIT_CPU``, whole seconds,
    rounded up), so what is killed does not depend on the machine's load; a wall-clock
    backstop of ``10 * limit`` seconds ends a child that waits without computing.
    """
    cpu_seconds = max(1, math.ceil(limit)) if cpu else None
    wall = 10.0 * limit if cpu else limit
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_send_outcome, args=(fn, send, cpu_seconds), daemon=True)
    child.start()
    send.close()
    try:
        if not recv.poll(wall):
            child.kill()
            raise TimeLimitExceeded(f"killed after {wall:g} s")
        ok, value = recv.recv()
    except EOFError:
        child.join()
        if cpu and child.exitcode == -signal.SIGXCPU:
            raise TimeLimitExceeded(f"killed after {cpu_seconds} s of CPU time") from None
        raise RuntimeError(f"the benchmark child process died (exit code {child.exitcode})") from None
    finally:
        recv.close()
        child.join()
    if not ok:
        raise value
    return value


def fmt_time(t: float | None, budget: float | None = None) -> str:
    if t is None:
        return f"> {budget:g} s" if budget is not None else "n/a"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def write_results(name: str, tables: Sequence[Table], directory: str | os.PathLike | None) -> Path | None:
    """Write ``<directory>/<name>.md`` with the machine line and every table."""
    if directory is None:
        return None
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.md"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [f"# Benchmark: {name}", "", f"Machine: {machine_info()}", f"Run: {stamp}", ""]
    body += [t.to_markdown() for t in tables]
    path.write_text("\n".join(body))
    return path
