"""Communication per step: the embedding all-gather vs the gradient all-reduce, on gloo.

    python -m bench.gather_comm                    # 2 and 3 ranks, MiniLM and bert-base shapes
    python -m bench.gather_comm --ranks 2 --output bench/gather.json

Each configuration starts N CPU processes (gloo over loopback) and times, median over
--iters iterations after a warm-up, with a barrier before each:
- `simcse_dist.train.gather.gather_with_grad(z[:, 1:])` forward (what the objective gathers), for z [b, k, d] with requires_grad;
- the same forward + backward (the all-gather's backward is a reduce-scatter, emulated on
  gloo with all_to_all): what one training step pays for exact global-batch negatives;
- `dist.all_reduce` of a flat fp32 buffer as large as the model's gradients, the collective
  DeepSpeed runs every step anyway (ZeRO-0; ZeRO-1/2 move the same bytes as reduce-scatter +
  all-gather), for the ratio.
Bytes are what each rank sends per step, from the ring algorithms' formulas (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import start_result, write_result

# (name, per-rank micro-batch b, views k, embedding dim d, parameters of the encoder)
SHAPES = [
    ("minilm unsup b64", 64, 2, 384, 22_713_216),
    ("bert-base unsup b64", 64, 2, 768, 109_482_240),
    ("bert-base sup b64", 64, 3, 768, 109_482_240),
    ("bert-base sup b512", 512, 3, 768, 109_482_240),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_time(fn, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    # the slowest rank decides when a collective is done
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(rank: int, world: int, port: int, iters: int, warmup: int, allreduce: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from simcse_dist.train.gather import gather_with_grad

    rows = []
    for name, b, k, d, params in SHAPES:
        torch.manual_seed(rank)
        z = torch.randn(b, k, d, requires_grad=True)

        def fwd(z=z):
            gather_with_grad(z[:, 1:])

        def fwd_bwd(z=z):
            candidates = gather_with_grad(z[:, 1:])
            (z[:, 0].sum() + candidates.square().sum()).backward()
            z.grad = None

        row = {
            "name": name,
            "world_size": world,
            "b": b,
            "k": k,
            "d": d,
            "dtype": "fp32",
            "gather_fwd_ms": 1000 * _median_time(fwd, iters, warmup),
            "gather_fwd_bwd_ms": 1000 * _median_time(fwd_bwd, iters, warmup),
            # ring all-gather: each rank sends (N-1) shards of b*(k-1)*d elements; the
            # backward's reduce-scatter the same again.
            "gather_bytes_sent_per_rank": 2 * (world - 1) * b * (k - 1) * d * 4,
            "grad_allreduce_bytes_sent_per_rank": int(2 * (world - 1) / world * params * 4),
        }
        if allreduce:
            buf = torch.zeros(params)
            row["grad_allreduce_ms"] = 1000 * _median_time(lambda buf=buf: dist.all_reduce(buf), max(3, iters // 10), 1)
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(world: int, iters: int, warmup: int, allreduce: bool, tmp: str) -> list[dict]:
    out = os.path.join(tmp, f"gather-{world}.json")
    mp.spawn(_worker, args=(world, _free_port(), iters, warmup, allreduce, out), nprocs=world, join=True)
    return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,3")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-allreduce", action="store_true", help="skip the gradient all-reduce reference")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = start_result(args, libraries=("torch",))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(x) for x in args.ranks.split(",")):
            rows += run(world, args.iters, args.warmup, not args.no_allreduce, tmp)
    print(
        f"{'shape':<22} {'N':>2} {'gather fwd ms':>14} {'fwd+bwd ms':>11} {'gather KB/rank':>15} "
        f"{'grad all-reduce ms':>19} {'grad MB/rank':>13}"
    )
    for r in rows:
        print(
            f"{r['name']:<22} {r['world_size']:>2} {r['gather_fwd_ms']:>14.3f} {r['gather_fwd_bwd_ms']:>11.3f} "
            f"{r['gather_bytes_sent_per_rank'] / 1e3:>15.1f} {r.get('grad_allreduce_ms', float('nan')):>19.1f} "
            f"{r['grad_allreduce_bytes_sent_per_rank'] / 1e6:>13.1f}"
        )
    result["results"] = rows
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
