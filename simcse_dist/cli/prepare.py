"""simcse-prepare: prepare every training source of a config (what training would build)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from simcse_dist.cli.common import EXIT_ABORTED, fail, start_logging

log = logging.getLogger("simcse_dist.cli.prepare")  # not __name__: run as `python -m`, that is __main__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simcse-prepare", description=__doc__.split(": ", 1)[1])
    p.add_argument("--config", help="the training config (YAML); without it, the overrides alone")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: data.prepare_workers, else CPUs)")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("overrides", nargs="*", help="dotted section.key=value overrides, as for simcse-train")
    args = p.parse_args(argv)
    start_logging(args.quiet)
    from simcse_dist.config import ConfigError, load_config, resolve_model_path
    from simcse_dist.data.prepare import open_or_prepare
    from simcse_dist.data.readers import DataError, resolve_path

    try:
        cfg = load_config(args.config, args.overrides)
        if not (sources := cfg.sources()):
            raise ConfigError("data.train_file: is required (or data.sources)")
        from simcse_dist.model.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.pooler)
        except OSError as e:
            raise ConfigError(f"model.name_or_path: no tokenizer loads from {cfg.model.name_or_path!r}: {e}") from None
        workers = args.workers or cfg.data.prepare_workers or os.cpu_count() or 1
        for s in sources:
            t0 = time.perf_counter()
            corpus = open_or_prepare(
                resolve_path(s.path),
                s.format,
                s.objective,
                tokenizer,
                cfg.data.max_seq_len,
                cache_dir=cfg.data.cache_dir,
                workers=workers,
                progress=True,
                prompts=s.prompts,
            )
            m, sec = corpus.manifest, time.perf_counter() - t0
            how = (
                f"prepared in {sec:.1f} s ({m['rows'] / max(sec, 1e-9):,.0f} rows/s)"
                if corpus.built
                else f"already prepared ({m['build_seconds']:.1f} s when built)"
            )
            log.info(
                f"{s.name}: {corpus.directory}: {m['rows']:,} rows, {len(m['shards'])} shard(s), "
                f"{m['total_tokens']:,} tokens; {how}"
            )
    except (ConfigError, DataError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; run the same command again to resume (complete shards are kept)", EXIT_ABORTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
