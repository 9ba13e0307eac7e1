"""Corpus scale: what a rank pays for the data at 10k, 1M and 10M rows (issue: constant memory
per rank, time to first step, preparation throughput).

    python -m bench.corpus_scale --rows 10000 1000000 10000000 --output bench/results/corpus-scale.json

For each size, a file of unique lines (`f"{i} {wiki sentence}"`, from ../shared/data's wiki
sample) is written to --work, then:
- `simcse-prepare` with 1 and 2 worker processes (the second only up to --prepare-2-max rows):
  wall time, rows/s, peak RSS of the process tree (psutil, sampled every 50 ms);
- a one-rank `simcse-train` run of 2 steps on the prepared corpus (bundled MiniLM, batch 64):
  time from start to the first metrics line and peak RSS of the process;
- in-process: opening the corpus (manifest + shards), batch indices of a 4,096-row global batch
  at 10^9 rows, and one 64-row collation from the corpus vs the tokenizer (data.Collator).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import BUNDLED, DEFAULT_DATA, REPO, start_result, write_result

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}


def make_corpus(path: Path, rows: int, source: Path) -> None:
    if path.exists() and sum(1 for _ in open(path, "rb")) == rows:
        return
    base = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    with open(path, "w") as f:
        for i in range(rows):
            f.write(f"{i} {base[i % len(base)]}\n")


def run_measured(cmd: list[str], first_line: Path | None = None, timeout: float = 3600) -> dict:
    """Wall time, peak RSS of the process tree, and (if `first_line` is given) the time until
    that file has a line."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, first = 0, None
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, first
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            if first is None and first_line is not None and first_line.exists() and first_line.stat().st_size:
                first = time.perf_counter() - t0
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate(timeout=timeout)
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "first_step_s": None if first is None else round(first, 2),
        "output_tail": out[-600:],
    }


def in_process(corpus_dir: Path, tokenizer_path: str) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    from simcse_dist.data.collate import Collator, CorpusCollator
    from simcse_dist.data.corpus import PreparedCorpus
    from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler

    t = time.perf_counter()
    corpus = PreparedCorpus(corpus_dir)
    open_s = time.perf_counter() - t
    sampler = GlobalBatchSampler(BatchPlan((10**9,), 4096, 8, 1), 3, 42)
    sampler.step_examples(5)
    t = time.perf_counter()
    for step in range(200):
        sampler.step_examples(step * 977)
    index_ms = (time.perf_counter() - t) / 200 * 1e3
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    fly = Collator(tok, 32, "unsup")
    mine = CorpusCollator(corpus, tok.pad_token_id, "unsup")
    rows = np.random.default_rng(0).choice(corpus.num_rows, 64, replace=False).tolist()
    texts = [(f"{i} placeholder sentence of about the usual wiki length, with a comma",) for i in rows]
    timings = {}
    for name, fn in (("corpus", lambda: mine(rows)), ("tokenizer", lambda: fly(texts))):
        fn()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        timings[name] = (time.perf_counter() - t) / 50 * 1e3
    return {
        "open_s": round(open_s, 4),
        "shards": len(corpus.manifest["shards"]),
        "index_ms_per_4096_at_1e9": round(index_ms, 3),
        "collate_ms_corpus": round(timings["corpus"], 3),
        "collate_ms_tokenizer": round(timings["tokenizer"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    ap.add_argument("--prepare-2-max", type=int, default=2_000_000, help="largest size also prepared with 2 workers")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=None, help="where the corpora go (default: a temp dir)")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    from simcse_dist.config import resolve_model_path

    result = start_result(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="corpus-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    result["sizes"] = []
    for rows in args.rows:
        path = work / f"wiki-{rows}.txt"
        make_corpus(path, rows, args.data)
        entry: dict = {"rows": rows, "file_mb": round(path.stat().st_size / 2**20, 1)}
        for workers in (1, 2) if rows <= args.prepare_2_max else (2,):
            cache = work / f"cache-{rows}-w{workers}"
            cmd = [
                sys.executable,
                "-m",
                "simcse_dist.cli.prepare",
                "--config",
                str(REPO / "configs" / "demo.yaml"),
                "--workers",
                str(workers),
                "data.max_seq_len=32",
                f"model.name_or_path={BUNDLED}",
                f"data.train_file={path}",
                f"data.cache_dir={cache}",
            ]
            m = run_measured(cmd)
            m["rows_per_s"] = round(rows / m["seconds"])
            entry[f"prepare_w{workers}"] = m
            print(
                f"{rows:>11,} rows  prepare x{workers}: {m['seconds']:.1f} s, {m['rows_per_s']:,} rows/s, "
                f"peak {m['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        cache = next(work.glob(f"cache-{rows}-w*"))
        out = work / f"run-{rows}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [
            sys.executable,
            "-m",
            "simcse_dist.cli",
            f"model.name_or_path={BUNDLED}",
            f"data.train_file={path}",
            f"data.cache_dir={cache}",
            "data.max_seq_len=32",
            "train.global_batch_size=64",
            "train.max_steps=2",
            "log.every_steps=1",
            "checkpoint.every_steps=0",
            "log.progress_bar=false",
            "log.wandb_mode=disabled",
            f"train.output_dir={out}",
        ]
        entry["train_2_steps"] = run_measured(cmd, first_line=out / "metrics.jsonl")
        corpus_dir = next(d for d in cache.iterdir() if d.is_dir())
        entry["in_process"] = in_process(corpus_dir, resolve_model_path(BUNDLED))
        t = entry["train_2_steps"]
        print(
            f"{rows:>11,} rows  train 2 steps: first step at {t['first_step_s']} s, peak {t['peak_rss_mb']:.0f} MB; "
            f"{json.dumps(entry['in_process'])}",
            flush=True,
        )
        result["sizes"].append(entry)
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
