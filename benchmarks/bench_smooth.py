"""Quadratic / sparsity-constrained OT vs POT and RegOT (``--quick``: n=300, one instance).

Writes ``benchmarks/results/smooth.md`` (not with ``--quick``). The instances can run as
separate processes and be tabulated together::

    python benchmarks/bench_smooth.py --seeds 0 --save /tmp/s0.json --no-table   # and 1, 2
    python benchmarks/bench_smooth.py --load /tmp/s0.json /tmp/s1.json /tmp/s2.json
"""

import argparse
from pathlib import Path

from entrokit.bench.smooth import run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 300, one instance, 10 s budgets")
    p.add_argument("--seeds", type=int, nargs="+", help="the instances (default 0 1 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--save", help="write every instance's runs to this JSON file")
    p.add_argument("--load", nargs="+", default=(), help="tabulate these JSON files instead of running")
    p.add_argument("--no-table", action="store_true", help="do not write results/smooth.md")
    args = p.parse_args()
    results = None if args.quick or args.no_table else str(Path(__file__).resolve().parent / "results")
    run(quick=args.quick, out=results, seeds=args.seeds, repeats=args.repeats, sizes=args.sizes,
        save=args.save, load=args.load)
