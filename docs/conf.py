"""Sphinx configuration for the entrokit documentation (``make docs``)."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import entrokit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ext.gallery import ResetArgv  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # docs/_ext

project = "entrokit"
author = "the entrokit developers"
copyright = "2026, the entrokit developers"
release = version = entrokit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "_ext.apigen",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_intersphinx", "migration_src", "gallery_header.rst", "**.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- autodoc / napoleon ----------------------------------------------------------------------
# The docstrings mix Google ("Args:", "Examples:") and NumPy sections; napoleon reads both.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": False}
autodoc_mock_imports = ["pykeops", "regot"]
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False

# -- intersphinx -------------------------------------------------------------------------------
# Inventories are optional: a build without network must not fail (-W would turn Sphinx's
# "failed to reach any of the inventories" warning into an error, and that warning has no
# category that suppress_warnings could name). So each inventory is looked for in
# docs/_intersphinx/ (shipped), then in the build cache, then fetched once with a short
# timeout into the cache; a project whose inventory cannot be had is left out of the
# mapping (its references render as plain code) and the build says so on stdout.
_INVENTORIES = {
    "python": "https://docs.python.org/3/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "ot": "https://pythonot.github.io/",
}
_CACHE = HERE / "_build" / "_intersphinx"


def _inventory(name: str, url: str) -> str | None:
    for path in (HERE / "_intersphinx" / f"{name}.inv", _CACHE / f"{name}.inv"):
        if path.is_file():
            return str(path)
    if os.environ.get("ENTROKIT_DOCS_OFFLINE"):
        return None
    try:
        with urllib.request.urlopen(url + "objects.inv", timeout=5) as r:
            data = r.read()
    except Exception as err:  # no network, proxy, 404: leave the project out
        print(f"intersphinx: {name} inventory not available ({type(err).__name__}); "
              f"links to {name} are rendered as plain code")
        return None
    _CACHE.mkdir(parents=True, exist_ok=True)
    (_CACHE / f"{name}.inv").write_bytes(data)
    return str(_CACHE / f"{name}.inv")


intersphinx_mapping = {}
for _name, _url in _INVENTORIES.items():
    _inv = _inventory(_name, _url)
    if _inv is not None:
        intersphinx_mapping[_name] = (_url, _inv)
intersphinx_timeout = 5

# -- sphinx-gallery ----------------------------------------------------------------------------
# The gallery runs examples/ at build time in quick mode (arguments: docs/_ext/gallery.py),
# so each figure on a gallery page is made by the code printed next to it.
# sharded_sinkhorn.py needs torchrun (several processes): it is listed but not executed.
# ENTROKIT_DOCS_GALLERY=0 skips running every example.
# sphinx-gallery wants a GALLERY_HEADER.rst in the examples folder; examples/ holds only the
# scripts, so they are staged (copied when changed, so sphinx-gallery's checksums still skip
# unchanged ones) into the build tree next to docs/gallery_header.rst.
_GALLERY_SRC = HERE / "_build" / "gallery_src"


def _stage_examples() -> None:
    import shutil

    _GALLERY_SRC.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "examples").glob("*.py")}
    wanted["GALLERY_HEADER.rst"] = HERE / "gallery_header.rst"
    for old in _GALLERY_SRC.iterdir():
        if old.name not in wanted and old.is_file():
            old.unlink()
    for name, src in wanted.items():
        dst = _GALLERY_SRC / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)


_stage_examples()
_run_gallery = os.environ.get("ENTROKIT_DOCS_GALLERY", "1") != "0"
sphinx_gallery_conf = {
    "examples_dirs": ["_build/gallery_src", "migration_src"],
    "gallery_dirs": ["auto_examples", "migration"],
    "filename_pattern": r"/(?!sharded_sinkhorn)[^/]+\.py$" if _run_gallery else r"^$",
    "ignore_pattern": r"__init__\.py|/figures/",
    "reset_argv": ResetArgv(),  # docs/_ext/gallery.py
    "image_scrapers": ("matplotlib",),
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "show_memory": False,
    # examples run in worker processes (joblib), one per core, at most 4: each is one thread
    "parallel": max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))),
    "min_reported_time": 1,
    "line_numbers": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "reference_url": {"entrokit": None},
    "doc_module": ("entrokit",),
    "backreferences_dir": None,
    "matplotlib_animations": False,
}

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"entrokit {version}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
}
pygments_style = "friendly"
pygments_dark_style = "monokai"
html_show_sourcelink = False
