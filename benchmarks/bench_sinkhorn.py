"""Dense Sinkhorn benchmark vs POT and RegOT; writes benchmarks/results/sinkhorn.md."""

import sys
from pathlib import Path

from entrokit.cli import main

if __name__ == "__main__":
    results = str(Path(__file__).resolve().parent / "results")
    sys.exit(main(["bench", "--suite", "sinkhorn", "--results", results, *sys.argv[1:]]))
