"""entrokit on one CUDA GPU: dense iterations against the HBM bound, the fused Triton online
kernel against FlashSinkhorn and the KeOps soft-min, full solves with the error recomputed in
float64, and the fused token entropies against verl's fused kernel and TRL's chunked functions.

Point-cloud problem: x ~ U[0,1]^3, y ~ 0.8 U[0,1]^3 + 0.1, uniform weights, cost |x - y|^2
(FlashSinkhorn's default full cost; GeomLoss runs |x - y|^2 / 2 with eps / 2, the same problem),
eps = 1e-2, float32. Accuracy is the L1 marginal error of each library's potentials, recomputed
in float64 by one formula: P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

Sections:
  dense     one stabilized-kernel iteration reads the n x m kernel twice (K v, K^T u): its
            floor is 2 n m itemsize / bandwidth, with the bandwidth measured here.
  online    fixed-iteration runs at eps (no convergence test, no host sync inside the loop),
            n in {16k (with the dense iteration beside it), 32k, 131k}: time per iteration of
            entrokit's fused Triton kernel (TF32 off / allow_tf32=True), its compiled torch
            tiles, FlashSinkhorn (TF32 off / on) and GeomLoss's KeOps online soft-min.
  tf32      full solves to 1e-4 (TF32 off / on): the error each library's returned potentials
            really have, recomputed in float64.
  tokens    token entropy from logits and (log-prob, entropy) from hidden states at
            V = 151936 (Qwen2's vocabulary), d = 3584, T in {4096, 16384}, bfloat16, forward +
            backward: entrokit fused Triton path, entrokit chunked torch path, verl's fused
            linear_cross_entropy, TRL's entropy_from_logits / selective_log_softmax; extra peak
            memory and the entropy error against float64 on 256 rows.

Every candidate of a row group runs in the same process, interleaved: one warm-up each, then
``--repeat`` rounds of one call per candidate; the tables give medians (wall and process CPU).

    python benchmarks/bench_gpu.py [--sections dense online tf32 tokens] [--quick] [--budget S] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

from entrokit.bench.common import Table, measure_bandwidth, write_results

EPS = 1e-2
DEV = "cuda"
REPEAT = 3
DEADLINE = math.inf


def clouds(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    y = 0.8 * torch.rand(n, 3, generator=gen, dtype=torch.float64) + 0.1
    return x.to(DEV, dtype), y.to(DEV, dtype)


def marginal_error(x, y, f, g, eps=EPS) -> float:
    """L1 error of both marginals in float64 (uniform weights), on the torch tiles."""
    from entrokit import PointCloud

    x, y = x.detach().double()[None], y.detach().double()[None]
    f, g = f.detach().double().reshape(1, -1), g.detach().double().reshape(1, -1)
    n, m = x.shape[1], y.shape[1]
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64, device=x.device)
    b = torch.full((1, m), 1.0 / m, dtype=torch.float64, device=x.device)
    with tf32(False):
        row, col = PointCloud(x, y, online=True, kernel="eager").marginals(f, g, a, b, eps)
    return float((row - a).abs().sum() + (col - b).abs().sum())


class tf32:
    """Context: TF32 matmuls on or off."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _once(fn) -> tuple[float, float]:
    torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(cands: dict, repeat: int | None = None) -> dict:
    """``{name: (median wall, median CPU)}`` or ``{name: "failed: ..."}``; one warm-up per
    candidate, then ``repeat`` rounds with one call of each candidate per round."""
    out, live = {}, {}
    repeat = REPEAT if repeat is None else repeat
    for name, make in cands.items():
        if time.time() > DEADLINE:
            out[name] = "not run (time budget of this run spent)"
            continue
        try:
            fn = make()
            fn()  # warm-up: compilation, autotuning
            torch.cuda.synchronize()
            live[name] = (fn, [])
        except Exception as err:  # one anchor failing must not lose the others
            traceback.print_exc()
            out[name] = f"failed: {type(err).__name__}: {str(err)[:90]}"
    for _ in range(repeat):
        for fn, times in live.values():
            times.append(_once(fn))
    for name, (_, times) in live.items():
        out[name] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
    return out


