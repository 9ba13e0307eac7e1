"""simcse-mine: hard negatives for (anchor, positive) pairs (eval/mine.py), sharded over ranks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from simcse_dist.cli.common import EXIT_WRITE_FAILURE, fail, fail_before_group, start_logging
from simcse_dist.config import POOLER_ALIASES, POOLERS
from simcse_dist.eval.mine import MineOptions

log = logging.getLogger("simcse_dist.cli.mine")  # not __name__: run as `python -m`, that is __main__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simcse-mine",
        description=(
            "Mine hard negatives for (anchor, positive) pairs and write sent0/sent1/hard_neg TSV for supervised "
            "SimCSE. Options mean what they mean in sentence_transformers.util.mine_hard_negatives."
        ),
    )
    p.add_argument(
        "--model", required=True, help="run dir (uses best/), model dir, ST dir, HF dir or bundled:all-MiniLM-L6-v2"
    )
    p.add_argument(
        "--pooler", choices=[*POOLERS, *POOLER_ALIASES], help="override the saved pooler (needed for a plain HF model)"
    )
    p.add_argument(
        "--input", required=True, help="pairs: csv/tsv/jsonl with sent0,sent1[,hard_neg] (hard_neg is replaced)"
    )
    p.add_argument("--output", required=True, help="output .tsv: sent0 sent1 hard_neg (K=1) or hard_neg_1..K")
    p.add_argument("--corpus", help="more candidate texts: txt (one per line) or every field of a csv/tsv/jsonl")
    p.add_argument("--num-negatives", type=int, default=1, help="K negatives per anchor (default 1)")
    p.add_argument("--range-min", type=int, default=0, help="skip this many of the best surviving candidates")
    p.add_argument(
        "--range-max",
        type=int,
        help="consider only this many nearest candidates "
        "(default: range_min + K + rows per anchor, or 10 x K with a margin or max_score)",
    )
    p.add_argument("--max-score", type=float, help="drop candidates scoring above this cosine")
    p.add_argument("--min-score", type=float, help="drop candidates scoring below this cosine")
    p.add_argument("--absolute-margin", type=float, help="drop candidates with score + margin > positive score")
    p.add_argument("--relative-margin", type=float, help="drop candidates with score > pos - |pos| x margin")
    p.add_argument("--sampling", choices=("top", "random"), default="top")
    p.add_argument("--seed", type=int, default=42, help="seed of --sampling random")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per forward per rank")
    p.add_argument("--max-length", type=int, help="truncation in tokens (default: the model's max_seq_length)")
    p.add_argument("--chunk-size", type=int, help="anchors scored at once (default: a 256 MiB score matrix)")
    p.add_argument("--faiss", action="store_true", help="search with faiss IndexFlatIP (exact; needs faiss installed)")
    p.add_argument(
        "--pack-tokens",
        type=int,
        default=None,
        metavar="N",
        help="pack each batch's sentences into rows of N tokens (no padding computed; the same negatives)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal only)")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check_options(args: argparse.Namespace) -> MineOptions:
    """MineOptions from the command line; a ValueError names the option."""
    if args.num_negatives < 1:
        raise ValueError(f"--num-negatives must be at least 1, got {args.num_negatives}")
    if args.range_min < 0:
        raise ValueError(f"--range-min must be non-negative, got {args.range_min}")
    if args.range_max is not None and args.range_max - args.range_min < args.num_negatives:
        raise ValueError(
            f"--range-max {args.range_max} leaves {args.range_max - args.range_min} candidates after "
            f"--range-min {args.range_min}, fewer than --num-negatives {args.num_negatives}"
        )
    if args.batch_size < 1 or (args.chunk_size is not None and args.chunk_size < 1):
        raise ValueError("--batch-size and --chunk-size must be at least 1")
    if args.pack_tokens is not None and args.pack_tokens < 2:
        raise ValueError(f"--pack-tokens must be at least 2, got {args.pack_tokens}")
    if Path(args.output).suffix.lower() != ".tsv":
        raise ValueError(f"--output {args.output}: must end in .tsv (the trainer picks the format from the extension)")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} is the --input file")
    if args.faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ValueError("--faiss: faiss is not installed (pip install faiss-cpu or faiss-gpu)") from None
    return MineOptions(
        args.num_negatives,
        args.range_min,
        args.range_max,
        args.max_score,
        args.min_score,
        args.absolute_margin,
        args.relative_margin,
        args.sampling,
        args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start_logging(args.quiet)
    from simcse_dist import distributed as du
    from simcse_dist.config import ConfigError
    from simcse_dist.data.readers import DataError
    from simcse_dist.eval.mine import MineJob, mine, read_inputs
    from simcse_dist.fsutil import WriteFailure
    from simcse_dist.model.format import ExportError

    env = du.DistEnv.from_env()
    try:
        opts = _check_options(args)
        job = MineJob(
            args.model,
            args.input,
            args.output,
            args.pooler,
            args.corpus,
            args.batch_size,
            args.max_length,
            args.chunk_size,
            args.faiss,
            not args.no_progress,
            args.pack_tokens,
        )
        pairs, pool, note = read_inputs(job, opts)
    except (ValueError, DataError) as e:  # DataError is a ValueError; both name the file or option
        return fail_before_group(str(e))
    if note:
        log.info(note)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = env.world_size > 1 and not du.is_initialized()
    if started:
        du.init_distributed(env, timeout_s=1800)
    agreed = False  # every rank reached the last collective: leaving together is safe
    try:
        mine(job, opts, pairs, pool, env)
        agreed = True
    except (ExportError, ConfigError, OSError) as e:  # the model: every rank fails the same way
        return fail(str(e))
    except WriteFailure as e:  # raised after the ranks agreed on the write's outcome
        agreed = True
        return fail(str(e), EXIT_WRITE_FAILURE)
    except du.PeerFailed:  # rank 0 reports why
        agreed = True
        return 0
    finally:
        if started:  # a group this process already had (e.g. a caller's) is the caller's to end
            du.teardown(together=agreed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
