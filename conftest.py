"""Root conftest: collection rules that also reach the docstring examples under src/, and
the setting of each pytest-xdist worker (``make test`` runs one worker per core)."""

import importlib.util
import os

import pytest

_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config):
    """A pytest-xdist worker runs torch on one thread: the workers already fill the cores."""
    if _XDIST_WORKER:
        import torch

        torch.set_num_threads(1)


def _is_keops_docstring_example(item) -> bool:
    return isinstance(item, pytest.DoctestItem) and item.name.startswith("entrokit.geometry.keops.")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Everything that compiles KeOps kernels (tests/geometry/test_keops.py and the KeOps
    docstring example) shares one pytest-xdist worker: KeOps compiles into its cache folder
    without a lock, and two processes compiling one formula at once leave a truncated module.
    The KeOps docstring example is skipped, with the reason, where pykeops is missing or no
    C++ compiler is found (the tests in tests/geometry/test_keops.py skip by the same rule)."""
    for item in items:
        if "keops" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.xdist_group("keops"))
    keops_items = [it for it in items if _is_keops_docstring_example(it)]
    if not keops_items:
        return
    if importlib.util.find_spec("pykeops") is None:
        why = "KeOpsPointCloud needs pykeops: pip install 'entrokit[keops]'"
    else:
        from entrokit.geometry.keops import cxx_compiler

        compiler, why = cxx_compiler()
        if compiler is not None:
            return
        why = f"KeOps compiles its kernels with a C++ compiler: {why}"
    for it in keops_items:
        it.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _quiet_keops_compiles(request):
    """KeOps prints a line for each kernel it compiles, on the first run on a machine only:
    the KeOps docstring example's output must not depend on the compile cache."""
    item = request.node
    if not _is_keops_docstring_example(item):
        yield
        return
    import pykeops

    before = pykeops.verbose
    pykeops.set_verbose(False)
    try:
        yield
    finally:
        pykeops.set_verbose(before)
