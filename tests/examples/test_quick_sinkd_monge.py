"""CI smoke runs of the SinKD and Monge-gap examples in their ``--quick`` mode.

Each example runs in a subprocess (one thread) and must exit with code 0, print its metrics
as mean ± interval, print one verdict line tagged as a smoke run (a quick run is too short
to be evidence, and the docs gallery shows the quick run), and write its figure. ``--seed0``
moves the seed set: the printed seed range follows it.
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
TIMEOUT_S = 240  # a quick run takes ~5-10 s on one idle core


@pytest.mark.parametrize("script", ["sinkd_digits.py", "monge_gap_map.py"])
def test_quick_mode_tags_its_verdict_as_a_smoke_run(script, tmp_path):
    out = tmp_path / "figure.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--seed0", "7", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict")]
    assert len(verdicts) == 1, proc.stdout[-3000:]
    assert "[--quick smoke run" in verdicts[0]
    assert "seeds (7+)" in proc.stdout  # --seed0 moved the seed set
    assert "±" in proc.stdout
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
