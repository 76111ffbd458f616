"""Quadratic / sparsity-constrained OT vs POT and RegOT (``--quick``: n=300 only)."""
import sys

from entrokit.bench.smooth import run

if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
