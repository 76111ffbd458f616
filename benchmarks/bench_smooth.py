"""Quadratic / sparsity-constrained OT vs POT and RegOT (``--quick``: n=300 only).

Writes ``benchmarks/results/smooth.md`` (full run only).
"""

import sys
from pathlib import Path

from entrokit.bench.smooth import run

if __name__ == "__main__":
    quick = "--quick" in sys.argv
    results = None if quick else str(Path(__file__).resolve().parent / "results")
    run(quick=quick, out=results)
