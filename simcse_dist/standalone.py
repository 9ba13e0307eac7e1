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
        "the 'all' setting of the paper), on a retrieval set (--retrieval) and on MTEB tasks (--mteb).",
    )
    p.add_argument("--model", required=True,
                   help="run dir (uses best/), model dir, sentence-transformers dir, HF dir or bundled:all-MiniLM-L6-v2")
    p.add_argument("--tasks", default="all",
                   help=f"comma-separated from {', '.join(TASKS)}; 'all' = the paper's tasks of the split, "
                   "skipping absent ones (default)")
    p.add_argument("--split", default="test", choices=("test", "dev", "train"))
    p.add_argument("--data-dir", help="STS data, e.g. ../shared/data or ../shared/data/senteval; "
                   "required unless --retrieval or --mteb is given (then STS runs only with it)")
    p.add_argument("--retrieval", nargs=3, metavar=("QUERIES", "CORPUS", "QRELS"),
                   help="TSVs with headers 'qid text', 'docid text', 'qid docid relevance': nDCG@10, MRR@10, "
                   "Recall@100, MAP@10 x 100 by cosine, exact ranking")
    p.add_argument("--corpus-chunk-size", type=int, default=50_000,
                   help="retrieval: documents encoded and ranked at a time (bounds memory)")
    p.add_argument("--mteb", metavar="TASK[,TASK]",
                   help="MTEB tasks (needs pip install 'simcse-dist[mteb]'): registered names whose data is in the "
                   "local Hugging Face cache, or module:Class / file.py:Class for a task that reads local files")
    p.add_argument("--pooler", choices=POOLERS,
                   help="override the saved pooler (needed for a plain HF model)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="inference dtype of the weights")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per forward per rank")
    p.add_argument("--max-length", type=int, default=512, help="truncation in tokens (capped by the model)")
    p.add_argument("--output-json", help="write {task: spearman x 100, ..., 'avg': ..., 'retrieval/ndcg@10': ..., "
                   "'mteb/<task>': main score x 100} here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def eval_cli(argv: list[str] | None = None) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    if args.data_dir is None and not (args.retrieval or args.mteb):
        parser.error("--data-dir is required (for the STS tasks) unless --retrieval or --mteb is given")
    if args.corpus_chunk_size < 1:
        parser.error(f"--corpus-chunk-size must be at least 1, got {args.corpus_chunk_size}")
    import torch

    from . import distributed as du
    from .evaluation import pair_embeddings, sts_correlation
    from .export import ExportError, load_encoder
    from .mteb_adapter import MtebEncoder, MtebError, resolve_tasks, run_mteb
    from .retrieval import METRICS, TITLES, evaluate_retrieval, load_retrieval

    env = du.DistEnv.from_env()
    say = print if env.is_main else (lambda *a, **k: None)
    # every input is read and checked before the process group and the model exist
    try:
        data = select_tasks(args.tasks, args.split, args.data_dir,
                            lambda m: print(m, file=sys.stderr) if env.is_main else None) if args.data_dir else {}
        retrieval = load_retrieval(*args.retrieval) if args.retrieval else None
        mteb_tasks = resolve_tasks(args.mteb) if args.mteb else []
    except (DataError, MtebError) as e:
        return fail(str(e))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.world_size > 1:
        du.init_distributed(env, timeout_s=1800)
    problems: list[str] = []
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
        progress = not args.no_progress
        say(f"model {meta['path']}: pooler {meta['pooler']}{' + MLP' if encoder.uses_mlp else ''}, "
            f"{args.precision}, {env.world_size} rank(s), device {device}")
        scores, tables = {}, []
        for task, pairs in data.items():
            skipped = f", {pairs.skipped} blank-score rows skipped" if pairs.skipped else ""
            say(f"{task}: {len(pairs.scores)} pairs from {pairs.source}{skipped}")
            e1, e2 = pair_embeddings(encoder, tokenizer, pairs.sentences1, pairs.sentences2, device,
                                     args.batch_size, max_length, show_progress=progress)
            scores[task] = 100 * sts_correlation(e1, e2, pairs.scores)
        if data:
            scores["avg"] = sum(scores.values()) / len(scores)
            tables.append(format_table([TASKS[t].title for t in data] + ["Avg."], list(scores.values())))
            missing = [t for t in PAPER_TASKS[args.split] if t not in data] if args.tasks.strip().lower() == "all" else []
            if missing:
                tables.append(f"note: Avg. is over {len(data)} tasks; skipped (no data): {', '.join(missing)}")
        if retrieval is not None:
            judged = len(retrieval.judged_queries)
            say(f"retrieval: {judged} queries with a relevant document (of {len(retrieval.queries)}), "
                f"{len(retrieval.corpus)} documents, from {retrieval.source}")
            metrics = evaluate_retrieval(encoder, tokenizer, retrieval, device, args.batch_size, max_length,
                                         args.corpus_chunk_size, show_progress=progress)
            scores.update({f"retrieval/{m}": 100 * metrics[m] for m in METRICS})
            tables.append(format_table(list(TITLES), [100 * metrics[m] for m in METRICS]))
        if mteb_tasks:
            adapter = MtebEncoder(encoder, tokenizer, device, name=Path(meta["path"]).name, batch_size=args.batch_size,
                                  max_length=max_length, show_progress=progress and env.is_main)
            results, problems = run_mteb(adapter, mteb_tasks, show_progress=progress and env.is_main)
            scores.update({f"mteb/{name}": 100 * value for name, (_, value) in results.items()})
            if results:
                tables.append(format_table([f"{name} ({main})" for name, (main, _) in results.items()],
                                           [100 * value for _, value in results.values()]))
        if env.is_main:
            if tables:
                print("\n".join(tables), flush=True)
            if args.output_json and scores:
                Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output_json).write_text(json.dumps(scores, indent=2) + "\n")
    finally:
        du.teardown()
    for problem in problems:  # after the results of the tasks that could run
        if env.is_main:
            fail(problem)
    return 2 if problems else 0


