"""CI smoke runs of the RL reproductions (``examples/rl_*.py``) in their ``--quick`` mode.

Each example runs in a subprocess (one thread, bounded time) and must exit with code 0,
print one ``verdict:`` line tagged as a smoke run and write its figure (into a temporary
folder). The quick runs are too short to test the papers' claims; the full runs do that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # the quick runs take 8-14 s of CPU each on one core (benchmarks/rl_quick_budget.py)


def _run(script, tmp_path, *extra):
    out = tmp_path / "figure.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out), *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc


@pytest.mark.parametrize(("script", "extra"), [
    ("rl_entropy_mechanism.py", ()), ("rl_top_entropy_tokens.py", ()), ("rl_aent_noise_tokens.py", ()),
    ("rl_siren.py", ()), ("rl_aepo.py", ()), ("rl_steer.py", ("--seed0", "100")),
    ("rl_epo_gridworld.py", ()), ("rl_aer_mixed_difficulty.py", ()),
])
def test_rl_example_quick_mode(script, extra, tmp_path):
    proc = _run(script, tmp_path, *extra)
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict:")]
    assert len(verdicts) == 1, proc.stdout[-3000:]
    assert "reproduced" in verdicts[0] and "smoke run" in verdicts[0]
    if extra:
        assert "(100+)" in proc.stdout  # the second seed set starts where --seed0 says


def test_trl_example_quick_mode(tmp_path):
    pytest.importorskip("trl", reason="needs the trl extra: pip install 'entrokit[trl]'")
    proc = _run("rl_trl_digit_sum.py", tmp_path)
    lines = proc.stdout.splitlines()
    measured = [line for line in lines if line.startswith("measured:")]
    assert len(measured) == 1 and "smoke run" in measured[0], proc.stdout[-3000:]
    rows = [line for line in lines if line.startswith("TRL GRPO ")]
    assert len(rows) == 2  # both runs went through GRPOTrainer and were evaluated
    # the entropy at initialisation is the same for both runs (same weights), about log(10) nats:
    # the head's prior leaves almost no mass on the non-digit tokens
    h_before = [float(r.split()[-3]) for r in rows]
    assert h_before[0] == h_before[1] and 2.2 < h_before[0] < 2.4
