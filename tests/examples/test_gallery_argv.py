"""The docs gallery runs every example that has a quick mode in that mode (docs/_ext/gallery.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("entrokit_docs_gallery", ROOT / "docs" / "_ext" / "gallery.py")
gallery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery)

SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_an_example_with_a_quick_mode_runs_quick_in_the_gallery(script):
    text = script.read_text(encoding="utf-8")
    script_vars = {"src_file": str(script), "example_globals": {}}
    argv = gallery.ResetArgv()({}, script_vars)
    has_quick = '"--quick"' in text or "study_parser(" in text or "[--quick]" in text
    assert ("--quick" in argv) == has_quick, (script.name, argv)
    if script.name.startswith("rl_"):
        assert "--quick" in argv and "--out" in argv
