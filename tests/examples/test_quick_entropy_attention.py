"""The entropy-guided attention examples run end to end in their --quick mode (CI smoke test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def test_entropy_guided_attention_quick(tmp_path):
    out = tmp_path / "ega.png"
    proc = _run("entropy_guided_attention.py", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict: ")]
    assert len(verdicts) == 1, proc.stdout[-3000:]
    assert any(w in verdicts[0] for w in ("reproduced", "not testable", "no verdict")), verdicts[0]
    assert "[--quick smoke run" in verdicts[0]
    assert "±" in proc.stdout  # metrics are printed as mean ± 95% interval
    assert out.is_file() and out.stat().st_size > 10_000


def test_hf_gpt2_entropy_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf.png"
    proc = _run("hf_gpt2_entropy.py", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "transformer.h.1.attn: head entropy before" in proc.stdout
    assert out.is_file() and out.stat().st_size > 10_000
