"""Quadratic / sparsity-constrained OT vs POT and RegOT (``--quick``: n=300, one instance).

Writes ``benchmarks/results/smooth.md`` (not with ``--quick``). The instances run as
separate processes, as many at once as the cores hold (``--workers``); they can also be
run by hand and tabulated together::

    python benchmarks/bench_smooth.py --seeds 0 --save /tmp/s0.json --no-table   # and 1, 2
    python benchmarks/bench_smooth.py --load /tmp/s0.json /tmp/s1.json /tmp/s2.json
"""

from pathlib import Path

from entrokit.bench.smooth import main

if __name__ == "__main__":
    main(results_dir=str(Path(__file__).resolve().parent / "results"))
