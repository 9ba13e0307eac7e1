"""Preparation speed by ranks: rows/s of `simcse-prepare` when 1, 2, 4 ranks (1 tokenizing worker
each) share one corpus, and on two simulated nodes (two torchrun launchers, `--nnodes 2`, on this
host).

    python -m bench.prepare_ranks                                    # 1M rows, ranks 1,2,4 + 2 nodes x 1
    python -m bench.prepare_ranks --rows 20000 --repeats 1 --ranks 1,2 --nodes 2x1   # a smoke run
    python -m bench.prepare_ranks --files 8 --output bench/results/prepare-ranks.json

The input is --rows unique sentences synthesized from the wiki sample (`f"{i} {sentence}"`), one
text file or --files text files of a folder. Each run is the real command (`python -m
simcse_dist.cli.prepare` under torchrun, a fresh cache dir), timed two ways: the build itself
(build.json: rank 0's plan to the published manifest) and the launch end to end (process start,
imports and the tokenizer load included: a constant of a few seconds per run). rows/s and the
speed-up over 1 rank use the build time, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BUNDLED, DEFAULT_DATA, REPO, start_result, write_result


def synthesize(folder: Path, rows: int, files: int, sample: Path) -> str:
    """The input spec: one file (files == 1) or a folder of `files` text files, `rows` lines in all."""
    texts = [s for s in sample.read_text("utf-8").splitlines() if s.strip()]
    folder.mkdir(parents=True)
    per = -(-rows // files)
    for k in range(files):
        lo, hi = k * per, min(rows, (k + 1) * per)
        with (folder / f"part-{k:03d}.txt").open("w", encoding="utf-8") as f:
            f.writelines(f"{i} {texts[i % len(texts)]}\n" for i in range(lo, hi))
    return str(folder / "part-000.txt") if files == 1 else str(folder)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: str, cache: Path, nodes: int, per_node: int, args) -> tuple[float, str]:
    """One preparation by nodes x per_node ranks; (end-to-end seconds, rank 0's output)."""
    overrides = [
        f"model.name_or_path={BUNDLED}",
        f"data.train_file={spec}",
        f"data.cache_dir={cache}",
        f"data.max_seq_len={args.max_seq_len}",
    ]
    command = ["-m", "simcse_dist.cli.prepare", "--workers", str(args.workers), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmds = [[*run, "--standalone", f"--nproc_per_node={per_node}", *command]]
    else:
        rdzv = ["--master_addr=127.0.0.1", f"--master_port={_port()}", f"--nnodes={nodes}"]
        cmds = [[*run, *rdzv, f"--node_rank={n}", f"--nproc_per_node={per_node}", *command] for n in range(nodes)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args)} failed ({p.returncode}):\n{out[-4000:]}")
    return seconds, outs[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="sentences to synthesize the input from")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=1, help="1: one text file; N: a folder of N text files")
    p.add_argument("--ranks", default="1,2,4", help="ranks on one node (comma-separated)")
    p.add_argument("--nodes", default="2x1", help="simulated multi-node runs, NODESxRANKS_PER_NODE (comma-separated)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes per rank")
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=3600, help="per launch, seconds")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    layouts = [(1, int(r)) for r in args.ranks.split(",") if r]
    layouts += [tuple(int(x) for x in n.split("x")) for n in args.nodes.split(",") if n]
    res = start_result(args, libraries=("torch", "tokenizers"))
    res["runs"] = []
    say = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="simcse-prep-ranks-") as tmp:
        tmp = Path(tmp)
        spec = synthesize(tmp / "input", args.rows, args.files, Path(args.data))
        size = sum(f.stat().st_size for f in (tmp / "input").iterdir())
        say(f"input: {args.rows:,} rows in {args.files} file(s), {size / 1e6:.1f} MB; {os.cpu_count()} CPU(s)")
        base = None
        for nodes, per_node in layouts:
            builds, walls = [], []
            for r in range(args.repeats):
                cache = tmp / f"cache-{nodes}x{per_node}-{r}"
                wall, out = launch(spec, cache, nodes, per_node, args)
                (entry,) = [d for d in cache.iterdir() if d.is_dir()]
                build = json.loads((entry / "build.json").read_text())
                manifest = json.loads((entry / "manifest.json").read_text())
                assert build["ranks"] == nodes * per_node and manifest["rows"] == args.rows, (build, out[-2000:])
                builds.append(build["seconds"])
                walls.append(wall)
            ranks, median = nodes * per_node, statistics.median(builds)
            rate = args.rows / median
            base = base or (rate if (nodes, per_node) == (1, 1) else None)
            run = {
                "nodes": nodes,
                "ranks_per_node": per_node,
                "ranks": ranks,
                "workers_per_rank": args.workers,
                "units": manifest["units"],
                "build_seconds": builds,
                "launch_seconds": walls,
                "rows_per_s": rate,
                "speedup_vs_1_rank": rate / base if base else None,
            }
            res["runs"].append(run)
            where = f"{nodes} nodes x {per_node}" if nodes > 1 else f"{ranks} rank(s)"
            say(
                f"{where} x {args.workers} worker(s): build median {median:.2f} s ({rate:,.0f} rows/s"
                + (f", {rate / base:.2f}x 1 rank" if base else "")
                + f"), launch median {statistics.median(walls):.1f} s, {manifest['units']} unit(s)"
            )
    write_result(res, args.output, say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
