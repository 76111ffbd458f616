"""`pip install entrokit` needs only torch, numpy and scipy; the rest is the `cli` extra."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"matplotlib", "tqdm", "sklearn"}

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, *, block: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = (BLOCK if block else "") + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_core_and_regularizers_work_without_the_cli_extra():
    out = _run(
        """
        import warnings
        import torch
        import entrokit
        import entrokit.regularizers as R
        from entrokit import PointCloud

        torch.manual_seed(0)
        x, y = torch.rand(6, 2, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
        a = torch.full((6,), 1 / 6, dtype=torch.float64)
        b = torch.full((5,), 1 / 5, dtype=torch.float64)
        C = torch.cdist(x, y) ** 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", entrokit.ConvergenceWarning)
            results = [
                entrokit.sinkhorn(a, b, C, 0.1),
                entrokit.solve(a, b, C, eps=0.1),
                entrokit.sinkhorn(a, b, PointCloud(x, y), 0.1),
                entrokit.sinkhorn_newton(a, b, C, 0.1),
                entrokit.smooth_ot(a, b, C, gamma=0.5),
            ]
        for r in results:
            P = r.plan.to_dense() if r.plan.layout != torch.strided else r.plan
            assert torch.allclose(P.sum(1), a, atol=1e-4), P.sum(1)
        loss = R.ELRLoss(10, 3)(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([2, 3]))
        assert torch.isfinite(loss)
        import entrokit.plotting, entrokit.data, entrokit.cli  # importable, imports nothing optional
        assert entrokit.data.grid_cost(4).shape == (16, 16)
        for name in ("matplotlib", "tqdm", "sklearn"):
            assert name not in sys.modules, name
        # a function that needs the extra says which one
        for call in (lambda: R.plot_heatmap(torch.zeros(2, 2)), lambda: entrokit.data.digit_image(0)):
            try:
                call()
            except ImportError as exc:
                assert "pip install 'entrokit[cli]'" in str(exc), exc
            else:
                raise AssertionError("expected ImportError")
        print("ok")
        """
    )
    assert out.stdout.strip().endswith("ok")


def test_cli_reports_the_missing_extra_on_one_line():
    out = _run(
        """
        import io, contextlib
        from entrokit.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["demo", "--quiet", "--size", "8"])
        assert code == 2, code
        msg = err.getvalue().strip()
        assert msg.startswith("entrokit: error:") and "entrokit[cli]" in msg, msg
        assert len(msg.splitlines()) == 1, msg
        print("ok")
        """
    )
    assert out.stdout.strip().endswith("ok")


def test_plotting_import_does_not_switch_backend_and_demo_skips_bench(tmp_path):
    out = _run(
        f"""
        import sys
        import matplotlib

        def _no_use(*args, **kwargs):
            raise AssertionError("matplotlib.use called")

        matplotlib.use = _no_use
        import entrokit.plotting  # noqa: F401
        from entrokit.cli import main

        assert main(["demo", "--quiet", "--size", "8", "--eps", "0.1", "--out", {str(tmp_path / "d.png")!r}]) == 0
        assert not any(m == "entrokit.bench" or m.startswith("entrokit.bench.") for m in sys.modules)
        print("ok")
        """,
        block=False,
    )
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert out.stdout.strip().endswith("ok")


def test_subpackages_load_on_first_access():
    _run(
        """
        import sys
        import entrokit

        lazy = ("entrokit.nn", "entrokit.regularizers", "entrokit.distributed")
        assert not any(m in sys.modules for m in lazy), [m for m in lazy if m in sys.modules]
        assert entrokit.regularizers.ELRLoss.__name__ == "ELRLoss"
        assert entrokit.nn.SinkhornAttention.__name__ == "SinkhornAttention"
        assert entrokit.distributed.BatchResults.__name__ == "BatchResults"
        try:
            entrokit.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("entrokit.no_such_name did not raise")
        """
    )


# import name -> distribution name, where they differ
_DIST = {"sklearn": "scikit-learn", "ot": "pot", "PIL": "pillow"}


def _unguarded_imports(path: Path) -> set[str]:
    """Top-level modules a script imports outside ``try`` blocks (a guarded import is optional)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_docs_extra_installs_every_package_the_gallery_runs():
    # `make docs` installs only the docs extra (in a fresh environment on CI): every example
    # the gallery executes must import with it
    import tomllib  # Python >= 3.11, as the project's environment

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    have = {re.split(r"[<>=\[; ]", req)[0].lower() for req in project["dependencies"] + project["optional-dependencies"]["docs"]}
    scripts = [p for p in sorted((root / "examples").glob("*.py")) if p.name != "sharded_sinkhorn.py"]
    scripts += sorted((root / "docs" / "migration_src").glob("*.py"))
    missing = {}
    for script in scripts:
        for mod in _unguarded_imports(script) - set(sys.stdlib_module_names) - {"entrokit", "__future__"}:
            if _DIST.get(mod, mod).lower() not in have:
                missing.setdefault(script.name, []).append(mod)
    assert not missing, f"not installed by the docs extra: {missing}"
