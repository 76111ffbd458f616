"""Every script the docs gallery executes also runs in the test suite.

The example reproductions have their own tests (``test_quick_*.py``), which check their
verdicts. This module runs the remaining gallery scripts (the sparse-OT and sliced-flow
examples and the migration pages) with the gallery's arguments, each in a subprocess on one
thread: each must exit 0 and write its figure. CI builds the docs without executing the
gallery (``ENTROKIT_DOCS_GALLERY=0`` in ``.ci/run``) because these tests run every script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300

# what sphinx-gallery executes: docs/conf.py (sharded_sinkhorn.py needs torchrun: listed, not run)
GALLERY = [p for p in sorted((ROOT / "examples").glob("*.py")) if p.name != "sharded_sinkhorn.py"]
GALLERY += sorted((ROOT / "docs" / "migration_src").glob("*.py"))
RUN_HERE = ["sliced_gradient_flow.py", "sparse_ot_1d.py", "sparse_ot_color.py", "sparse_ot_moe.py",
            "geomloss_to_entrokit.py", "ott_to_entrokit.py", "pot_to_entrokit.py"]


def test_every_gallery_script_is_run_by_a_test():
    tests = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_quick_*.py"))
    missing = [p.name for p in GALLERY if p.name not in tests and p.name not in RUN_HERE]
    assert not missing, f"gallery scripts no test runs: {missing}"
    assert all(any(p.name == name for p in GALLERY) for name in RUN_HERE)


@pytest.mark.parametrize("name", RUN_HERE)
def test_gallery_script_runs_with_the_gallery_arguments(name, tmp_path):
    script = next(p for p in GALLERY if p.name == name)
    text = script.read_text(encoding="utf-8")
    argv = ["--quick"] if '"--quick"' in text else []  # as docs/_ext/gallery.py
    figure = tmp_path / f"{script.stem}.png"
    if '"--out"' in text:
        argv += ["--out", str(figure)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "--out" in argv:
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
