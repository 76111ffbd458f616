"""Checks of Triton kernels without a GPU.

:func:`run_interpreted` runs a test file under the Triton interpreter in a subprocess
(``TRITON_INTERPRET=1`` must be set before triton is imported, so the interpreted kernel tests,
``tests/*/interpreted_*.py``, are not collected by the main run). :func:`sm90_resources`
compiles a kernel for an H100 (sm_90) with triton's bundled ``ptxas`` and reads its register
use and spills with the bundled ``cuobjdump``: what the interpreter cannot see.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(path: Path) -> str:
    """Run ``pytest path`` with ``TRITON_INTERPRET=1``; assert it passed with nothing skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-W", "error::RuntimeWarning",
         str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if " passed" in line]
    assert summary and "skipped" not in summary[-1], out[-2000:]
    return out


def sm90_resources(fn, pointers: dict, constexprs: dict, num_warps: int) -> dict:
    """``{"REG": registers per thread, "STACK": spill bytes, ...}`` of ``fn`` compiled for sm_90;
    ``pointers``: the element type of each pointer argument (``"*fp32"``); other arguments i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
