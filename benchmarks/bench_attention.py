"""Sinkhorn attention: forward+backward time and peak memory against a hand-written loop.

Compares, on one CPU thread, float32, head dimension 32:

* ``hand``: a Sinkformer-style unrolled log-domain loop written here (the reference:
  the update of ``sinkformers/vit_pytorch/sinkhorn.py`` without its per-iteration host
  sync), ``n_iter`` alternating row/column normalisations, then ``P @ v``;
* ``unroll``: :func:`entrokit.nn.attention.sinkhorn_attention` with ``grad="unroll"``;
* ``implicit``: the same with ``grad="implicit"``.

All three compute the same function (checked: max |output difference| is printed).

Time: forward + backward of ``(out * w).sum()``; after one warm-up per method, rounds
time the three methods in turn (interleaved) for ``--budget`` seconds (1 to 30 rounds);
the best run per method is reported.

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
    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py --quick    # small grid, prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

from entrokit.bench.common import machine_info

E = 32
METHODS = ("hand", "unroll", "implicit")


def hand_attention(q, k, v, n_iter: int, eps: float = 1.0):
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
    if method == "hand":
        out, P = hand_attention(q, k, v, n_iter)
        return (out, P) if weights else out
    from entrokit.nn.attention import sinkhorn_attention

    return sinkhorn_attention(q, k, v, n_iter=n_iter, grad=method, return_weights=weights)


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


def time_point(BH, T, n_iter, budget: float):
    """Best time per method: one warm-up each, then rounds that time every method once
    (interleaved, so that load from other processes hits all of them alike) until
    ``budget`` seconds are spent (at least 1 round, at most 30)."""
    q, k, v, w = make_inputs(BH, T)
    warm = {}
    for m in METHODS:
        t0 = time.perf_counter()
        fwd_bwd(m, q, k, v, w, n_iter)
        warm[m] = time.perf_counter() - t0
    rounds = max(1, min(30, int(budget / sum(warm.values()))))
    best = dict.fromkeys(METHODS, math.inf)
    for _ in range(rounds):
        for m in METHODS:
            t0 = time.perf_counter()
            fwd_bwd(m, q, k, v, w, n_iter)
            best[m] = min(best[m], time.perf_counter() - t0)
    return best, rounds


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
    ap.add_argument("--budget", type=float, default=3.0,
                    help="seconds of timed rounds per point (at least one round, at most 30)")
    ap.add_argument("--max-entries", type=float, default=2**25,
                    help="skip points with B*H*T*T above this (time and memory on this CPU)")
    ap.add_argument("--one", nargs=4, metavar=("METHOD", "BH", "T", "N_ITER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one:
        m, BH, T, n = args.one
        print(json.dumps(memory_point(m, int(BH), int(T), int(n))))
        return

    grid_bh = [32] if args.quick else [32, 128]
    grid_t = [128] if args.quick else [128, 512, 1024]
    grid_n = [3, 5, 20]
    rows, skipped = [], []
    mem_ref = {}
    for BH in grid_bh:
        for T in grid_t:
            big = BH * T * T > args.max_entries
            for n in [1] + grid_n:
                if big and n > 3:
                    skipped.append((BH, T, n))
                    continue
                q, k, v, _ = make_inputs(BH, T)
                with torch.no_grad():
                    outs = {m: run_method(m, q, k, v, n, weights=True) for m in METHODS}
                diff = max(float((outs[m][0] - outs["hand"][0]).abs().max()) for m in METHODS)
                merr = {m: marginal_error(outs[m][1], T, T) for m in METHODS}
                del outs
                times, rounds = time_point(BH, T, n, args.budget)
                mems = {m: measure_memory(m, BH, T, n) for m in METHODS}
                if n == 1:
                    mem_ref[(BH, T)] = mems["implicit"]
                rows.append((BH, T, n, times, mems, merr, diff, rounds))
                print(BH, T, n, {m: round(times[m] * 1e3, 1) for m in METHODS},
                      {m: round(mems[m]["peak_mb"]) for m in METHODS}, f"diff {diff:.1e}", flush=True)

    lines = [
        "# Benchmark: attention",
        "",
        f"Machine: {machine_info()}",
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"### Sinkhorn attention, forward + backward (float32, head dim {E}, self-attention T = S)",
        "",
        "| B*H | T | n_iter | rounds | hand loop | unroll | implicit | unroll / hand | target <= 1.0 "
        "| implicit / hand | target <= 1.5 at n_iter=5 | peak MB (hand / unroll / implicit) "
        "| saved MB (hand / unroll / implicit) | implicit peak / its peak at n_iter=1 | target <= 1.2 at n_iter=20 "
        "| marginal L1 error (hand / unroll / implicit) | max abs diff vs hand |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for BH, T, n, times, mems, merr, diff, rounds in rows:
        ru = times["unroll"] / times["hand"]
        ri = times["implicit"] / times["hand"]
        ref = mem_ref.get((BH, T))
        rm = mems["implicit"]["peak_mb"] / ref["peak_mb"] if ref and ref["peak_mb"] > 0 else float("nan")
        lines.append(
            f"| {BH} | {T} | {n} | {rounds} | {fmt_t(times['hand'])} | {fmt_t(times['unroll'])} | {fmt_t(times['implicit'])} "
            f"| {ru:.2f} | {'yes' if ru <= 1.0 else 'no'} | {ri:.2f} | "
            f"{('yes' if ri <= 1.5 else 'no') if n == 5 else '-'} "
            f"| {join(mems[m]['peak_mb'] for m in METHODS)} "
            f"| {join(mems[m]['saved_mb'] for m in METHODS)} "
            f"| {rm:.2f} | {('yes' if rm <= 1.2 else 'no') if n == 20 else '-'} "
            f"| {join((merr[m] for m in METHODS), '.1e')} | {diff:.1e} |"
        )
    lines += [
        "",
        "- n_iter counts normalisations as Sinkformer does (rows, columns, rows, ...); n_iter=1 is softmax.",
        "- time: forward + backward of (out * w).sum(), one thread; best of the 'rounds' column's runs, "
        f"after a warm-up; each round times the three methods in turn ({args.budget:g} s of rounds per "
        "point, 1 to 30 rounds). The machine is shared: the best run is the least disturbed one.",
        "- peak: growth of the RSS high-water mark (VmHWM after resetting it through /proc/self/clear_refs, "
        "minus VmRSS) over one forward+backward in a fresh process (MALLOC_MMAP_THRESHOLD_=65536), "
        "after a warm-up on a tiny problem; "
        "saved: distinct storages saved by autograd, inputs excluded.",
        "- marginal L1 error: ||P1/T - 1/T||_1 + ||P^T 1/T - 1/S||_1 of the returned weights, max over the batch.",
    ]
    if skipped:
        pts = ", ".join(f"(B*H={bh}, T={t}, n_iter={n})" for bh, t, n in skipped)
        lines.append(
            f"- not run (B*H*T^2 > {args.max_entries:.3g} scores: the unrolled loops need about 2 n_iter "
            f"tensors of that size and minutes per point on this 2-core CPU): {pts}."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention.md")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
