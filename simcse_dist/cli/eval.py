"""simcse-eval: the paper's STS table, retrieval metrics and MTEB tasks of a model.

Under a launcher (`torchrun --nproc_per_node N -m simcse_dist.cli.eval ...`) every rank loads
the model, encodes an equal share of the sentences and the shares are gathered
(eval/encode.py); rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from simcse_dist import logs
from simcse_dist.cli.common import fail, fail_before_group, start_logging
from simcse_dist.config import POOLER_ALIASES, POOLERS
from simcse_dist.data.readers import DataError
from simcse_dist.eval.sts import PAPER_TASKS, TASKS, StsData, TaskNotFound, check_task, load_task, read_pair_file
from simcse_dist.model.encoder import quiet_transformers

log = logging.getLogger("simcse_dist.cli.eval")  # not __name__: run as `python -m`, that is __main__

PRECISIONS = ("fp32", "bf16", "fp16")


def format_table(titles: list[str], rows: list[list[float]], labels: list[str] | None = None, corner: str = "") -> str:
    """The paper's table: one header row, then rows of Spearman x 100 (or metrics x 100) with two
    decimals; `labels` name the rows in a first column headed `corner` (e.g. the dims)."""
    table = [[f"{v:.2f}" for v in row] for row in rows]
    if labels is not None:
        titles, table = [corner, *titles], [[label, *row] for label, row in zip(labels, table, strict=True)]
    widths = [max(len(t), *(len(r[i]) for r in table)) for i, t in enumerate(titles)]
    lines = [" | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [titles, *table]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def parse_precisions(text: str) -> tuple[str, list[str]]:
    """'bf16,int8,binary' -> ('bf16', ['float32', 'int8', 'binary']): the weights' dtype (one of
    PRECISIONS, fp32 unless named) and the embedding formats retrieval is scored in."""
    from simcse_dist.eval.retrieval import QUANTIZED

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in (*PRECISIONS, *QUANTIZED)]
    if unknown or not names:
        raise ValueError(
            f"unknown precision {', '.join(unknown) or repr(text)}; use {', '.join((*PRECISIONS, *QUANTIZED))}"
        )
    dtypes = [n for n in names if n in PRECISIONS]
    if len(dtypes) > 1:
        raise ValueError(f"one weight dtype at a time, got {', '.join(dtypes)}")
    return (dtypes[0] if dtypes else "fp32"), ["float32", *dict.fromkeys(n for n in names if n in QUANTIZED)]


def parse_dims(text: str) -> list[int]:
    try:
        dims = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise ValueError(f"expected comma-separated integers >= 1, got {text!r}")
    return list(dict.fromkeys(dims))


def select_tasks(names: str, split: str, data_dir: str) -> dict[str, StsData]:
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
            log.warning(f"skipping {e}")
    if not out:
        raise DataError(f"none of the tasks {', '.join(tasks)} ({split}) was found under {data_dir}")
    return out


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simcse-eval",
        description="Score a sentence encoder on STS (cosine, Spearman x 100; STS12-16 pooled over subsets, "
        "the 'all' setting of the paper), on a retrieval set (--retrieval) and on MTEB tasks (--mteb).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="run dir (uses best/), model dir, sentence-transformers dir, HF dir or bundled:all-MiniLM-L6-v2",
    )
    p.add_argument(
        "--tasks",
        default="all",
        help=f"comma-separated from {', '.join(TASKS)}; 'all' = the paper's tasks of the split, "
        "skipping absent ones (default)",
    )
    p.add_argument("--split", default="test", choices=("test", "dev", "train"))
    p.add_argument(
        "--sts-file",
        action="append",
        metavar="FILE",
        help="an STS pairs file scored as a task of its own (sentence1 sentence2 score TSV, STS-B CSV, "
        "id||s1||s2||score; repeatable), e.g. data/demo/sts-demo.tsv",
    )
    p.add_argument("--data-dir", help="STS data (the tasks of --tasks), e.g. ../shared/data or ../shared/data/senteval")
    p.add_argument(
        "--retrieval",
        nargs=3,
        metavar=("QUERIES", "CORPUS", "QRELS"),
        help="TSVs with headers 'qid text', 'docid text', 'qid docid relevance': nDCG@10, MRR@10, "
        "Recall@100, MAP@10 x 100 by cosine, exact ranking",
    )
    p.add_argument(
        "--corpus-chunk-size",
        type=int,
        default=50_000,
        help="retrieval: documents encoded and ranked at a time (bounds memory)",
    )
    p.add_argument(
        "--mteb",
        metavar="TASK[,TASK]",
        help="MTEB tasks (needs pip install 'simcse-dist[mteb]'): registered names whose data is in the "
        "local Hugging Face cache, or module:Class / file.py:Class for a task that reads local files",
    )
    p.add_argument(
        "--pooler", choices=[*POOLERS, *POOLER_ALIASES], help="override the saved pooler (needed for a plain HF model)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="comma-separated: the weights' dtype (fp32, bf16 or fp16) and, for retrieval, embedding formats "
        "scored beside float32 through sentence-transformers' quantize_embeddings (int8, uint8: inner product "
        "of the codes, ranges from the first corpus chunk; binary, ubinary: Hamming), e.g. fp32,int8,binary",
    )
    p.add_argument(
        "--dims",
        help="comma-separated embedding sizes, e.g. 768,256,64: every STS and retrieval metric on the first d "
        "coordinates (renormalised), as sentence-transformers' truncate_dim (Matryoshka models)",
    )
    p.add_argument(
        "--prompt",
        metavar="NAME",
        help="a prompt the model saved (config_sentence_transformers.json), prepended to every STS sentence and "
        "retrieval query; default: its default_prompt_name, as sentence-transformers; '' for none",
    )
    p.add_argument(
        "--corpus-prompt",
        metavar="NAME",
        help="retrieval: the saved prompt prepended to the documents; default: the one of --prompt",
    )
    p.add_argument("--batch-size", type=int, default=128, help="sentences per forward per rank")
    p.add_argument("--max-length", type=int, default=512, help="truncation in tokens (capped by the model)")
    p.add_argument(
        "--pack-tokens",
        type=int,
        default=None,
        help="STS tasks: pack each batch's sentences into rows of N tokens (no padding computed; same scores)",
    )
    p.add_argument(
        "--output-json",
        help="write {task: spearman x 100, ..., 'avg': ..., 'retrieval/ndcg@10': ..., "
        "'mteb/<task>': main score x 100} here",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal only)")
    p.add_argument("--quiet", action="store_true", help="only the results, warnings and errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    start_logging(args.quiet)
    if args.data_dir is None and not (args.sts_file or args.retrieval or args.mteb):
        parser.error("give --data-dir (the STS tasks), --sts-file, --retrieval or --mteb")
    if args.corpus_chunk_size < 1:
        parser.error(f"--corpus-chunk-size must be at least 1, got {args.corpus_chunk_size}")
    try:
        dtype_name, formats = parse_precisions(args.precision)
    except ValueError as e:
        parser.error(f"--precision: {e}")
    if len(formats) > 1 and not args.retrieval:
        parser.error(f"--precision {','.join(formats[1:])}: quantized embeddings are scored on retrieval (--retrieval)")
    if args.pack_tokens is not None and args.pack_tokens < 2:
        parser.error(f"--pack-tokens: must be >= 2, got {args.pack_tokens}")
    try:
        dims = parse_dims(args.dims) if args.dims else []
    except ValueError as e:
        parser.error(f"--dims: {e}")
    import torch

    from simcse_dist import distributed as du
    from simcse_dist.eval.encode import pair_embeddings
    from simcse_dist.eval.metrics import sts_correlation
    from simcse_dist.eval.mteb_adapter import MtebEncoder, MtebError, resolve_tasks, run_mteb
    from simcse_dist.eval.retrieval import METRICS, TITLES, View, evaluate_retrieval, load_retrieval
    from simcse_dist.model.format import ExportError
    from simcse_dist.model.load import load_encoder
    from simcse_dist.model.packing import unsupported

    env = du.DistEnv.from_env()
    # every input is read and checked before the process group and the model exist
    try:
        data = select_tasks(args.tasks, args.split, args.data_dir) if args.data_dir else {}
        data.update({Path(f).name: read_pair_file(f) for f in args.sts_file or []})
        retrieval = load_retrieval(*args.retrieval) if args.retrieval else None
        mteb_tasks = resolve_tasks(args.mteb) if args.mteb else []
    except (DataError, MtebError) as e:
        return fail_before_group(str(e))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = env.world_size > 1 and not du.is_initialized()
    finished = False  # every rank got through: leaving together is safe
    if started:
        du.init_distributed(env, timeout_s=1800)
    problems: list[str] = []
    try:
        try:
            with quiet_transformers():
                encoder, tokenizer, meta = load_encoder(args.model, args.pooler)
        except (ExportError, OSError) as e:
            return fail(str(e))
        device = du.device_for(env)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        encoder.to(device=device, dtype=dtype)
        max_length = min(args.max_length, getattr(encoder.backbone.config, "max_position_embeddings", 512))
        progress = not args.no_progress and logs.bars_shown()
        log.info(
            f"model {meta['path']}: pooler {meta['pooler']}{' + MLP' if encoder.uses_mlp else ''}, "
            f"{dtype_name}, {env.world_size} rank(s), device {device}"
        )
        saved = meta.get("prompts", {})
        prompts = []
        for flag, name in (("--prompt", args.prompt), ("--corpus-prompt", args.corpus_prompt)):
            name = (prompts[0][0] if prompts else meta.get("default_prompt_name")) if name is None else name
            if name and name not in saved:
                return fail(f"{flag}: {meta['path']} has no prompt {name!r} (it has: {', '.join(saved) or 'none'})")
            prompts.append((name, saved.get(name, "") if name else ""))
        (query_name, query_prompt), (corpus_name, corpus_prompt) = prompts
        if query_prompt or corpus_prompt:
            log.info(
                f"prompts: {query_name or 'none'} {query_prompt!r}, corpus {corpus_name or 'none'} {corpus_prompt!r}"
            )
        pack_tokens = args.pack_tokens
        if pack_tokens and (reason := unsupported(encoder.backbone, encoder.pooler)):
            log.info(f"--pack-tokens: {reason}; encoding padded")
            pack_tokens = None
        if pack_tokens and (query_prompt or corpus_prompt) and not encoder.include_prompt:
            log.info(
                "--pack-tokens: the model leaves prompt tokens out of pooling, which packing does not; encoding padded"
            )
            pack_tokens = None
        size = encoder.embedding_dim
        too_large = [d for d in dims if d > size]
        if too_large:
            return fail(f"--dims: {too_large[0]} is larger than the model's {size}-dim embeddings")
        sizes = dims or [size]
        prefixes = {d: "" if d == size else f"dim{d}/" for d in sizes}
        scores, tables = {}, []
        sts: dict[int, dict[str, float]] = {d: {} for d in sizes}
        for task, pairs in data.items():
            skipped = f", {pairs.skipped} blank-score rows skipped" if pairs.skipped else ""
            log.info(f"{task}: {len(pairs.scores)} pairs from {pairs.source}{skipped}")
            e1, e2 = pair_embeddings(
                encoder,
                tokenizer,
                pairs.sentences1,
                pairs.sentences2,
                device,
                args.batch_size,
                max_length=max_length,
                show_progress=progress,
                pack_tokens=pack_tokens,
                prompt=query_prompt,
            )
            for d in sizes:  # cosine renormalises the first d coordinates
                sts[d][task] = 100 * sts_correlation(e1[:, :d], e2[:, :d], pairs.scores)
        if data:
            for d in sizes:
                sts[d]["avg"] = sum(sts[d].values()) / len(data)
                scores.update({prefixes[d] + name: value for name, value in sts[d].items()})
            titles = [TASKS[t].title if t in TASKS else t for t in data] + ["Avg."]
            rows = [list(sts[d].values()) for d in sizes]
            tables.append(format_table(titles, rows, *(([str(d) for d in sizes], "dims") if dims else ())))
            missing = (
                [t for t in PAPER_TASKS[args.split] if t not in data]
                if args.data_dir and args.tasks.strip().lower() == "all"
                else []
            )
            if missing:
                tables.append(f"note: Avg. is over {len(data)} tasks; skipped (no data): {', '.join(missing)}")
        if retrieval is not None:
            judged = len(retrieval.judged_queries)
            log.info(
                f"retrieval: {judged} queries with a relevant document (of {len(retrieval.queries)}), "
                f"{len(retrieval.corpus)} documents, from {retrieval.source}"
            )
            views = [View(None if d == size else d, f) for d in sizes for f in formats]
            try:
                results = evaluate_retrieval(
                    encoder,
                    tokenizer,
                    retrieval,
                    device,
                    args.batch_size,
                    max_length,
                    args.corpus_chunk_size,
                    show_progress=progress,
                    views=views,
                    query_prompt=query_prompt,
                    corpus_prompt=corpus_prompt,
                )
            except RuntimeError as e:  # an optional library missing: named by the message
                return fail(str(e))
            for view, metrics in results.items():
                key = "retrieval/" + (view.prefix + "/" if view.prefix else "")
                scores.update({key + m: 100 * metrics[m] for m in METRICS})
            rows = [[100 * m[name] for name in METRICS] for m in results.values()]
            labels = [f"{v.dim or size} {v.precision}" for v in results]
            tables.append(format_table(list(TITLES), rows, *((labels, "dims format") if len(views) > 1 else ())))
        if mteb_tasks:
            adapter = MtebEncoder(
                encoder,
                tokenizer,
                device,
                name=Path(meta["path"]).name,
                batch_size=args.batch_size,
                max_length=max_length,
                show_progress=progress,
            )
            results, problems = run_mteb(adapter, mteb_tasks, show_progress=progress)
            scores.update({f"mteb/{name}": 100 * value for name, (_, value) in results.items()})
            if results:
                tables.append(
                    format_table(
                        [f"{name} ({main})" for name, (main, _) in results.items()],
                        [[100 * value for _, value in results.values()]],
                    )
                )
        if env.is_main:
            if tables:  # the results: printed even with --quiet
                print("\n".join(tables), flush=True)
            if args.output_json and scores:
                Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output_json).write_text(json.dumps(scores, indent=2) + "\n")
        finished = True
    finally:
        if started:  # a group this process already had (e.g. a caller's) is the caller's to end
            du.teardown(together=finished)
    for problem in problems:  # after the results of the tasks that could run
        fail(problem)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