def export_cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simcse-export",
        description="Write a Hugging Face + sentence-transformers model with a model card (README.md) from a run dir "
        "(its best/) or a model dir; optionally upload it to the Hugging Face Hub.",
    )
    p.add_argument("src", help="run dir, model dir, or any HF encoder dir (then --pooler)")
    p.add_argument("out_dir")
    p.add_argument("--pooler", choices=POOLERS,
                   help="override (or, for a plain HF model, set) the pooler")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="then upload out_dir to this Hub model repo (created if missing; token from `hf auth login` "
                   "or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    import yaml

    from .card import best_info_scores, push_to_hub, write_model_card
    from .export import ExportError, export_model, resolve_model_dir

    try:
        with quiet_transformers():
            out = export_model(args.src, args.out_dir, args.pooler, args.overwrite)
        # the card reads the run's config.yaml (next to best/) and best_info.json when they exist
        model_dir = resolve_model_dir(args.src)
        configs = [model_dir / "config.yaml"] + ([model_dir.parent / "config.yaml"] if model_dir.name == "best" else [])
        config = next((yaml.safe_load(c.read_text()) for c in configs if c.is_file()), None)
        info_file = model_dir / "best_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except (ExportError, OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        return fail(str(e))
    scores, note = best_info_scores(info)
    write_model_card(out, config=config if isinstance(config, dict) else None, scores=scores, split_note=note,
                     model_id=args.push_to_hub)
    meta = json.loads((out / "simcse_config.json").read_text())
    print(f"exported {out}: pooler {meta['pooler']}, MLP {'kept' if meta['mlp'] else 'not used at test time'}, "
          f"model card README.md; load with SentenceTransformer({str(out)!r}) or AutoModel (see docs/evaluation.md)")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as e:  # network, auth, repo name: one line, the export itself is done
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return fail(f"--push-to-hub {args.push_to_hub}: upload failed ({type(e).__name__}: {reason}); "
                        f"the exported model is in {out}")
        print(f"uploaded to {url}")
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
