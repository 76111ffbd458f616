"""Sharded Sinkhorn over processes (torchrun)
==========================================

Sharded Sinkhorn: one OT problem whose source points are split over processes.

Each rank holds its rows of x (and of the weights a); y is replicated, or, with --ring,
split too and passed around the ranks. The solver is the ordinary ``entrokit.sinkhorn``;
the geometry turns its reductions into collectives (gloo on CPU, NCCL with CUDA).

Run:  torchrun --nproc_per_node=2 examples/sharded_sinkhorn.py [--source-points 4000 --target-points 3000 --ring]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import entrokit
from entrokit.geometry.pointcloud import PointCloud
from entrokit.geometry.sharded import CommCounter, ShardedPointCloud
from entrokit.problem import make_problem
from entrokit.solvers.sinkhorn import SinkhornOptions, sinkhorn_problem


def main():
    ap = argparse.ArgumentParser()
    # long names: torchrun would take --n or --m for abbreviations of its own options
    ap.add_argument("--source-points", dest="n", type=int, default=4000)
    ap.add_argument("--target-points", dest="m", type=int, default=3000)
    ap.add_argument("--dim", dest="d", type=int, default=3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--ring", action="store_true", help="shard y too and pass its blocks around the ranks")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--double", action="store_true", help="float64 (default float32)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.float64 if args.double else torch.float32

    # every rank draws the same full problem (one seed) and keeps its shard
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, args.d, generator=gen, dtype=dtype)
    y = 0.8 * torch.rand(args.m, args.d, generator=gen, dtype=dtype) + 0.1
    x_local = x.tensor_split(world)[rank].to(device)
    y_here = (y.tensor_split(world)[rank] if args.ring else y).to(device)
    geom = ShardedPointCloud(x_local, y_here, ring=args.ring, chunk_size=args.chunk_size)

    t0 = time.perf_counter()
    with CommCounter() as total:
        res = entrokit.sinkhorn(None, None, geom, args.eps, tol=args.tol)  # uniform weights
    elapsed = time.perf_counter() - t0

    # bytes per iteration of the solver loop alone: 10 fixed iterations
    problem = make_problem(None, None, geom).with_batch()
    with CommCounter() as loop:
        sinkhorn_problem(problem, args.eps, SinkhornOptions(fixed_iter=True, max_iter=10))
    per_iter = loop.bytes_sent / 10
    bound = 2 * (args.n + args.m) * torch.finfo(dtype).bits // 8

    print(f"[rank {rank}] {geom!r}: f holds {tuple(res.f.shape)} rows, g {tuple(res.g.shape)}", flush=True)
    dist.barrier()
    if rank == 0:
        mode = "ring" if args.ring else "replicated y"
        print(
            f"\n{world} ranks ({dist.get_backend()}, {mode}), n={args.n}, m={args.m}, d={args.d}, "
            f"eps={args.eps:g}, {dtype}\n{res}\n"
            f"solve: {elapsed:.2f} s, {int(res.n_iter)} iterations, "
            f"{total.bytes_sent / 1e6:.3f} MB sent by rank 0 in all\n"
            f"solver loop: {per_iter:.0f} bytes per iteration per rank "
            f"(2 (n + m) itemsize = {bound}; {total.by_kind})"
        )
        if args.n * args.m <= 2e7:  # small enough to check against one process
            single = PointCloud(x.to(device), y.to(device), chunk_size=args.chunk_size)
            ref = entrokit.sinkhorn(None, None, single, args.eps, tol=args.tol)
            print(f"single process: {ref}\n|value difference| = {abs(float(res.value - ref.value)):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
