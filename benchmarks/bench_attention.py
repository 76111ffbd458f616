"""Sinkhorn attention: forward+backward time and peak memory against hand-written loops.

Compares, on one CPU thread, float32, head dimension 32, self-attention (T = S):

* ``log_softmax``: the fastest hand loop we know (the strongest anchor): the logits
  ``L = q kᵀ/√E`` normalised by ``torch.log_softmax`` along the rows and the columns
  alternately (one fused kernel per normalisation, forward and backward), ``n_iter`` times,
  then ``exp(L) @ v``; autograd unrolls it;
* ``plain``: the same loop spelled ``L = L - logsumexp(L, dim, keepdim=True)`` (the loop
  the benchmark issue names; two kernels per normalisation);
* ``sinkformer``: Sinkformer's own u/v loop (``sinkformers/vit_pytorch/sinkhorn.py``,
  without its per-iteration host sync): ``n_iter`` half-steps on
  ``M = (-C + u_i + v_j)/eps``, the plan multiplied by ``T``; slower than ``plain``
  (it rebuilds ``M`` at every step), kept as the published code;
* ``unroll``: :func:`entrokit.nn.attention.sinkhorn_attention` with ``grad="unroll"``;
* ``implicit``: the same with ``grad="implicit"``.

All four compute the same function (checked: max |output difference| is printed).

Time: forward + backward of ``(out * w).sum()``. Per point, ``--instances`` inputs (seeds);
per instance one warm-up per method, then ``--repeats`` rounds that time the four methods
in turn (interleaved, so that load from other processes hits all of them alike). Each cell
is the median over instances of the per-instance median, in process CPU time
(``time.process_time``, one thread: what the machine's load inflates least) and wall time.
The timing process tells glibc to keep freed memory (``--allocator retain``, the
default: :func:`retain_freed_memory`), so no method pays page faults for memory the
previous step gave back; ``--allocator default`` times glibc as it is.

Memory, measured in a fresh subprocess per point (one method, one size):

* ``peak``: growth of the resident-set high-water mark over one forward+backward: the
  mark is reset (``echo 5 > /proc/self/clear_refs``) after a warm-up on a tiny problem,
  and ``VmHWM - VmRSS`` is read from ``/proc/self/status``; with
  ``MALLOC_MMAP_THRESHOLD_=65536`` every tensor above 64 KiB is ``mmap``-ed and
  returned to the system when freed, so this is the peak of live tensors;
* ``saved``: bytes of the distinct storages the autograd graph saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), inputs excluded.

Marginal error: L1 error of the normalised plan ``P / T`` against the uniform marginals,
rows plus columns, max over the batch.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py            # grid, writes results/attention.md
    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py --quick    # B*H=32, T=128, prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from entrokit.bench.common import machine_info, retain_freed_memory

E = 32
METHODS = ("log_softmax", "plain", "sinkformer", "unroll", "implicit")
LOOPS = ("log_softmax", "plain")  # the hand loops; ratios are against the faster of the two


def plain_attention(q, k, v, n_iter: int):
    """Alternating row and column log-sum-exp normalisations of the logits, ``n_iter`` of
    them (rows first), then ``exp(L) @ v``: rows sum to 1 after a row step, columns to
    ``1 = T/S`` after a column step, Sinkformer's convention."""
    *lead, T, _ = q.shape
    L = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    for i in range(n_iter):
        L = L - torch.logsumexp(L, dim=-1 if i % 2 == 0 else -2, keepdim=True)
    P = L.exp()
    return torch.matmul(P, v), P


def log_softmax_attention(q, k, v, n_iter: int):
    """:func:`plain_attention` with each normalisation one ``torch.log_softmax`` (fused)."""
    L = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    for i in range(n_iter):
        L = torch.log_softmax(L, dim=-1 if i % 2 == 0 else -2)
    P = L.exp()
    return torch.matmul(P, v), P


