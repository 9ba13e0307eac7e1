"""Peak memory of one training step against the global batch, with and without gradient caching.

Each configuration runs `simcse-train` for `--steps` optimizer steps in a fresh single process
(the bundled all-MiniLM-L6-v2, fp32, CPU) and reports the peak resident set size of that process
(ru_maxrss of the child), so the numbers include the model, optimizer and Python overheads.
With grad_cache the micro-batch (chunk) is fixed and grad_accum = global / (chunk x ranks).

    python -m bench.memory --globals 64,256,1024 --chunk 32 --output bench/memory.json
    python -m bench.memory --globals 4096 --chunk 64 --modes cache     # the 4096 check (slow)
    python -m bench.memory --globals 256 --modes cache --overrides engine.activation_checkpointing=true \
        model.pooler=avg model.lora.r=8 "model.lora.target_modules=[query,value]"   # LoRA, checkpointing

Run from the repository root. Each configuration is measured in its own interpreter
(`python -m bench.memory --_one ...`), which starts the training run as its only child.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, REPO, start_result, write_result


def run_one(
    global_batch: int, chunk: int, cache: bool, steps: int, data: Path, overrides: list[str], nproc: int = 1
) -> dict:
    """ru_maxrss of the children covers every rank the launcher waited for: with nproc > 1 the
    peak is that of the largest rank (the per-rank peak)."""
    nproc = max(1, nproc)
    accum = global_batch // (chunk * nproc) if cache else 1
    with tempfile.TemporaryDirectory() as out:
        args = [
            sys.executable,
            "-m",
            "simcse_dist.cli",
            *(["--nproc", str(nproc)] if nproc > 1 else []),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.train_file={data}",
            f"train.global_batch_size={global_batch}",
            f"train.grad_accum={accum}",
            f"train.grad_cache={str(cache).lower()}",
            f"train.max_steps={steps}",
            "log.every_steps=1",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            "engine.zero_stage=0",
            f"train.output_dir={out}",
            *overrides,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{proc.stderr[-4000:]}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    if peak_kib <= before:
        print("note: ru_maxrss of children is a running maximum; run configs in increasing size", file=sys.stderr)
    return {
        "global_batch": global_batch,
        "ranks": nproc,
        "mode": "grad_cache" if cache else "one micro-batch",
        "chunk": chunk if cache else global_batch // nproc,
        "grad_accum": accum,
        "steps": steps,
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "seconds": round(elapsed, 1),
        "loss": next(r["train/loss"] for r in reversed(rows) if "train/loss" in r),
        "overrides": overrides,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--globals", default="64,256,1024")
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--modes", default="cache,plain", help="cache, plain or both (plain: one micro-batch)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--overrides", nargs="*", default=[], help="section.key=value for every run (e.g. model.lora.r=8)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (simcse-train --nproc); the peak is per rank")
    args = p.parse_args()
    result = start_result(args, libraries=("torch", "transformers", "deepspeed"))
    results = []
    # ru_maxrss over children only grows: run each mode from the smallest batch up, in separate
    # interpreter processes, so every reported peak belongs to its own configuration.
    for mode in args.modes.split(","):
        for g in map(int, args.globals.split(",")):
            one = json.dumps([g, args.chunk, mode == "cache", args.steps, args.data, args.overrides, args.nproc])
            r = subprocess.run(
                [sys.executable, "-m", "bench.memory", "--_one", one], capture_output=True, text=True, cwd=REPO
            )
            if r.returncode != 0:
                raise SystemExit(r.stderr[-4000:])
            results.append(json.loads(r.stdout))
            print(json.dumps(results[-1]), flush=True)
    print("\n| global batch | mode | chunk | grad_accum | peak RSS (GiB) | seconds |\n|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['global_batch']} | {r['mode']} | {r['chunk']} | {r['grad_accum']} | {r['peak_rss_gib']} | {r['seconds']} |"
        )
    result["results"] = results
    write_result(result, args.output)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_one":
        g, chunk, cache, steps, data, overrides, nproc = json.loads(sys.argv[2])
        print(json.dumps(run_one(g, chunk, cache, steps, Path(data), overrides, nproc)))
    else:
        main()
