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

Measures, per cell (kind, V, T, d, dtype):

* extra peak memory, one fresh process per method (``python this.py --worker``): ``ru_maxrss``
  after the call minus the resident set just before it, with the inputs created chunk by chunk
  (no temporary larger than a chunk) and every code path warmed up on a tiny input first; glibc
  is told to serve every block above 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``), so
  freed buffers leave the resident set at once. Given as a multiple of the logits' size in the
  input dtype. The no-grad forward is measured first, then forward + backward (whose peak
  includes the logits' gradient, 1.0x); ``ru_maxrss`` is monotone, so the fwd+bwd figure is
  max(fwd, fwd+bwd), an upper bound. Hidden-state input: the gradients of ``hidden`` and
  ``weight`` (the inputs' own gradients) are subtracted.
* time: one process per cell runs every method that fits in memory, interleaved: each of
  ``--reps`` repeats calls entrokit and each anchor in turn (forward, then forward + backward),
  with the default allocator; medians of wall and process CPU time. Half-precision cells add
  the fastest anchor called on a float32 copy of its inputs (``@fp32``), the anchor at
  entrokit's accuracy.
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
# half-precision cells also run the fastest anchor on a float32 copy of its inputs (the anchor at
# entrokit's accuracy: its own bf16 path is 0.04-0.14 nats off)
UPCAST = {"logits": "trl@fp32", "hidden": "trl_chunked@fp32"}
OPENRLHF_NOTE = (
    "OpenRLHF 0.11.2 compute_entropy: not importable on this machine (openrlhf.models imports "
    "flash_attn, which does not build without CUDA); same formula as verl entropy_from_logits."
)


# ----------------------------------------------------------------------------- methods
def logits_fn(name: str):
    if name.endswith("@fp32"):
        inner = logits_fn(name[: -len("@fp32")])
        return lambda z: inner(z.float())
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
    if name.endswith("@fp32"):
        inner = hidden_fn(name[: -len("@fp32")])
        return lambda h, w, y: inner(h.float(), w.float(), y)
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


def _inputs(cfg: dict):
    """The cell's inputs, generated 64 rows at a time (no temporary larger than that)."""
    dtype = getattr(torch, cfg["dtype"])
    T, V = cfg["T"], cfg["V"]
    if cfg["kind"] == "logits":
        z = torch.empty(T, V, dtype=dtype)
        _fill_randn(z, 3.0, seed=cfg["seed"])
        return (z,)
    d = cfg["d"]
    h = torch.empty(T, d, dtype=dtype)
    w = torch.empty(V, d, dtype=dtype)
    _fill_randn(h, 1.0, seed=cfg["seed"])
    _fill_randn(w, 3.0 / d**0.5, seed=cfg["seed"] + 1, rows=64)
    y = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(cfg["seed"] + 2))
    return h, w, y


def _calls(kind: str, method: str, dtype: torch.dtype, inputs: tuple):
    """(fwd, fwdbwd, reset): the no-grad forward, forward + backward, and the gradient reset,
    after a warm-up of every code path on a tiny input."""
    if kind == "logits":
        fn = logits_fn(method)
        tiny = torch.randn(4, 64, dtype=dtype, requires_grad=True)
        fn(tiny).float().mean().backward()
        with torch.no_grad():
            fn(tiny)
        (z,) = inputs

        def fwd():
            with torch.no_grad():
                return fn(z)

        def fwdbwd():
            h = fn(z.requires_grad_(True))
            h.float().mean().backward()
            return h

        def reset():
            z.grad = None
            z.requires_grad_(False)

        return fwd, fwdbwd, reset
    fn = hidden_fn(method)
    th = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    tw = torch.randn(64, 16, dtype=dtype, requires_grad=True)
    lp, e = fn(th, tw, torch.randint(0, 64, (8,)))
    (lp.float().sum() + e.float().sum()).backward()
    h, w, y = inputs

    def fwd():
        with torch.no_grad():
            return fn(h, w, y)[1]

    def fwdbwd():
        lp, e = fn(h.requires_grad_(True), w.requires_grad_(True), y)
        (lp.float().sum() + e.float().sum()).backward()
        return e

    def reset():
        h.grad = w.grad = None
        h.requires_grad_(False)
        w.requires_grad_(False)

    return fwd, fwdbwd, reset


def mem_worker(cfg: dict) -> dict:
    """One method in a fresh process: extra peak of one forward and one forward + backward, and
    the error and NaN count of its entropies."""
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    T, V = cfg["T"], cfg["V"]
    elem = torch.empty((), dtype=dtype).element_size()
    logits_bytes = T * V * elem
    inputs = _inputs(cfg)
    fwd, fwdbwd, reset = _calls(cfg["kind"], cfg["method"], dtype, inputs)
    if cfg["kind"] == "logits":
        out_bytes, inputs_grad = T * 4, 0
    else:
        out_bytes, inputs_grad = 2 * T * 4, (T * cfg["d"] + V * cfg["d"]) * elem
    res = {"logits_bytes": logits_bytes}
    gc.collect()
    for mode, call in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        before = _rss()  # the current resident set; ru_maxrss of the fwd call may already be higher
        out = call()
        extra = _maxrss() - before - out_bytes
        if mode == "fwdbwd":
            extra -= inputs_grad
        res[mode + "_extra_x"] = extra / logits_bytes
        if mode == "fwd":
            ent = out.detach().float()
        reset()
        del out
        gc.collect()
    # error against float64, from the same input values
    err = 0.0
    if cfg["kind"] == "logits":
        (z,) = inputs
        for i in range(0, T, 32):
            ref = _ref_entropy_rows(z[i : i + 32].double())
            err = max(err, float((ent[i : i + 32].double() - ref).abs().nan_to_num(float("inf")).max()))
    else:
        h, w, _ = inputs
        n = min(T, 256)
        ref = _ref_entropy_rows(h[:n].double() @ w.double().t())
        err = float((ent[:n].double() - ref).abs().nan_to_num(float("inf")).max())
    res.update(err=err, nan=int(torch.isnan(ent).sum()))
    return res


def time_worker(cfg: dict) -> dict:
    """Every method of one cell in one process, interleaved: each repeat times entrokit and each
    anchor in turn (forward, then forward + backward), so that the load of the machine at any
    moment weighs on all of them alike. Medians of wall and process CPU time."""
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    inputs = _inputs(cfg)
    calls = {m: _calls(cfg["kind"], m, dtype, inputs) for m in cfg["methods"]}
    times: dict = {m: {"fwd": ([], []), "fwdbwd": ([], [])} for m in cfg["methods"]}
    for _ in range(cfg["reps"]):
        for m, (fwd, fwdbwd, reset) in calls.items():
            for mode, call in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                _, wall, cpu = _timed(call)
                reset()
                times[m][mode][0].append(wall)
                times[m][mode][1].append(cpu)
    return {
        m: {mode: {"wall": statistics.median(w), "cpu": statistics.median(c), "n": len(w)}
            for mode, (w, c) in t.items()}
        for m, t in times.items()
    }


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


def wait_for_memory(need: float, wait_s: float, margin: float = 3 * 2**30) -> bool:
    """Wait (up to ``wait_s`` seconds, polling) until MemAvailable covers ``need`` bytes plus a
    margin, so that a large cell never pushes a shared machine into the OOM killer."""
    end = time.monotonic() + wait_s
    while _meminfo_available() < need + margin:
        if time.monotonic() >= end:
            return False
        time.sleep(min(30.0, max(1.0, end - time.monotonic())))
    return True


def run_worker(cfg: dict, timeout: float) -> dict:
    """A fresh worker process. Memory workers run with glibc serving every block above 64 KiB by
    ``mmap`` (freed buffers leave the resident set at once); timing workers with the default
    allocator (as in training, where freed blocks are reused)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if cfg["measure"] == "mem":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
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
    ap.add_argument("--budget-gib", type=float, default=8.0,
                    help="leave out of the timing process a method whose measured peak plus inputs exceeds this")
    ap.add_argument("--only", default=None, help="logits or hidden")
    ap.add_argument("--cells", default=None,
                    help="comma-separated cells to run, V:T (both inputs) or logits:V:T / hidden:V:T (e.g. "
                         "logits:32768:1024); the others are listed as not run")
    ap.add_argument("--from-log", action="append", default=[],
                    help="reuse the result lines that an earlier run printed (resume a stopped run)")
    ap.add_argument("--tabulate-only", action="store_true",
                    help="with --from-log: run nothing new; what the logs lack is listed as not measured")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats of the timing process (>= 3)")
    ap.add_argument("--mem-wait", type=float, default=0.0,
                    help="seconds to wait for MemAvailable to cover a worker's projected peak + 3 GiB before "
                         "recording it as not measured")
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(mem_worker(cfg) if cfg["measure"] == "mem" else time_worker(cfg)))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from entrokit.bench.common import Table, machine_info, write_results

    if args.quick:
        logit_cells = [(T, 4096, 0) for T in (64, 256)]
        hidden_cells = [(256, 4096, 256)]
    else:
        logit_cells = [(T, V, 0) for V in (32768, 151936) for T in (1024, 4096)]
        hidden_cells = [(T, V, d) for T in (1024, 4096) for V, d in ((32768, 4096), (151936, 1024))]
    wanted = None
    if args.cells is not None:
        wanted = set()
        for c in args.cells.split(","):
            parts = c.split(":")
            kinds = ("logits", "hidden") if len(parts) == 2 else (parts[0],)
            wanted |= {(k, int(parts[-2]), int(parts[-1])) for k in kinds}
    load0 = os.getloadavg()
    header = [
        f"Anchors: {versions()}; TRL entropy_from_logits chunk_size=128 (default), verl "
        "entropy_from_logits_with_chunking chunk_size=2048 (default), verl FusedLinearForPPO chunk_size=512 "
        "(default, torch backend), TRL ChunkedLogProbFunction with its trainer's chunk 32768 x 4096 rows, "
        "entrokit chunk_size='auto'. `@fp32`: the anchor called on a float32 copy of the bf16 inputs "
        "(the copy is part of its time and memory), i.e. the anchor at entrokit's accuracy.",
        f"CPU: {machine_info()}; load average before: {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}.",
        OPENRLHF_NOTE,
    ]
    print("\n".join(header), flush=True)
    tables = []
    cached: dict = {}
    for log in args.from_log:
        for line in Path(log).read_text().splitlines():
            parts = line.split(" ", 6)
            if len(parts) == 7 and parts[0] in ("mem", "time") and parts[6].startswith("{"):
                key = (parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4]), parts[5])
                res = json.loads(parts[6].rsplit(" load ", 1)[0])
                if args.tabulate_only or not res.get("error", "").startswith("not measured"):
                    cached[key] = res

    def measure(what, kind, T, V, d, dt, cfg, need=0.0):
        key = (what, kind, T, V, d, dt)
        if key not in cached and args.tabulate_only:
            return {"error": "not measured (the run was stopped at its time budget)"}
        if key not in cached:
            if wait_for_memory(need, args.mem_wait):
                cached[key] = run_worker(cfg, timeout=1800)
            else:  # logged, so that the table says why; a later run with --from-log tries again
                cached[key] = {"error": f"not measured: needs ~{need / 2**30:.1f} GiB, MemAvailable stayed "
                                        "below that + 3 GiB on the shared machine"}
            print(what, kind, T, V, d, dt, json.dumps(cached[key]), f"load {os.getloadavg()[0]:.2f}", flush=True)
        return cached[key]

    def cell_rows(kind, cells, methods, title):
        tab = Table(title, ["V", "T", "d", "dtype", "method", "fwd extra (x logits)", "fwd wall / CPU",
                            "fwd+bwd extra (x logits)", "fwd+bwd wall / CPU", "max err (nats)", "NaN",
                            "fwd+bwd CPU / fastest anchor: any / within 1e-3 nats"])
        for (T, V, d) in cells:
            for dt in ("float32", "bfloat16"):
                ms = methods + ([UPCAST[kind]] if dt == "bfloat16" else [])
                if wanted is not None and (kind, V, T) not in wanted:
                    tab.add(V, T, d or "-", dt, "all", "not run (outside this run's --cells)", "", "", "", "", "", "")
                    continue
                elem = 4 if dt == "float32" else 2
                inputs = T * V * elem if kind == "logits" else (T + V) * d * elem
                base = dict(kind=kind, T=T, V=V, d=d, dtype=dt, seed=T + V)
                grads = 0 if kind == "logits" else inputs  # the hidden input's own gradients
                mem = {}
                for m in ms:  # memory, error and NaN: one fresh process per method
                    key = ("mem", kind, T, V, d, dt + "/" + m)
                    # projected peak: the inputs, their gradients and the method's extra at T = 1k (else 6x)
                    small = cached.get(("mem", kind, 1024, V, d, dt + "/" + m), {})
                    proj = inputs + grads + (small.get("fwdbwd_extra_x", 6.0) + 1.2) * T * V * elem
                    if T > 1024 and key not in cached and proj > args.budget_gib * 2**30:
                        cached[key] = {"error": f"skipped: projected peak {proj / 2**30:.1f} GiB over --budget-gib"}
                    mem[m] = measure("mem", kind, T, V, d, dt + "/" + m, dict(base, method=m, measure="mem"), proj)
                # time: one process, every method that fits, interleaved per repeat
                fits = [m for m in ms if "error" not in mem[m]
                        and inputs * 2 + mem[m]["fwdbwd_extra_x"] * T * V * elem < args.budget_gib * 2**30]
                need = inputs + grads + max([mem[m]["fwdbwd_extra_x"] + 0.2 for m in fits] or [0.0]) * T * V * elem
                tim = measure("time", kind, T, V, d, dt, dict(base, methods=fits, reps=args.reps, measure="time"),
                              need)
                if "error" in tim:
                    tim = {}
                ok = {m: r for m, r in mem.items() if m != "entrokit" and "error" not in r and m in tim}
                anchors = [tim[m]["fwdbwd"]["cpu"] for m in ok]
                # "equal output": the anchors whose entropies are within 1e-3 nats of float64
                anchors_eq = [tim[m]["fwdbwd"]["cpu"] for m, r in ok.items() if r["err"] <= 1e-3]
                for m in ms:
                    r = mem[m]
                    if "error" in r:
                        tab.add(V, T, d or "-", dt, m, r["error"], "", "", "", "", "", "")
                        continue
                    t = tim.get(m)
                    ratio = "-"
                    if m == "entrokit" and anchors and t:
                        eq = f"{t['fwdbwd']['cpu'] / min(anchors_eq):.2f}" if anchors_eq else "none"
                        ratio = f"{t['fwdbwd']['cpu'] / min(anchors):.2f} / {eq}"
                    ft = f"{t['fwd']['wall']:.2f} / {t['fwd']['cpu']:.2f} s" if t else "not timed (not in the timing run)"
                    bt = f"{t['fwdbwd']['wall']:.2f} / {t['fwdbwd']['cpu']:.2f} s" if t else ""
                    tab.add(V, T, d or "-", dt, m, f"{r['fwd_extra_x']:.2f}", ft, f"{r['fwdbwd_extra_x']:.2f}", bt,
                            f"{r['err']:.1e}", r["nan"], ratio)
        return tab

    hidden_table = None
    if args.only in (None, "hidden"):
        t = cell_rows("hidden", hidden_cells, HIDDEN_METHODS,
                      "Hidden-state input: label log-prob and entropy (logits never formed)")
        t.notes += [
            "extra = peak of the call minus before it, minus the gradients of hidden and weight (the inputs' own "
            "gradients), / size of the (T, V) logits in the input dtype. Target <= 0.05x. Error on the first 256 rows.",
            "loss for fwd+bwd: sum(logp) + sum(H), so both gradients flow.",
        ]
        hidden_table = t
    if args.only in (None, "logits"):
        t = cell_rows("logits", logit_cells, LOGIT_METHODS, "Logits input: token entropy")
        t.notes += [
            "extra = peak resident memory of the call minus before it, / size of the (T, V) logits in the "
            "input dtype, in a fresh process per method; fwd+bwd includes the logits' gradient (1.0x). Targets: "
            "fwd+bwd <= 1.1x, bf16 error <= 1e-4 nats, 0 NaN, CPU time <= 1.0x the fastest anchor at equal output.",
            f"time: median over {args.reps} interleaved repeats in one process per cell (entrokit and each anchor "
            "in turn in every repeat); wall and process CPU time.",
        ]
        tables.append(t)
    if hidden_table is not None:
        tables.append(hidden_table)
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
