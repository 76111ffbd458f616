"""Write the API reference pages from the packages' ``__all__`` (so every public name is
listed, grouped the way the package is laid out) before Sphinx reads the sources.

A name exported by several packages (``entrokit.PointCloud`` is
``entrokit.geometry.PointCloud``) is documented once, in the subpackage that defines it,
and listed with a link where it is re-exported.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# (module, one-line description); the order is the order of the pages
PACKAGES = [
    ("entrokit", "Solvers, the problem and result types, errors; re-exports of the main geometries and losses."),
    ("entrokit.geometry", "How a solver sees the ground cost: dense matrices, point clouds (dense or online), KeOps, sharded and truncated geometries."),
    ("entrokit.losses", "OT losses between measures: Sinkhorn divergence, sliced Wasserstein, Monge gap."),
    ("entrokit.nn", "Modules: OT losses, Sinkhorn attention, OT matching and the sparse OT router."),
    ("entrokit.regularizers", "Entropy regularizers for training (pillar 2)."),
    ("entrokit.rl", "Entropy control for RL of language models (pillar 3): token-entropy ops, masks, aggregation."),
    ("entrokit.distributed", "Spreading a batch of OT problems over processes."),
    ("entrokit.plotting", "Figures (needs the ``cli`` extra)."),
    ("entrokit.data", "Embedded data for demos and tests (needs the ``cli`` extra)."),
]
SKIP = {"__version__"}
# data objects have no docstring of their own (autodoc would show their type's)
DATA_DOCS = {
    "METHODS": "The registered solvers, ``name -> \"module:function\"`` (imported lazily): "
    "``solve(method=name)`` dispatches through it and "
    ":func:`entrokit.solvers.solve.register_method` adds an entry.",
    "AGG_MODES": "The aggregation modes of :func:`entrokit.rl.aggregate` (verl's ``loss_agg_mode`` names).",
}


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _canonical(packages):
    """Map id(obj) -> the last (most specific) package exporting it."""
    home = {}
    for modname, _ in packages:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            if name in SKIP:
                continue
            obj = getattr(mod, name)
            if modname == "entrokit" and id(obj) in home:
                continue
            home[id(obj)] = (modname, name)
    # entrokit is first, so subpackages overwrite it: the subpackage is the home
    return home


def write_pages(outdir: Path) -> list[str]:
    outdir.mkdir(parents=True, exist_ok=True)
    home = _canonical(PACKAGES)
    written = []
    for modname, blurb in PACKAGES:
        mod = importlib.import_module(modname)
        names = [n for n in getattr(mod, "__all__", []) if n not in SKIP]
        own, reexp = [], []
        for n in names:
            obj = getattr(mod, n)
            h = home[id(obj)]
            (own if h[0] == modname else reexp).append((n, obj, h))
        title = f"``{modname}``"
        lines = [title, "=" * len(title), "", blurb, "", f".. module:: {modname}", "   :no-index:", "",
                 f".. currentmodule:: {modname}", ""]
        if own:
            lines += [".. autosummary::", "   :nosignatures:", ""]
            lines += [f"   {n}" for n, obj, _ in own if _kind(obj) != "data"] + [""]
        if reexp:
            lines += ["Re-exported here, documented where they are defined:", ""]
            for n, obj, (hm, hn) in reexp:
                role = "class" if inspect.isclass(obj) else ("func" if callable(obj) else "data")
                lines.append(f"* ``{modname}.{n}``: :py:{role}:`{hm}.{hn}`")
            lines.append("")
        for kind_title, kind in (("Classes", "class"), ("Functions", "function"), ("Data", "data")):
            group = [(n, obj) for n, obj, _ in own if _kind(obj) == kind]
            if not group:
                continue
            lines += [kind_title, "-" * len(kind_title), ""]
            for n, obj in group:
                if kind == "class":
                    lines += [f".. autoclass:: {n}", "   :members:", ""]
                elif kind == "function":
                    lines += [f".. autofunction:: {n}", ""]
                else:
                    lines += [f".. py:data:: {n}", "", "   " + DATA_DOCS.get(n, ""), ""]
        # module docstrings that define equations the members' docstrings refer to (:eq:)
        notes = sorted({o.__module__ for _, o, _ in own if _kind(o) != "data"
                        and ":label:" in (getattr(importlib.import_module(o.__module__), "__doc__", "") or "")})
        for m in notes:
            t = f"Notes: ``{m}``"
            lines += [t, "-" * len(t), "", f".. automodule:: {m}", "   :no-index:", ""]
        path = outdir / f"{modname}.rst"
        text = "\n".join(lines)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(modname)
    return written


def _generate(app):
    write_pages(Path(app.srcdir) / "api" / "generated")


def setup(app):
    app.connect("builder-inited", _generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
