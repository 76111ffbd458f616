"""Benchmark suites run by ``entrokit bench`` and the scripts in ``benchmarks/``.

Each suite is ``"module:function"``; the function takes ``quick: bool`` and returns a
list of :class:`entrokit.bench.common.Table` objects.
"""

SUITES: dict[str, str] = {
    "sinkhorn": "entrokit.bench.sinkhorn:run",
    "newton": "entrokit.bench.newton:run",
    "smooth": "entrokit.bench.smooth:run",
}
