"""simcse-prepare: prepare every training source of a config (what training would build).

Alone it is one rank; under torchrun or srun every rank of the job takes a share of the work
(data/prepare.py), as training does, across every node of the job.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from simcse_dist.cli.common import EXIT_ABORTED, fail, start_logging

log = logging.getLogger("simcse_dist.cli.prepare")  # not __name__: run as `python -m`, that is __main__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simcse-prepare", description=__doc__.split(": ", 1)[1].split("\n")[0].rstrip("."))
    p.add_argument("--config", help="the training config (YAML); without it, the overrides alone")
    p.add_argument(
        "--workers", type=int, help="tokenizing processes per rank (default: data.prepare_workers, else the cores)"
    )
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("overrides", nargs="*", help="dotted section.key=value overrides, as for simcse-train")
    args = p.parse_args(argv)
    start_logging(args.quiet)
    from simcse_dist import distributed as du
    from simcse_dist.config import ConfigError, load_config, resolve_model_path
    from simcse_dist.data.inputs import describe
    from simcse_dist.data.prepare import default_workers, open_or_prepare
    from simcse_dist.data.readers import DataError

    started, finished = False, False
    try:
        env = du.DistEnv.from_env()
        cfg = load_config(args.config, args.overrides)
        if not (sources := cfg.sources()):
            raise ConfigError("data.train_file: is required (or data.sources)")
        from simcse_dist.model.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.pooler)
        except OSError as e:
            raise ConfigError(f"model.name_or_path: no tokenizer loads from {cfg.model.name_or_path!r}: {e}") from None
        workers = args.workers or cfg.data.prepare_workers or default_workers()
        if env.world_size > 1:
            du.init_distributed(env, cfg.engine.dist_timeout_s)
            started = True
        for s in sources:
            t0 = time.perf_counter()
            corpus = open_or_prepare(
                s.path,
                s.format,
                s.objective,
                tokenizer,
                cfg.data.max_seq_len,
                cache_dir=cfg.data.cache_dir,
                workers=workers,
                progress=True,
                every_s=min(2.0, cfg.engine.dist_timeout_s / 4),
                prompts=s.prompts,
            )
            m, sec = corpus.manifest, time.perf_counter() - t0
            how = (
                f"prepared in {sec:.1f} s ({m['rows'] / max(sec, 1e-9):,.0f} rows/s, {env.world_size} rank(s))"
                if corpus.built
                else f"already prepared ({corpus.build_seconds or 0:.1f} s when built)"
            )
            log.info(
                f"{s.name}: {corpus.directory}: {m['rows']:,} rows, {len(m['shards'])} shard(s), "
                f"{m['total_tokens']:,} tokens from {describe(s.path)}; {how}"
            )
        finished = True
    except (ConfigError, DataError, du.DistEnvError) as e:
        return fail(str(e))
    except du.PeerFailed as e:  # the rank that failed reports why; exiting 0 keeps it the root cause
        log.info(f"{e} (see its error)")
        return 0
    except KeyboardInterrupt:
        return fail("interrupted; run the same command again to resume (complete units are kept)", EXIT_ABORTED)
    finally:
        if started:
            du.teardown(together=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
