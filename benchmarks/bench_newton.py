"""SNS/SSNS benchmark vs RegOT and POT; writes benchmarks/results/newton.md and the figure."""

import sys

from entrokit.bench.newton import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
