"""Token entropy over a large vocabulary: entrokit.rl against TRL, verl and OpenRLHF.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_rl_entropy.py [--quick] [--out benchmarks/results]

Anchors are imported from their real packages (never re-written here):

* TRL (``pip install -c constraints.txt trl``): ``trl.trainer.utils.entropy_from_logits`` and the
  hidden-state ``trl.kernels.ChunkedLogProbFunction`` (its torch path on CPU).
* verl 0.9.1: ``verl.utils.torch_functional.entropy_from_logits`` and
  ``entropy_from_logits_with_chunking``, ``verl.utils.experimental.torch_functional.FusedLinearForPPO``.
  verl pins a GPU stack (vLLM, flash-attn), so it is installed without dependencies into a
  side folder, plus the few pure-Python packages its import needs::

      pip download --no-deps verl==0.9.1 openrlhf==0.11.2 -d wheels
      pip install --no-deps --target /tmp/rl_anchors wheels/*.whl
      pip install -c constraints.txt ray tensordict omegaconf codetiming orjson

  and found through ``ENTROKIT_RL_ANCHORS=/tmp/rl_anchors`` (added to ``sys.path``).
* OpenRLHF 0.11.2: ``openrlhf.models.utils.compute_entropy`` cannot be imported without
  flash-attn (``openrlhf/models/__init__`` imports it; it does not build without CUDA). Its
  formula is verl's ``entropy_from_logits`` under ``torch.compile`` (anchors note 2.4); the
  table says so instead of re-writing it.

Measures, per cell and method, each method in a fresh process (``python this.py --worker``):

* extra peak memory: ``ru_maxrss`` after the call minus the resident set just before it, with the
  inputs created chunk by chunk (no temporary larger than a chunk) and every code path warmed
  up on a tiny input first; glibc is told to serve every block above 64 KiB by ``mmap``
  (``MALLOC_MMAP_THRESHOLD_=65536``), so freed buffers leave the resident set at once. Given as
  a multiple of the logits' size in the input dtype. The no-grad forward is measured first,
  then forward + backward (whose peak includes the logits' gradient, 1.0x); ``ru_maxrss`` is
  monotone, so the fwd+bwd figure is max(fwd, fwd+bwd), an upper bound. Hidden-state input:
  the gradients of ``hidden`` and ``weight`` (the inputs' own gradients) are subtracted.
* time: median over the calls in that process of wall and process CPU time.
* error: max |H - H_float64| over every row (hidden input: the first 256 rows), the reference
  computed in float64 from the same input values.
* NaN: count of NaN entropies (and gradients) on a suite of logits with -inf entries and
  extreme float16 values.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ANCHORS = os.environ.get("ENTROKIT_RL_ANCHORS", "/tmp/rl_anchors")
if os.path.isdir(ANCHORS) and ANCHORS not in sys.path:
    sys.path.append(ANCHORS)

LOGIT_METHODS = ["entrokit", "trl", "verl", "verl_chunked"]
HIDDEN_METHODS = ["entrokit", "trl_chunked", "verl_fused"]
OPENRLHF_NOTE = (
    "OpenRLHF 0.11.2 compute_entropy: not importable on this machine (openrlhf.models imports "
    "flash_attn, which does not build without CUDA); same formula as verl entropy_from_logits."
)


# ----------------------------------------------------------------------------- methods
def logits_fn(name: str):
    if name == "entrokit":
        from entrokit.rl import token_entropy

        return lambda z: token_entropy(z, check_inputs=False)
    if name == "trl":
        from trl.trainer.utils import entropy_from_logits

        return entropy_from_logits  # default chunk_size=128
    if name == "verl":
        from verl.utils.torch_functional import entropy_from_logits

        return entropy_from_logits
    if name == "verl_chunked":
        from verl.utils.torch_functional import entropy_from_logits_with_chunking

        return entropy_from_logits_with_chunking  # default chunk_size=2048
    raise ValueError(name)


def hidden_fn(name: str):
    """(hidden, weight, labels) -> (logp, entropy)."""
    if name == "entrokit":
        from entrokit.rl import token_logprob_entropy

        return lambda h, w, y: token_logprob_entropy(h, w, y, check_inputs=False)
    if name == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return lambda h, w, y: ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",)
        )[:2]
    if name == "verl_fused":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        mod = FusedLinearForPPO()  # chunk_size=512, torch backend
        return lambda h, w, y: mod(h, w, y)
    raise ValueError(name)


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    try:
        import importlib.metadata as md

        out.append(f"trl {md.version('trl')}")
    except Exception:  # pragma: no cover - the table says what is missing
        out.append("trl missing")
    info = list(Path(ANCHORS).glob("verl-*.dist-info")) if os.path.isdir(ANCHORS) else []
    out.append(info[0].name.replace(".dist-info", "").replace("-", " ") + " (--no-deps)" if info else "verl missing")
    return ", ".join(out)


# ----------------------------------------------------------------------------- worker
def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fill_randn(t: torch.Tensor, scale: float, seed: int, rows: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(0, t.shape[0], rows):
        n = min(rows, t.shape[0] - i)
        t[i : i + n] = (torch.randn(n, *t.shape[1:], generator=g) * scale).to(t.dtype)


def _timed(fn):
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _ref_entropy_rows(z64: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z64, -1) - (torch.softmax(z64, -1) * z64).sum(-1)


def worker(cfg: dict) -> dict:
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    T, V, reps = cfg["T"], cfg["V"], cfg["reps"]
    elem = torch.empty((), dtype=dtype).element_size()
    logits_bytes = T * V * elem
    res = {"logits_bytes": logits_bytes}
    if cfg["kind"] == "logits":
        fn = logits_fn(cfg["method"])
        tiny = torch.randn(4, 64, dtype=dtype, requires_grad=True)
        fn(tiny).mean().backward()
        with torch.no_grad():
            fn(tiny)
        z = torch.empty(T, V, dtype=dtype)
        _fill_randn(z, 3.0, seed=cfg["seed"])

        def fwd():
            with torch.no_grad():
                return fn(z)

        def fwdbwd():
            zz = z.requires_grad_(True)
            h = fn(zz)
            h.mean().backward()
            return h

        out_bytes = T * 4  # the entropies themselves
        inputs_grad = 0
    else:
        d = cfg["d"]
        fn = hidden_fn(cfg["method"])
        th = torch.randn(8, 16, dtype=dtype, requires_grad=True)
        tw = torch.randn(64, 16, dtype=dtype, requires_grad=True)
        ty = torch.randint(0, 64, (8,))
        lp, e = fn(th, tw, ty)
        (lp.sum() + e.sum()).backward()
        h = torch.empty(T, d, dtype=dtype)
        w = torch.empty(V, d, dtype=dtype)
        _fill_randn(h, 1.0, seed=cfg["seed"])
        _fill_randn(w, 3.0 / d**0.5, seed=cfg["seed"] + 1, rows=64)
        y = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(cfg["seed"] + 2))

        def fwd():
            with torch.no_grad():
                return fn(h, w, y)[1]

        def fwdbwd():
            hh, ww = h.requires_grad_(True), w.requires_grad_(True)
            lp, e = fn(hh, ww, y)
            (lp.sum() + e.sum()).backward()
            return e

        out_bytes = 2 * T * 4
        inputs_grad = (T * d + V * d) * elem
    gc.collect()
    for mode, call in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        before = _rss()  # the current resident set; ru_maxrss of the fwd call may already be higher
        first, wall, cpu = _timed(call)
        extra = _maxrss() - before - out_bytes
        if mode == "fwdbwd":
            extra -= inputs_grad
        walls, cpus = [wall], [cpu]
        for _ in range(reps - 1):
            if mode == "fwdbwd":
                for t in ((z,) if cfg["kind"] == "logits" else (h, w)):
                    t.grad = None
            _, wall, cpu = _timed(call)
            walls.append(wall)
            cpus.append(cpu)
        res[mode] = {
            "extra_x": extra / logits_bytes,
            "wall": statistics.median(walls),
            "cpu": statistics.median(cpus),
            "n": len(walls),
        }
        if mode == "fwd":
            ent = first.detach().float()
        if cfg["kind"] == "logits":
            z.grad = None
            z.requires_grad_(False)
        else:
            h.grad = w.grad = None
            h.requires_grad_(False)
            w.requires_grad_(False)
        del first
        gc.collect()
    # error against float64, from the same input values
    err = 0.0
    nan = int(torch.isnan(ent).sum())
    if cfg["kind"] == "logits":
        for i in range(0, T, 32):
            ref = _ref_entropy_rows(z[i : i + 32].double())
            err = max(err, float((ent[i : i + 32].double() - ref).abs().nan_to_num(float("inf")).max()))
    else:
        n = min(T, 256)
        ref = _ref_entropy_rows(h[:n].double() @ w.double().t())
        err = float((ent[:n].double() - ref).abs().nan_to_num(float("inf")).max())
    res.update(err=err, nan=nan)
    return res


# ----------------------------------------------------------------------------- NaN suite
def nan_suite() -> dict[str, str]:
    """NaN count in entropies and gradients on logits with -inf and float16 extremes."""
    torch.manual_seed(0)
    z = torch.randn(64, 1000) * 3
    z[:, ::2] = float("-inf")  # masked vocabulary
    z[:8, 1:] = float("-inf")  # a single finite token per row
    big = torch.finfo(torch.float16).max
    z16 = (torch.randn(64, 1000) * 3).to(torch.float16)
    z16[:, 0], z16[:, 1] = big, -big
    cases = {"-inf fp32": z, "fp16 extremes": z16}
    out = {}
    for m in LOGIT_METHODS:
        try:
            fn = logits_fn(m)
        except Exception as err:  # pragma: no cover - reported in the table
            out["logits: " + m] = f"not importable ({type(err).__name__})"
            continue
        parts = []
        for name, x in cases.items():
            xx = x.clone().requires_grad_(True)
            h = fn(xx)
            h.float().mean().backward()
            parts.append(f"{name}: {int(torch.isnan(h).sum())} H / {int(torch.isnan(xx.grad).sum())} grad")
        out["logits: " + m] = "; ".join(parts)
    # hidden states whose float16 logits reach +-6e4
    h = torch.full((16, 8), 120.0, dtype=torch.float16)
    w = torch.randn(500, 8).sign().to(torch.float16) * 60
    y = torch.zeros(16, dtype=torch.long)
    for m in HIDDEN_METHODS:
        try:
            fn = hidden_fn(m)
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            lp, e = fn(hh, ww, y)
            (lp.float().sum() + e.float().sum()).backward()
            out["hidden: " + m] = (f"fp16 logits +-5.8e4: {int(torch.isnan(e).sum())} H / "
                      f"{int(torch.isnan(hh.grad).sum() + torch.isnan(ww.grad).sum())} grad")
        except Exception as err:
            out["hidden: " + m] = f"raised {type(err).__name__}: {str(err)[:60]}"
    return out


# ----------------------------------------------------------------------------- driver
def _meminfo_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def run_worker(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                           text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"rc {p.returncode}: {last[:120]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--out", default=None, help="directory for rl_entropy.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-gib", type=float, default=12.0, help="skip a run projected above this peak")
    ap.add_argument("--only", default=None, help="logits or hidden")
    ap.add_argument("--from-log", action="append", default=[],
                    help="reuse the result lines that an earlier run printed (resume, or merge runs)")
    ap.add_argument("--cached-only", action="store_true",
                    help="with --from-log: only tabulate the logged results, run nothing new")
    ap.add_argument("--run-missing-for", action="append", default=[],
                    help="with --cached-only: still run the missing cells of this method")
    ap.add_argument("--reps", type=int, default=None, help="calls per process (default 3 at T <= 1k, else 2)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from entrokit.bench.common import Table, machine_info, write_results

    if args.reps is not None:
        reps_of = lambda T: args.reps  # noqa: E731
    elif args.quick:
        reps_of = lambda T: 2  # noqa: E731
    else:
        reps_of = lambda T: 3 if T <= 1024 else 2  # noqa: E731
    if args.quick:
        Vs, Ts = [4096], [64, 256]
        hidden_cells = [(256, 4096, 256)]
    else:
        Vs, Ts = [32768, 151936], [1024, 4096]
        hidden_cells = [(1024, 32768, 4096), (1024, 151936, 1024)]
    header = [
        f"Anchors: {versions()}; TRL entropy_from_logits chunk_size=128 (default), verl "
        "entropy_from_logits_with_chunking chunk_size=2048 (default), verl FusedLinearForPPO chunk_size=512 "
        "(default, torch backend), TRL ChunkedLogProbFunction with its trainer's chunk 32768 x 4096 rows, "
        "entrokit chunk_size='auto'.",
        f"CPU: {machine_info()}; load average before: {os.getloadavg()[0]:.2f}, "
        f"{os.getloadavg()[1]:.2f}, {os.getloadavg()[2]:.2f}.",
        OPENRLHF_NOTE,
    ]
    print("\n".join(header), flush=True)
    tables = []
    measured: dict = {}
    cached: dict = {}
    for log in args.from_log:
        for line in Path(log).read_text().splitlines():
            parts = line.split(" ", 6)
            if len(parts) == 7 and parts[0] in ("logits", "hidden") and parts[6].startswith("{"):
                kind, T, V, d, dt, m = parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4], parts[5]
                res = json.loads(parts[6].rsplit(" load ", 1)[0])
                if "error" not in res or res["error"].startswith("skipped"):
                    cached[(kind, T, V, d, dt, m)] = res

    def cell_rows(kind, cells, methods, title):
        tab = Table(title, ["V", "T", "d", "dtype", "method", "fwd extra (x logits)", "fwd wall / CPU",
                            "fwd+bwd extra (x logits)", "fwd+bwd wall / CPU", "max err (nats)", "NaN",
                            "fwd+bwd CPU / fastest anchor: any / within 1e-3 nats"])
        for (T, V, d) in cells:
            for dt in ("float32", "bfloat16"):
                results = {}
                for m in methods:
                    cfg = dict(kind=kind, method=m, T=T, V=V, d=d, dtype=dt, reps=reps_of(T), seed=T + V)
                    small = measured.get((kind, m, V, dt, d))
                    elem = 4 if dt == "float32" else 2
                    proj = None
                    if small is not None and "fwdbwd" in small:
                        proj = (small["fwdbwd"]["extra_x"] + 2.2) * T * V * elem
                    avail = _meminfo_available() - (3 << 30)
                    if (kind, T, V, d, dt, m) in cached:
                        results[m] = cached[(kind, T, V, d, dt, m)]
                    elif args.cached_only and m not in args.run_missing_for:
                        results[m] = {"error": "not measured (the run was stopped at its time budget)"}
                    elif proj is not None and (proj > args.budget_gib * 2**30 or proj > avail):
                        results[m] = {"error": f"skipped: projected peak {proj / 2**30:.1f} GiB"}
                    else:
                        results[m] = run_worker(cfg, timeout=900)
                    if "error" not in results[m] and T == min(Ts if kind == "logits" else [T]):
                        measured[(kind, m, V, dt, d)] = results[m]
                    print(kind, T, V, d, dt, m, json.dumps(results[m]), f"load {os.getloadavg()[0]:.2f}",
                          flush=True)
                ok = {k: r for k, r in results.items() if k != "entrokit" and "error" not in r}
                anchors = [r["fwdbwd"]["cpu"] for r in ok.values()]
                # "equal output": the anchors whose entropies are within 1e-3 nats of float64
                anchors_eq = [r["fwdbwd"]["cpu"] for r in ok.values() if r["err"] <= 1e-3]
                for m, r in results.items():
                    if "error" in r:
                        tab.add(V, T, d or "-", dt, m, r["error"], "", "", "", "", "", "")
                        continue
                    ratio = "-"
                    if m == "entrokit" and anchors:
                        eq = f"{r['fwdbwd']['cpu'] / min(anchors_eq):.2f}" if anchors_eq else "none"
                        ratio = f"{r['fwdbwd']['cpu'] / min(anchors):.2f} / {eq}"
                    tab.add(V, T, d or "-", dt, m + ("" if r["fwd"]["n"] > 1 else " (1 call)"),
                            f"{r['fwd']['extra_x']:.2f}",
                            f"{r['fwd']['wall']:.2f} / {r['fwd']['cpu']:.2f} s",
                            f"{r['fwdbwd']['extra_x']:.2f}", f"{r['fwdbwd']['wall']:.2f} / {r['fwdbwd']['cpu']:.2f} s",
                            f"{r['err']:.1e}", r["nan"], ratio)
        return tab

    if args.only in (None, "logits"):
        cells = [(T, V, 0) for V in Vs for T in Ts]
        t = cell_rows("logits", cells, LOGIT_METHODS, "Logits input: token entropy")
        t.notes += [
            "extra = peak resident memory of the call minus before it, / size of the (T, V) logits in the "
            "input dtype; fwd+bwd includes the logits' gradient (1.0x). Targets: fwd+bwd <= 1.1x, bf16 error <= "
            "1e-4 nats, 0 NaN, CPU time <= 1.0x the fastest anchor.",
            "time: median over the calls of one fresh process per method (3 calls at T = 1k, 2 at T = 4k).",
        ]
        tables.append(t)
    if args.only in (None, "hidden"):
        t = cell_rows("hidden", hidden_cells, HIDDEN_METHODS,
                      "Hidden-state input: label log-prob and entropy (logits never formed)")
        t.notes += [
            "extra = peak of the call minus before it, minus the gradients of hidden and weight (the inputs' own "
            "gradients), / size of the (T, V) logits in the input dtype. Target <= 0.05x. Error on the first 256 rows.",
            "loss for fwd+bwd: sum(logp) + sum(H), so both gradients flow.",
        ]
        tables.append(t)
    nan = nan_suite()
    tn = Table("NaN suite (64 rows, V = 1000; -inf on half the vocabulary, 8 rows with one finite token; fp16 "
               "rows holding +-65504)", ["method", "NaN count (entropies / gradient entries)"])
    for m, s in nan.items():
        tn.add(m, s)
    tables.append(tn)
    for t in tables:
        print(t.render(), flush=True)
    tables[0].notes = header + tables[0].notes
    footer = Table("Command", ["command", "load average after"])
    footer.add(f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_rl_entropy.py {' '.join(sys.argv[1:])}`",
               ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    tables.append(footer)
    path = write_results("rl_entropy" + ("_quick" if args.quick else ""), tables, args.out)
    if path:
        print(f"wrote {path}")
    print(f"Python {platform.python_version()}")


if __name__ == "__main__":
    main()
