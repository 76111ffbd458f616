"""Run a test file under the Triton interpreter in a subprocess.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the interpreted kernel tests
(``tests/*/interpreted_*.py``, not collected by the main run) go through this helper."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(path: Path) -> str:
    """Run ``pytest path`` with ``TRITON_INTERPRET=1``; assert it passed with nothing skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-W", "error::RuntimeWarning",
         str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if " passed" in line]
    assert summary and "skipped" not in summary[-1], out[-2000:]
    return out
