"""CI smoke runs of the LegoGCD and σReparam examples in their ``--quick`` mode.

Each example runs in a subprocess (one thread, bounded time) and must exit with code 0,
print one line starting with ``verdict:`` and write its figure (into a temporary folder).
The quick runs are too short to test the papers' claims; the full runs do that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # the quick runs take ~10 s each on one idle core


@pytest.mark.parametrize("script", ["legogcd_digits.py", "sigma_reparam.py"])
def test_example_quick_mode(script, tmp_path):
    out = tmp_path / "figure.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict:")]
    assert len(verdicts) == 1, proc.stdout[-3000:]
    assert "reproduced" in verdicts[0]  # "reproduced", "partly reproduced" or "not reproduced"
    assert "[--quick smoke run" in verdicts[0]  # a quick verdict is never evidence
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