def entrokit_fixed(x, y, iters: int, online: bool, kernel: str = "auto", allow_tf32: bool = False):
    from entrokit import PointCloud
    from entrokit.problem import make_problem
    from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem

    n = x.shape[0]
    a = torch.full((n,), 1.0 / n, device=DEV, dtype=x.dtype)
    geom = PointCloud(x, y, online=online, kernel=kernel, allow_tf32=allow_tf32)
    pb = make_problem(a, a, geom, check_inputs=False).with_batch()
    opts = SinkhornOptions(max_iter=iters, fixed_iter=True, lse_mode=True if online else False)
    return lambda: sinkhorn_problem(pb, EPS, opts)


def flash(x, y, iters=None, tf32_on=False):
    from flash_sinkhorn import SamplesLoss

    kw = dict(loss="sinkhorn", blur=math.sqrt(EPS), potentials=True, allow_tf32=tf32_on, debias=False)
    if iters is not None:
        kw.update(use_epsilon_scaling=False, eps=EPS, n_iters=iters)
    loss = SamplesLoss(**kw)
    return lambda: loss(x, y)


def keops_softmin(x, y):
    from geomloss._legacy.sinkhorn_samples import cost_formulas, lse_genred, softmin_online

    lse = lse_genred(cost_formulas[2], 3, dtype="float32")
    h = torch.full((x.shape[0],), -math.log(x.shape[0]), device=DEV)
    return lambda: softmin_online(EPS / 2, (x, y), h, log_conv=lse)


def section_dense(quick: bool) -> Table:
    bw = measure_bandwidth(1 << 30, device=DEV)
    t = Table(f"Dense stabilized-kernel iteration vs the HBM bound (float32; measured read bandwidth {bw / 1e12:.2f} TB/s)",
              ["n = m", "time per iteration", "bound 2nm*4/BW", "fraction of bound"])
    iters = 50
    for n in ([4096] if quick else [8192, 16384, 32768]):
        x, y = clouds(n)
        res = interleaved({"dense": lambda x=x, y=y: entrokit_fixed(x, y, iters, online=False)})["dense"]
        if isinstance(res, str):
            t.add(n, res, "", "")
            continue
        per = res[0] / iters
        bound = 2 * n * n * 4 / bw
        t.add(n, f"{per * 1e3:.3f} ms", f"{bound * 1e3:.3f} ms", f"{bound / per:.2f}")
        print(t.render().splitlines()[-1], flush=True)
    t.notes.append("fraction of bound = floor / measured (1.0 = at the bandwidth floor).")
    return t


def _online_rows(t: Table, n: int) -> None:
    x, y = clouds(n)
    iters = 20 if n <= 32768 else 5
    cands = {
        "entrokit fused Triton kernel, TF32 off": (lambda: entrokit_fixed(x, y, iters, True, "triton"), iters),
        "entrokit fused Triton kernel, allow_tf32=True":
            (lambda: entrokit_fixed(x, y, iters, True, "triton", allow_tf32=True), iters),
        "entrokit compiled torch tiles": (lambda: entrokit_fixed(x, y, iters, True, "compile"), iters),
        "FlashSinkhorn, TF32 off": (lambda: flash(x, y, iters, tf32_on=False), iters),
        "FlashSinkhorn, TF32 on": (lambda: flash(x, y, iters, tf32_on=True), iters),
        # one soft-min pass is half an iteration
        "GeomLoss KeOps online soft-min x2": (lambda: keops_softmin(x, y), 0.5),
    }
    if n <= 16384:
        cands["entrokit dense iteration"] = (lambda: entrokit_fixed(x, y, 50, False), 50)
    with tf32(False):
        res = interleaved({k: v[0] for k, v in cands.items()})
    base = res["entrokit fused Triton kernel, TF32 off"]
    for name, (_, per_call) in cands.items():
        r = res[name]
        if isinstance(r, str):
            t.add(n, name, r, "", "", "")
            continue
        per, cpu = r[0] / per_call, r[1] / per_call
        ratio = f"{per / (base[0] / iters):.2f}" if not isinstance(base, str) else ""
        t.add(n, name, f"{per * 1e3:.2f} ms", f"{cpu * 1e3:.2f} ms", f"{2 * n * n / per / 1e9:.1f}", ratio)
        print(t.render().splitlines()[-1], flush=True)


