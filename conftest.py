"""Root conftest: collection rules that also reach the docstring examples under src/."""

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    """The KeOps docstring example compiles a kernel: skip it, with the reason, where pykeops
    is missing or no C++ compiler is found (the tests in tests/geometry/test_keops.py skip
    by the same rule)."""
    keops_items = [it for it in items if isinstance(it, pytest.DoctestItem) and it.name.startswith("entrokit.geometry.keops.")]
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
    if not (isinstance(item, pytest.DoctestItem) and item.name.startswith("entrokit.geometry.keops.")):
        yield
        return
    import pykeops

    before = pykeops.verbose
    pykeops.set_verbose(False)
    try:
        yield
    finally:
        pykeops.set_verbose(before)
