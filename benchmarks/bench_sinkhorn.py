"""Dense Sinkhorn benchmark vs POT (default, stabilized, log), RegOT and OTT-JAX; writes
benchmarks/results/sinkhorn.md (see :mod:`entrokit.bench.sinkhorn` for the protocol).

    python benchmarks/bench_sinkhorn.py [--quick] [--seeds 3] [--repeats 3] [--budget 20]
        [--sizes 500,1000,2000,4000] [--ott-python /path/to/venv/bin/python] [--no-results]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from entrokit.bench.common import machine_info, write_results
from entrokit.bench.sinkhorn import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3, help="instances per row (seeds 0..k-1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per instance")
    p.add_argument("--budget", type=float, default=None, help="seconds per run of the slow anchors")
    p.add_argument("--sizes", default=None, help="comma-separated n (default 500,1000,2000,4000)")
    p.add_argument("--ott-python", default=None, help="python of a virtualenv with ott-jax and jax[cpu]")
    p.add_argument("--no-slow", action="store_true", help="skip POT sinkhorn_log and RegOT")
    p.add_argument("--no-results", action="store_true", help="print only, do not write results/")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {machine_info()}", flush=True)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    tables = run(
        quick=args.quick, budget=args.budget, seeds=tuple(range(args.seeds)), repeats=args.repeats,
        sizes=sizes, ott_python=args.ott_python, slow_anchors=not args.no_slow,
    )
    cmd = "OMP_NUM_THREADS=1 python benchmarks/bench_sinkhorn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tables[0].notes.append(f"run: {cmd.strip()} (load at the end: {os.getloadavg()[0]:.2f})")
    for t in tables:
        print(t.render(), "\n", flush=True)
    if not args.no_results:
        name = "sinkhorn_quick" if args.quick else "sinkhorn"
        write_results(name, tables, Path(__file__).resolve().parent / "results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
