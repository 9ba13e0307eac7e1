"""simcse-sweep: train one config under several seeds, evaluate each best/, report mean +- std.

SimCSE's numbers move by about a point between seeds (the paper reports single runs), so a
claimed improvement should be read against this spread. Each seed runs as its own process
(`simcse-train ... train.seed=S train.output_dir=<base>/seed-S`, under torchrun when
--nproc-per-node > 1), so a crash or an OOM in one seed leaves the others' results intact,
then `simcse-eval` scores <base>/seed-S/best into <base>/seed-S/eval-<split>.json.
std is the sample standard deviation (n - 1), the usual choice for a handful of seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

from simcse_dist.cli.common import fail, start_logging
from simcse_dist.eval.sts import TASKS

log = logging.getLogger("simcse_dist.cli.sweep")  # not __name__: run as `python -m`, that is __main__


def _launcher(nproc: int, module: str) -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]


def train_command(config: str, seed: int, out_dir: Path, overrides: list[str], nproc: int) -> list[str]:
    return [
        *_launcher(nproc, "simcse_dist.cli"),
        "--config",
        config,
        *overrides,
        f"train.seed={seed}",
        f"train.output_dir={out_dir}",
    ]


def eval_command(run_dir: Path, args: argparse.Namespace, out_json: Path) -> list[str]:
    cmd = [
        *_launcher(args.nproc_per_node, "simcse_dist.cli.eval"),
        "--model",
        str(run_dir),
        "--tasks",
        args.tasks,
        "--split",
        args.split,
        "--data-dir",
        args.data_dir,
        "--precision",
        args.precision,
        "--output-json",
        str(out_json),
        "--no-progress",
    ]
    return cmd + (["--pooler", args.pooler] if args.pooler else [])


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{"mean": {task: ...}, "std": {task: ...}} over the seeds (std = 0 for one seed)."""
    tasks = list(next(iter(per_seed.values())))
    mean, std = {}, {}
    for task in tasks:
        values = [scores[task] for scores in per_seed.values()]
        mean[task] = statistics.fmean(values)
        std[task] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std}


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    titles = [TASKS[t].title if t in TASKS else "Avg." for t in summary["mean"]]
    cells = [f"{summary['mean'][t]:.2f} ± {summary['std'][t]:.2f}" for t in summary["mean"]]
    widths = [max(len(a), len(b)) for a, b in zip(titles, cells, strict=True)]
    header = " | ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True))
    return header + "\n" + "-" * len(header) + "\n" + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def _base_dir(args: argparse.Namespace) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    from simcse_dist.config import load_config

    return Path(load_config(args.config, args.overrides).train.output_dir)


def _run(cmd: list[str]) -> None:
    log.info("+ " + " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simcse-sweep", description="Train and evaluate one config under several seeds.")
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", required=True, help="comma-separated, e.g. 1,2,3")
    p.add_argument("--tasks", default="all", help="as simcse-eval --tasks")
    p.add_argument("--split", default="test", choices=("test", "dev", "train"))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--pooler", help="as simcse-eval --pooler (default: the trained one)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per seed (torchrun when > 1)")
    p.add_argument("--output-dir", help="base dir of seed-S/ (default: train.output_dir of the config)")
    p.add_argument("--output-json", help="summary JSON (default <base>/sweep-<split>.json)")
    p.add_argument("overrides", nargs="*", help="section.key=value, passed to every training run")
    args = p.parse_args(argv)
    start_logging()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        return fail(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds) or not seeds:
        return fail(f"--seeds: expected distinct integers, got {args.seeds!r}")
    base = _base_dir(args)
    per_seed: dict[int, dict[str, float]] = {}
    try:
        for seed in seeds:
            run_dir = base / f"seed-{seed}"
            _run(train_command(args.config, seed, run_dir, args.overrides, args.nproc_per_node))
            out_json = run_dir / f"eval-{args.split}.json"
            _run(eval_command(run_dir, args, out_json))
            per_seed[seed] = json.loads(out_json.read_text())
    except RuntimeError as e:
        return fail(str(e), 1)
    summary = summarize(per_seed)
    log.info(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {args.split} split, Spearman x 100, mean ± std:")
    log.info(format_summary(summary))
    out = Path(args.output_json) if args.output_json else base / f"sweep-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": seeds, "split": args.split, "per_seed": per_seed, **summary}, indent=2) + "\n")
    log.info(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