def sinkformer_attention(q, k, v, n_iter: int, eps: float = 1.0):
    """Sinkformer's loop, typed from the paper's code: ``n_iter`` half-steps on
    ``M = (-C + u_i + v_j) / eps`` with ``C = -scores`` and marginals ``1/T``, ``1/S``;
    the plan is multiplied by ``T`` (rows sum to 1)."""
    *lead, T, _ = q.shape
    S = k.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    C = -scores.reshape(-1, T, S)
    u = torch.zeros(C.shape[0], T, dtype=C.dtype)
    w = torch.zeros(C.shape[0], S, dtype=C.dtype)
    log_mu, log_nu = math.log(1.0 / T), math.log(1.0 / S)

    def M():
        return (-C + u.unsqueeze(-1) + w.unsqueeze(-2)) / eps

    for i in range(n_iter):
        if i % 2 == 0:
            u = eps * (log_mu - torch.logsumexp(M(), dim=-1)) + u
        else:
            w = eps * (log_nu - torch.logsumexp(M().transpose(-2, -1), dim=-1)) + w
    P = torch.exp(M()) * T
    return torch.matmul(P.reshape(*lead, T, S), v), P


def run_method(method: str, q, k, v, n_iter: int, *, weights: bool = False):
    loops = {"log_softmax": log_softmax_attention, "plain": plain_attention, "sinkformer": sinkformer_attention}
    if method in loops:
        out, P = loops[method](q, k, v, n_iter)
        return (out, P) if weights else out
    from entrokit.nn.attention import sinkhorn_attention, sinkhorn_attention_with_weights

    if weights:
        return sinkhorn_attention_with_weights(q, k, v, n_iter=n_iter, grad=method)
    return sinkhorn_attention(q, k, v, n_iter=n_iter, grad=method)


def make_inputs(BH: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BH, 1, T, E, generator=g) for _ in range(3))
    w = torch.randn(BH, 1, T, E, generator=g)
    return q, k, v, w


def fwd_bwd(method, q, k, v, w, n_iter):
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = run_method(method, qq, kk, vv, n_iter)
    (out * w).sum().backward()
    return qq.grad


def _timed(fn):
    """``(cpu, wall, faults)``: process CPU time, wall time and minor page faults."""
    f0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
    fn()
    c1, w1 = time.process_time(), time.perf_counter()
    return c1 - c0, w1 - w0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def time_point(BH, T, n_iter, instances: int, repeats: int):
    """``{method: (cpu, wall, faults)}``: median over instances of the per-instance median over
    ``repeats`` interleaved rounds (one warm-up per method and instance)."""
    per = {m: [] for m in METHODS}
    for seed in range(instances):
        q, k, v, w = make_inputs(BH, T, seed)
        for m in METHODS:
            fwd_bwd(m, q, k, v, w, n_iter)
        runs = {m: [] for m in METHODS}
        for _ in range(repeats):
            for m in METHODS:
                runs[m].append(_timed(lambda m=m, q=q, k=k, v=v, w=w: fwd_bwd(m, q, k, v, w, n_iter)))
        for m in METHODS:
            per[m].append(tuple(statistics.median(r[i] for r in runs[m]) for i in (0, 1, 2)))
    return {m: tuple(statistics.median(x[i] for x in per[m]) for i in (0, 1, 2)) for m in METHODS}


def marginal_error(P, T, S):
    with torch.no_grad():
        Pn = P.reshape(-1, T, S).double() / T
        row = (Pn.sum(-1) - 1.0 / T).abs().sum(-1)
        col = (Pn.sum(-2) - 1.0 / S).abs().sum(-1)
        return float((row + col).max())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_point(method, BH, T, n_iter):
    """Run in a fresh process: RSS high-water growth and saved-tensor bytes of one fwd+bwd."""
    torch.set_num_threads(1)
    # warm-up on a tiny problem (lazy initialisations, kernels) without raising the high-water mark
    qs, ks, vs, ws = make_inputs(2, 8)
    fwd_bwd(method, qs, ks, vs, ws, n_iter)
    q, k, v, w = make_inputs(BH, T)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, w, qq, kk, vv)}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in inputs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark VmHWM to VmRSS
        fh.write("5")
    base = _status_kb("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_method(method, qq, kk, vv, n_iter)
    (out * w).sum().backward()
    peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - base) / 1024.0, "saved_mb": sum(seen.values()) / 2**20}


