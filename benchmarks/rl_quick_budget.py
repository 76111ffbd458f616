"""CPU budget of the RL reproductions' ``--quick`` modes (the CI smoke runs).

Runs every ``examples/rl_*.py`` with ``--quick`` in a subprocess, one at a time, one thread
each (as ``tests/examples/test_quick_rl.py`` and the docs gallery run them), and prints each
run's process CPU time (user + system of the child, interpreter start and imports included)
beside its wall time, then the totals. The CI budget for all quick modes together is
3 minutes of CPU on 2 cores; the tests and the gallery each run every quick mode once, so the
total counts twice.

Run: ``OMP_NUM_THREADS=1 python benchmarks/rl_quick_budget.py [--repeats 1]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the reproductions and their extra arguments as the CI test runs them
RUNS = [
    ("rl_entropy_mechanism.py", ()), ("rl_top_entropy_tokens.py", ()), ("rl_aent_noise_tokens.py", ()),
    ("rl_siren.py", ()), ("rl_aepo.py", ()), ("rl_steer.py", ("--seed0", "100")),
    ("rl_epo_gridworld.py", ()), ("rl_aer_mixed_difficulty.py", ()), ("rl_trl_digit_sum.py", ()),
]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each script; the median CPU time is reported")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    print(f"CPU {cpu_name}; load average at start {os.getloadavg()[0]:.1f}; one thread per run; "
          f"median of {args.repeats} run(s)")
    print(f"{'script':30s} {'CPU s':>8s} {'wall s':>8s}")
    tot_cpu = tot_wall = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for script, extra in RUNS:
            cpus, walls = [], []
            for _ in range(args.repeats):
                c0, w0 = _children_cpu(), time.perf_counter()
                proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out",
                                       str(Path(tmp) / "figure.png"), *extra], cwd=tmp, env=env,
                                      capture_output=True, text=True)
                walls.append(time.perf_counter() - w0)
                cpus.append(_children_cpu() - c0)
                if proc.returncode != 0:
                    raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            cpu, wall = sorted(cpus)[len(cpus) // 2], sorted(walls)[len(walls) // 2]
            tot_cpu, tot_wall = tot_cpu + cpu, tot_wall + wall
            print(f"{script:30s} {cpu:8.1f} {wall:8.1f}")
    print(f"{'total (one pass)':30s} {tot_cpu:8.1f} {tot_wall:8.1f}")
    print(f"tests + gallery (two passes): {2 * tot_cpu:.0f} s CPU = {2 * tot_cpu / 60:.1f} min "
          f"(budget 3 min); load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
