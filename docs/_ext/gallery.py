"""Command-line arguments sphinx-gallery gives each example (``reset_argv``).

An example gets ``--quick`` when it has that option (the sparse_ot_* scripts are already
quick and take no ``--quick``) and always ``--out`` into the build tree; its figure stays
open and sphinx-gallery's matplotlib scraper picks it up. ``__doc__`` is set back to the
script's docstring. A class in an importable module,
so Sphinx can pickle the configuration.
"""

from __future__ import annotations

import ast
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "_build" / "gallery_out"


class ResetArgv:
    def __repr__(self):
        return "entrokit_docs_reset_argv"

    def __call__(self, gallery_conf, script_vars):
        src = Path(script_vars["src_file"])
        text = src.read_text(encoding="utf-8")
        # sphinx-gallery runs the code with __doc__ = ""; the examples build their argparse
        # description from __doc__, so give them their docstring back, as `python x.py` does
        script_vars["example_globals"]["__doc__"] = ast.get_docstring(ast.parse(text), clean=False)
        # the RL reproductions build their parser with entrokit.rl.toy.study.study_parser,
        # which has --quick and --out
        shared_parser = "study_parser(" in text
        argv = ["--quick"] if '"--quick"' in text or shared_parser else []
        if '"--out"' in text or shared_parser:
            argv += ["--out", str(OUT / f"{src.stem}.png")]
        return argv