def measure_memory(method, BH, T, n_iter):
    cmd = [sys.executable, __file__, "--one", method, str(BH), str(T), str(n_iter)]
    # every allocation above 64 KiB is mmap-ed and returned on free (glibc), so the
    # high-water mark sees live tensors, not heap fragmentation
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_t(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def join(values, spec=".0f"):
    return " / ".join(format(x, spec) for x in values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="B*H=32, T=128 only; print, do not write")
    ap.add_argument("--instances", type=int, default=3, help="inputs (seeds) per point")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per instance")
    ap.add_argument("--points", default="32:128:1,3,5,20;32:512:1,3,5,20;128:128:5",
                    help="B*H:T:n_iter,... groups separated by ';'")
    ap.add_argument("--allocator", choices=("retain", "default"), default="retain",
                    help="retain: glibc keeps freed memory (no page faults in timed steps); default: as is")
    ap.add_argument("--out", default="attention.md", help="file name under benchmarks/results/")
    ap.add_argument("--one", nargs=4, metavar=("METHOD", "BH", "T", "N_ITER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one:
        m, BH, T, n = args.one
        print(json.dumps(memory_point(m, int(BH), int(T), int(n))))
        return

    spec = "32:128:1,5" if args.quick else args.points
    if args.allocator == "retain" and retain_freed_memory():
        alloc_note = (
            "glibc is told to keep freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, "
            "--allocator retain), so a timed step does not fault in again the memory the previous "
            "step gave back: the strongest setting for every method, and most for the plain loop, "
            "which allocates a fresh n x m tensor per normalisation (results/attention_default_alloc.md "
            "has rows timed with glibc's default). The fault column shows what is left."
        )
    else:
        alloc_note = "glibc's default (--allocator default): page faults of fresh allocations count in the CPU time."
    points = []
    for group in spec.split(";"):
        bh, t, ns = group.split(":")
        points += [(int(bh), int(t), int(n)) for n in ns.split(",")]
    rows = []
    mem_ref = {}
    load0 = os.getloadavg()
    for BH, T, n in points:
        q, k, v, _ = make_inputs(BH, T)
        with torch.no_grad():
            outs = {m: run_method(m, q, k, v, n, weights=True) for m in METHODS}
        diff = max(float((outs[m][0] - outs["plain"][0]).abs().max()) for m in METHODS)
        merr = {m: marginal_error(outs[m][1], T, T) for m in METHODS}
        del outs
        times = time_point(BH, T, n, args.instances, args.repeats)
        mems = {m: measure_memory(m, BH, T, n) for m in METHODS}
        if n == 1:
            mem_ref[(BH, T)] = mems["implicit"]
        rows.append((BH, T, n, times, mems, merr, diff))
        print(BH, T, n, {m: round(times[m][0] * 1e3, 1) for m in METHODS},
              {m: round(mems[m]["peak_mb"]) for m in METHODS}, f"diff {diff:.1e}", flush=True)
    load1 = os.getloadavg()

    lines = [
        "# Benchmark: attention",
        "",
        f"Machine: {machine_info()}",
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average (1, 5, 15 min) "
        f"{' '.join(f'{x:.2f}' for x in load0)} at the start, {' '.join(f'{x:.2f}' for x in load1)} at the end",
        "Command: `OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_attention.py"
        f" --instances {args.instances} --repeats {args.repeats} --points '{spec}' --allocator {args.allocator}"
        + ("" if args.out == "attention.md" else f" --out {args.out}") + "`",
        "",
        f"### Sinkhorn attention, forward + backward (float32, head dim {E}, self-attention T = S)",
        "",
        "Times: process CPU time (wall time in brackets), median over "
        f"{args.instances} instances of the median of {args.repeats} interleaved repeats.",
        "",
        "| B*H | T | n_iter | log_softmax loop | plain loop | Sinkformer loop | unroll | implicit "
        "| fastest loop | unroll / fastest loop (CPU) "
        "| target <= 0.8 at n_iter=5 | implicit / fastest loop (CPU) | target <= 1.0 at n_iter=5 "
        "| unroll / plain, implicit / plain (CPU) | unroll, implicit / fastest loop (wall) "
        "| minor page faults per step (log_softmax / plain / Sinkformer / unroll / implicit) "
        "| peak MB (log_softmax / plain / Sinkformer / unroll / implicit) "
        "| saved MB (log_softmax / plain / Sinkformer / unroll / implicit) "
        "| implicit peak / its peak at n_iter=1 | marginal L1 error (plain / unroll / implicit) "
        "| max abs diff vs plain |",
        "|" + "---|" * 21,
    ]
    for BH, T, n, times, mems, merr, diff in rows:
        best = min(LOOPS, key=lambda m: times[m][0])
        ru = times["unroll"][0] / times[best][0]
        ri = times["implicit"][0] / times[best][0]
        wu = times["unroll"][1] / times[best][1]
        wi = times["implicit"][1] / times[best][1]
        pu, pi = times["unroll"][0] / times["plain"][0], times["implicit"][0] / times["plain"][0]
        ref = mem_ref.get((BH, T))
        rm = mems["implicit"]["peak_mb"] / ref["peak_mb"] if ref and ref["peak_mb"] > 0 else float("nan")
        cells = " | ".join(f"{fmt_t(times[m][0])} ({fmt_t(times[m][1])})" for m in METHODS)
        lines.append(
            f"| {BH} | {T} | {n} | {cells} | {best} "
            f"| {ru:.2f} | {('yes' if ru <= 0.8 else 'no') if n == 5 else '-'} "
            f"| {ri:.2f} | {('yes' if ri <= 1.0 else 'no') if n == 5 else '-'} | {pu:.2f}, {pi:.2f} | {wu:.2f}, {wi:.2f} "
            f"| {join(times[m][2] for m in METHODS)} "
            f"| {join(mems[m]['peak_mb'] for m in METHODS)} "
            f"| {join(mems[m]['saved_mb'] for m in METHODS)} "
            f"| {rm:.2f} "
            f"| {join((merr[m] for m in ('plain', 'unroll', 'implicit')), '.1e')} | {diff:.1e} |"
        )
    lines += [
        "",
        "- n_iter counts normalisations as Sinkformer does (rows, columns, rows, ...); n_iter=1 is softmax.",
        "- anchors: 'log_softmax' is the strongest hand loop (`L = torch.log_softmax(L, dim)`, rows then "
        "columns, then `exp(L) @ v`, autograd through it: one fused kernel per normalisation and one n x m "
        "tensor saved per step); 'plain' is the same loop as `L = L - logsumexp(L, dim, keepdim=True)` "
        "(the loop the benchmark issue names); 'Sinkformer' is the published u/v update, which rebuilds "
        "(-C + u + v)/eps at every half-step. The ratios are against the faster hand loop per row "
        "('fastest loop'), and against 'plain' beside them.",
        "- entrokit runs the normalisations in the scaling form (one fused softmax for the kernel, then one "
        "mat-vec per normalisation; both gradients in closed form, the weights and their gradient never formed "
        "when the caller takes only the output) wherever the kernel is exact to the dtype, else in the log domain.",
        "- entrokit 'implicit' runs the loop without a graph and differentiates the fixed point "
        "(conjugate-gradient adjoint, float32 relative tolerance 1e-6): memory does not grow with n_iter; "
        "its gradient is that of the converged layer (the unrolled loops differentiate the truncated one), "
        "an approximation where n_iter normalisations leave a marginal error (last column but one).",
        "- time: forward + backward of (out * w).sum(), one thread; CPU time is process time "
        "(time.process_time), wall time in brackets; the machine is shared (2 cores, load above), so "
        "wall times carry waiting that CPU times do not.",
        f"- allocator: {alloc_note}",
        "- peak: growth of the RSS high-water mark (VmHWM after resetting it through /proc/self/clear_refs, "
        "minus VmRSS) over one forward+backward in a fresh process (MALLOC_MMAP_THRESHOLD_=65536), "
        "after a warm-up on a tiny problem; saved: distinct storages saved by autograd, inputs excluded; "
        "one instance (memory does not vary with the seed).",
        "- marginal L1 error: ||P1/T - 1/T||_1 + ||P^T 1/T - 1/S||_1 of the returned weights, max over the batch; "
        "same function: max |output - plain output| in the last column.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.out)
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