def section_online(quick: bool) -> Table:
    t = Table("Online (never stores the cost) Sinkhorn iteration, d = 3, float32, eps = 1e-2",
              ["n = m", "library / kernel", "time per iteration", "process CPU per iteration",
               "G entries/s (2nm per iteration)", "time / entrokit fused kernel (TF32 off)"])
    for n in ([8192] if quick else [16384, 32768, 131072]):
        _online_rows(t, n)
    t.notes.append("Medians of interleaved rounds after one warm-up each (Triton compilation, autotuning, KeOps "
                   "build excluded). FlashSinkhorn: fixed eps, n_iters iterations, no eps-scaling; GeomLoss: two "
                   "soft-min passes of its KeOps online backend. Targets (issue 24): fused kernel <= 1.0x FlashSinkhorn "
                   "at equal precision; online <= 2x the dense iteration at n = 16384.")
    return t


def section_tf32(quick: bool) -> Table:
    import entrokit

    t = Table("Full solves to L1 error 1e-4, TF32 off / on (error recomputed in float64)",
              ["n = m", "library / path", "TF32", "time", "process CPU", "L1 error", "converged flag"])
    n = 4096 if quick else 16384
    x, y = clouds(n)
    a = torch.full((n,), 1.0 / n, device=DEV)
    paths = [("entrokit dense", dict(online=False)), ("entrokit online, fused Triton kernel", dict(online=True, kernel="triton")),
             ("entrokit online, compiled torch tiles", dict(online=True, kernel="compile"))]
    for label, kw in paths:
        for on in (False, True):
            out = {}

            def solve(kw=kw, on=on, out=out):
                geom = entrokit.PointCloud(x, y, **kw, allow_tf32=on and kw.get("kernel") == "triton")
                with tf32(on):
                    out["res"] = entrokit.sinkhorn(a, a, geom, EPS, tol=1e-4, max_iter=20_000)

            r = interleaved({label: lambda solve=solve: solve}, repeat=1)[label]
            if isinstance(r, str):
                t.add(n, label, "on" if on else "off", r, "", "", "")
                continue
            res = out["res"]
            t.add(n, label, "on" if on else "off", f"{r[0]:.2f} s", f"{r[1]:.2f} s",
                  f"{marginal_error(x, y, res.f, res.g):.2e}", str(bool(res.converged)))
            print(t.render().splitlines()[-1], flush=True)
    for on in (False, True):
        out = {}

        def fsolve(on=on, out=out):
            out["fg"] = flash(x, y, tf32_on=on)()

        r = interleaved({"flash": lambda fsolve=fsolve: fsolve}, repeat=1)["flash"]
        if isinstance(r, str):
            t.add(n, "FlashSinkhorn (its eps-scaling schedule)", "on" if on else "off", r, "", "", "")
            continue
        f, g = out["fg"]
        t.add(n, "FlashSinkhorn (its eps-scaling schedule)", "on" if on else "off", f"{r[0]:.2f} s", f"{r[1]:.2f} s",
              f"{marginal_error(x, y, f, g):.2e}", "(no flag)")
    t.notes.append("Times after one warm-up solve (compilation excluded). TF32 on: the fused kernel runs with "
                   "allow_tf32=True (exponent error up to about 2e-3 R^2/eps, entrokit.geometry._triton); the torch "
                   "tiles keep float32 products whatever the setting; the dense cost is built once in float32.")
    return t


VOCAB, HIDDEN = 151936, 3584


