"""Run a function on several gloo processes from a test, bounded in time.

``run_on_ranks(scenarios, world, tmp_dir)`` spawns ``world`` processes, initialises a gloo
process group in each, calls ``scenarios(rank)`` (a module-level function of the test
file, so the spawned process can import it) and returns what every rank returned. A run
that does not finish within ``timeout_s`` is killed and fails the test instead of hanging
the suite.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, scenarios: Callable[[int], Any], init_file: str, out_dir: str, world: int,
            timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(scenarios(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(scenarios: Callable[[int], Any], world: int, tmp_dir: Path, *, timeout_s: float = 120.0) -> list:
    """``[scenarios(0), ..., scenarios(world - 1)]``, each computed on its own gloo rank."""
    tmp_dir = Path(tmp_dir)
    ctx = mp.start_processes(_worker, args=(scenarios, str(tmp_dir / "init"), str(tmp_dir), world, timeout_s),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process gloo run did not finish within {timeout_s:.0f} s")
    return [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
