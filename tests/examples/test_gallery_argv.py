"""The docs gallery (docs/_ext/gallery.py) and the test suite run every gallery script.

The gallery runs every example that has a quick mode in that mode. The example
reproductions have their own tests (``test_quick_*.py``), which also check their verdicts;
this module runs the remaining gallery scripts (the sparse-OT and sliced-flow examples and the
migration pages) with the gallery's own arguments, each in a subprocess on one thread: each
must exit 0 and write its figure. CI builds the docs without executing the gallery
(``ENTROKIT_DOCS_GALLERY=0`` in ``.ci/run``) because the suite runs every script.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("entrokit_docs_gallery", ROOT / "docs" / "_ext" / "gallery.py")
gallery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery)

SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
# what sphinx-gallery executes: docs/conf.py (sharded_sinkhorn.py needs torchrun: listed, not run)
GALLERY = [p for p in SCRIPTS if p.name != "sharded_sinkhorn.py"] + sorted((ROOT / "docs" / "migration_src").glob("*.py"))
RUN_HERE = ["sliced_gradient_flow.py", "sparse_ot_1d.py", "sparse_ot_color.py", "sparse_ot_moe.py",
            "geomloss_to_entrokit.py", "ott_to_entrokit.py", "pot_to_entrokit.py"]


def _gallery_argv(script: Path) -> list[str]:
    script_vars = {"src_file": str(script), "example_globals": {}}
    return gallery.ResetArgv()({}, script_vars)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_an_example_with_a_quick_mode_runs_quick_in_the_gallery(script):
    text = script.read_text(encoding="utf-8")
    argv = _gallery_argv(script)
    has_quick = '"--quick"' in text or "study_parser(" in text or "[--quick]" in text
    assert ("--quick" in argv) == has_quick, (script.name, argv)
    if script.name.startswith("rl_"):
        assert "--quick" in argv and "--out" in argv


def test_every_gallery_script_is_run_by_a_test():
    tests = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_quick_*.py"))
    missing = [p.name for p in GALLERY if p.name not in tests and p.name not in RUN_HERE]
    assert not missing, f"gallery scripts no test runs: {missing}"
    assert all(any(p.name == name for p in GALLERY) for name in RUN_HERE)


@pytest.mark.parametrize("name", RUN_HERE)
def test_gallery_script_runs_with_the_gallery_arguments(name, tmp_path):
    pytest.importorskip("matplotlib")
    script = next(p for p in GALLERY if p.name == name)
    argv = _gallery_argv(script)
    figure = tmp_path / f"{script.stem}.png"
    if "--out" in argv:  # the gallery's build folder, here a temporary one
        argv[argv.index("--out") + 1] = str(figure)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "--out" in argv:
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
