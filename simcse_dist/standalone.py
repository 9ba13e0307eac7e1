"""simcse-eval (the paper's STS table) and simcse-export (HF + sentence-transformers model).

Under a launcher (`torchrun --nproc_per_node N -m simcse_dist.standalone eval ...`) every rank
loads the model, encodes an equal share of the sentences and the shares are gathered
(evaluation.encode); rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import POOLERS
from .readers import DataError
from .sts import PAPER_TASKS, TASKS, StsData, TaskNotFound, check_task, load_task
from .utils import fail, quiet_transformers

PRECISIONS = ("fp32", "bf16", "fp16")


def format_table(titles: list[str], values: list[float]) -> str:
    """The paper's table: one header row, one row of Spearman x 100 with two decimals."""
    cells = [f"{v:.2f}" for v in values]
    widths = [max(len(t), len(c)) for t, c in zip(titles, cells, strict=True)]
    header = " | ".join(t.rjust(w) for t, w in zip(titles, widths, strict=True))
    row = " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return f"{header}\n{'-' * len(header)}\n{row}"


def select_tasks(names: str, split: str, data_dir: str, say=print) -> dict[str, StsData]:
    """Read every requested task. Named tasks must exist; with 'all' (the paper's set for the
    split) a task whose files are absent is skipped with a message."""
    wanted = names.strip().lower()
    explicit = wanted != "all"
    tasks = [t.strip() for t in wanted.split(",") if t.strip()] if explicit else list(PAPER_TASKS[split])
    for task in tasks:
        check_task(task, split)
    out = {}
    for task in tasks:
        try:
            out[task] = load_task(task, split, data_dir)
        except TaskNotFound as e:
            if explicit:
                raise
            say(f"skipping {e}")
    if not out:
        raise DataError(f"none of the tasks {', '.join(tasks)} ({split}) was found under {data_dir}")
    return out


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simcse-eval",
        description="Score a sentence encoder on STS (cosine, Spearman x 100; STS12-16 pooled over subsets, "
        "the 'all' setting of the paper).",
    )
    p.add_argument("--model", required=True,
                   help="run dir (uses best/), model dir, sentence-transformers dir, HF dir or bundled:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="all",
                   help=f"comma-separated from {', '.join(TASKS)}; 'all' = the paper's tasks of the split, "
                   "skipping absent ones (default)")
    p.add_argument("--split", default="test", choices=("test", "dev", "train"))
    p.add_argument("--data-dir", required=True, help="e.g. ../shared/data or ../shared/data/senteval")
    p.add_argument("--pooler", choices=POOLERS,
                   help="override the saved pooler (needed for a plain HF model)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="inference dtype of the weights")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per forward per rank")
    p.add_argument("--max-length", type=int, default=512, help="truncation in tokens (capped by the model)")
    p.add_argument("--output-json", help="write {task: spearman x 100, ..., 'avg': ...} here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def eval_cli(argv: list[str] | None = None) -> int:
    args = _eval_parser().parse_args(argv)
    import torch

    from . import distributed as du
    from .evaluation import pair_embeddings, sts_correlation
    from .export import ExportError, load_encoder

    env = du.DistEnv.from_env()
    say = print if env.is_main else (lambda *a, **k: None)
    try:
        data = select_tasks(args.tasks, args.split, args.data_dir,
                            lambda m: print(m, file=sys.stderr) if env.is_main else None)
    except DataError as e:
        return fail(str(e))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.world_size > 1:
        du.init_distributed(env, timeout_s=1800)
    try:
        try:
            with quiet_transformers():
                encoder, tokenizer, meta = load_encoder(args.model, args.pooler)
        except (ExportError, OSError) as e:
            return fail(str(e))
        device = du.device_for(env)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        encoder.to(device=device, dtype=dtype)
        max_length = min(args.max_length, getattr(encoder.backbone.config, "max_position_embeddings", 512))
        say(f"model {meta['path']}: pooler {meta['pooler']}{' + MLP' if encoder.uses_mlp else ''}, "
            f"{args.precision}, {env.world_size} rank(s), device {device}")
        scores = {}
        for task, pairs in data.items():
            skipped = f", {pairs.skipped} blank-score rows skipped" if pairs.skipped else ""
            say(f"{task}: {len(pairs.scores)} pairs from {pairs.source}{skipped}")
            e1, e2 = pair_embeddings(encoder, tokenizer, pairs.sentences1, pairs.sentences2, device,
                                     args.batch_size, max_length, show_progress=not args.no_progress)
            scores[task] = 100 * sts_correlation(e1, e2, pairs.scores)
        scores["avg"] = sum(scores.values()) / len(scores)
        if env.is_main:
            titles = [TASKS[t].title for t in data] + ["Avg."]
            print(format_table(titles, list(scores.values())), flush=True)
            missing = [t for t in PAPER_TASKS[args.split] if t not in data] if args.tasks.strip().lower() == "all" else []
            if missing:
                print(f"note: Avg. is over {len(data)} tasks; skipped (no data): {', '.join(missing)}", flush=True)
            if args.output_json:
                Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output_json).write_text(json.dumps(scores, indent=2) + "\n")
    finally:
        du.teardown()
    return 0


def export_cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simcse-export",
        description="Write a Hugging Face + sentence-transformers model from a run dir (its best/) or a model dir.",
    )
    p.add_argument("src", help="run dir, model dir, or any HF encoder dir (then --pooler)")
    p.add_argument("out_dir")
    p.add_argument("--pooler", choices=POOLERS,
                   help="override (or, for a plain HF model, set) the pooler")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = p.parse_args(argv)
    from .export import ExportError, export_model

    try:
        with quiet_transformers():
            out = export_model(args.src, args.out_dir, args.pooler, args.overwrite)
    except (ExportError, OSError) as e:
        return fail(str(e))
    meta = json.loads((out / "simcse_config.json").read_text())
    print(f"exported {out}: pooler {meta['pooler']}, MLP {'kept' if meta['mlp'] else 'not used at test time'}; "
          f"load with SentenceTransformer({str(out)!r}) or AutoModel (see docs/evaluation.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m simcse_dist.standalone eval|export ...` (how torchrun starts the evaluator)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"eval": eval_cli, "export": export_cli}
    if not argv or argv[0] not in commands:
        return fail("usage: python -m simcse_dist.standalone eval|export [options]")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