def _token_inputs(T: int, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    hid = torch.randn(T, HIDDEN, device=DEV, generator=gen, dtype=torch.bfloat16)
    W = (torch.randn(VOCAB, HIDDEN, device=DEV, generator=gen, dtype=torch.bfloat16) / math.sqrt(HIDDEN)) * 4
    lab = torch.randint(0, VOCAB, (T,), device=DEV, generator=gen)
    return hid, W, lab


def _fwd_bwd(fn, *inputs):
    """A candidate: forward ``fn(*leaves)``, backward of the sum of its outputs; keeps the last entropy."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    state = {}

    def run():
        for t in leaves:
            t.grad = None
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(o.float().sum() for o in outs).backward()
        state["H"] = outs[-1].detach()
    return run, state


def section_tokens(quick: bool) -> Table:
    from entrokit.rl import entropy as rl

    t = Table(f"Token entropy / log-prob, V = {VOCAB}, d = {HIDDEN}, bfloat16 inputs, forward + backward",
              ["T", "op", "library / path", "time", "process CPU", "extra peak memory", "max |H - H_float64| (256 rows)"])
    for T in ([1024] if quick else [4096, 16384]):
        _token_rows(t, T, rl)
        torch.cuda.empty_cache()
    t.notes.append("Extra peak memory: peak allocated during the first forward + backward minus what was allocated "
                   "before it (inputs and their gradients' buffers count; a (T, V) float32 logits buffer is "
                   f"{16384 * VOCAB * 4 / 2**30:.1f} GiB at T = 16384). Targets (issue 24): the fused path <= 1.0x verl's "
                   "fused kernel's time with no (T, V) buffer.")
    return t


def _token_rows(t: Table, T: int, rl) -> None:
    hid, W, lab = _token_inputs(T)
    with torch.no_grad():
        logits = (hid @ W.t()).contiguous()  # the logits-input op starts from materialised logits
        z64 = logits[:256].double()
        H_ref_logits = torch.logsumexp(z64, -1) - (torch.softmax(z64, -1) * z64).sum(-1)
        z64 = (hid[:256].double() @ W.double().t())
        H_ref_hidden = torch.logsumexp(z64, -1) - (torch.softmax(z64, -1) * z64).sum(-1)
        del z64

    def chunked(fn):
        def call(*a):
            os.environ["ENTROKIT_TRITON"] = "0"
            try:
                return fn(*a)
            finally:
                os.environ.pop("ENTROKIT_TRITON", None)
        return call

    def trl_entropy(z):
        from trl.trainer.utils import entropy_from_logits

        return entropy_from_logits(z, chunk_size=128)

    def trl_hidden(h, w):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        z = h @ w.t()
        return selective_log_softmax(z, lab), entropy_from_logits(z, chunk_size=128)

    def verl_hidden(h, w):
        import inspect

        from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

        # the order of (reduction, temperature) changed between verl releases: follow its signature
        names = list(inspect.signature(LinearCrossEntropy.forward).parameters)[4:]
        known = {"reduction": "none", "temperature": 1.0}
        args = [known[k] for k in names[:2] if k in known]
        return LinearCrossEntropy.apply(h, w, lab, *args)

    groups = {
        "token_entropy(logits)": ((logits,), H_ref_logits, {
            "entrokit fused Triton": lambda z: rl.token_entropy(z, check_inputs=False),
            "entrokit chunked torch": chunked(lambda z: rl.token_entropy(z, check_inputs=False)),
            "TRL entropy_from_logits (chunk 128)": trl_entropy,
        }),
        "token_logprob_entropy(hidden, W)": ((hid, W), H_ref_hidden, {
            "entrokit fused Triton": lambda h, w: rl.token_logprob_entropy(h, w, lab, check_inputs=False),
            "entrokit chunked torch": chunked(lambda h, w: rl.token_logprob_entropy(h, w, lab, check_inputs=False)),
            "verl linear_cross_entropy (fused Triton)": verl_hidden,
            "TRL selective_log_softmax + entropy_from_logits (forms the logits)": trl_hidden,
        }),
    }
    for op, (inputs, H_ref, fns) in groups.items():
        states, mem = {}, {}

        def make(name, fn, inputs=inputs, states=states, mem=mem):
            def build():
                run, state = _fwd_bwd(fn, *inputs)
                states[name] = state
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
                return run
            return build

        res = interleaved({name: make(name, fn) for name, fn in fns.items()})
        for name in fns:
            r = res[name]
            if isinstance(r, str):
                t.add(T, op, name, r, "", "", "")
                continue
            H = states[name]["H"][:256].double()
            t.add(T, op, name, f"{r[0] * 1e3:.1f} ms", f"{r[1] * 1e3:.1f} ms", f"{mem[name]:.2f} GiB",
                  f"{(H - H_ref).abs().max().item():.1e}")
            print(t.render().splitlines()[-1], flush=True)


SECTIONS = {"dense": section_dense, "online": section_online, "tf32": section_tf32, "tokens": section_tokens}


def main() -> None:
    global DEADLINE, REPEAT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["dense", "online", "tf32", "tokens"], choices=list(SECTIONS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--budget", type=float, default=None, help="seconds after which remaining rows are skipped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}). Run it on a GPU host: python benchmarks/bench_gpu.py")
    REPEAT = args.repeat
    if args.budget is not None:
        DEADLINE = time.time() + args.budget
    tables = []
    for name in args.sections:
        tables.append(SECTIONS[name](args.quick))
        print(tables[-1].render(), flush=True)
        write_results("gpu" + ("_quick" if args.quick else ""), tables, args.out)


if __name__ == "__main__":
    main()
