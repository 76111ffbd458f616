"""The --quick modes of the PS-KD, ELR and AEM reproduction examples run, judge and plot.

Each example is run in a subprocess (as a user would run it), on one thread, with its
figure written into a temporary folder. The quick modes are smoke runs (3 seeds, short
training, about 10-40 s each on one CPU thread); the checks are that the script exits 0,
prints its metrics as mean ± interval, ends its judgement with a ``verdict:`` line, and writes
a non-empty PNG. The numbers themselves are not asserted: a quick run is too short to judge.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # per example; a quick run takes ~10-40 s on one thread

EXAMPLES = [
    ("pskd_calibration.py", "pskd_calibration.png"),
    ("elr_noisy_digits.py", "elr_noisy_digits.png"),
    ("aem_mil.py", "aem_mil.png"),
]


@pytest.mark.parametrize(("script", "figure"), EXAMPLES, ids=[s for s, _ in EXAMPLES])
def test_quick_mode_prints_verdict_and_writes_figure(script, figure, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path) + os.sep],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    verdicts = [line for line in lines if line.startswith("verdict:")]
    assert len(verdicts) == 1, proc.stdout
    assert "reproduced" in verdicts[0] and "--quick" in verdicts[0]
    assert any("±" in line for line in lines), "metrics must be printed as mean ± interval"
    out = tmp_path / figure
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in proc.stdout
