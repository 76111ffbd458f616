"""OTT-JAX side of benchmarks/bench_sinkhorn.py, run in its own virtualenv (JAX must not
share a process with torch's threads and allocator).

Reads one JSON job from argv: ``{"n", "eps", "seeds", "repeats", "configs"}``;
builds the same instances as the torch side (``numpy.random.default_rng(seed).random((n,
n))``, uniform weights, float64), and prints one JSON line per (config, seed) with the
wall and process CPU times of each repeat (compilation excluded: the function is
compiled ahead of the timed calls) and the L1 error of both marginals recomputed in float64 from the returned plan.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import ott  # noqa: E402
from ott.geometry import geometry  # noqa: E402
from ott.problems.linear import linear_problem  # noqa: E402
from ott.solvers.linear import sinkhorn  # noqa: E402


def main() -> None:
    job = json.loads(sys.argv[1])
    n, eps = job["n"], job["eps"]
    print(json.dumps({"versions": {"ott": ott.__version__, "jax": jax.__version__}}), flush=True)
    for cfg in job["configs"]:
        solver = sinkhorn.Sinkhorn(
            lse_mode=cfg["lse_mode"], inner_iterations=cfg["inner_iterations"],
            threshold=cfg["threshold"], max_iterations=cfg["max_iterations"], norm_error=1,
        )

        @jax.jit
        def solve(M, a, solver=solver):
            geom = geometry.Geometry(cost_matrix=M, epsilon=eps)
            out = solver(linear_problem.LinearProblem(geom, a, a))
            return out.matrix, out.n_iters, out.converged

        for seed in job["seeds"]:
            M = np.random.default_rng(seed).random((n, n))
            a = np.full(n, 1.0 / n)
            Mj, aj = jax.device_put(M), jax.device_put(a)
            compiled = solve.lower(Mj, aj).compile()  # compilation outside the timings
            walls, cpus, out = [], [], None
            for _ in range(job["repeats"]):
                t, c = time.perf_counter(), time.process_time()
                out = jax.block_until_ready(compiled(Mj, aj))
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            P = np.asarray(out[0], dtype=np.float64)
            err = float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - a).sum())
            print(json.dumps({"config": cfg["name"], "seed": seed, "wall": walls, "cpu": cpus, "err": err,
                              "n_iter": int(out[1]), "converged": bool(out[2])}), flush=True)


if __name__ == "__main__":
    main()
