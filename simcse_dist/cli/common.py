"""What every console script shares: the exit codes, one-line user errors, logging set-up."""

from __future__ import annotations

import argparse
import logging
import time

from simcse_dist import logs

log = logging.getLogger("simcse_dist.cli.common")  # not __name__: run as `python -m`, that is __main__

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILURE = 4  # fsutil.WriteFailure
EXIT_ABORTED = 130

EXIT_CODES = """Exit codes: 0 done, or stopped on request (rerun to resume); 2 bad input (config, data,
output dir in use, changed data, checkpoint layout); 3 non-finite loss (train.on_nonfinite=stop);
4 a write failed (disk full, read-only, I/O error: the previous checkpoint is intact); 130
aborted by a second Ctrl-C."""

PEER_REPORT_GRACE_S = 30.0
"""How long a rank other than 0 waits for rank 0 to report an error that every rank found."""


def fail(message: str, code: int = EXIT_BAD_INPUT, all_ranks: bool = False) -> int:
    """A user's mistake or a clean failure: one line `error: ...` on stderr, no traceback, on rank
    0 only (every rank reads the same config and data, so every rank would say the same), or on
    this rank with `all_ranks` (what only it knows). Returns the exit code."""
    log.error(message, extra=logs.ALL_RANKS if all_ranks else None)
    return code


def fail_before_group(message: str) -> int:
    """fail() for bad input found before the ranks form a process group: every rank reads the same
    config and inputs, so every rank finds it and rank 0 reports it. A launcher (torchrun) ends the
    other ranks as soon as one exits; a rank other than 0 that exited first could get rank 0 killed
    before it printed, so it waits for the launcher to end it instead. Still alive after
    PEER_REPORT_GRACE_S (rank 0 went on: the error is this rank's own), it reports it itself."""
    if logs.env_rank() == 0:
        return fail(message)
    time.sleep(PEER_REPORT_GRACE_S)
    return fail(message, all_ranks=True)


def start_logging(quiet: bool = False, level: str = "info") -> None:
    """The first thing a console script does: rank-0 output at `level` (--quiet: warnings only)."""
    logs.setup(level="warning" if quiet else level)


def checked_config(args: argparse.Namespace, world_size: int | None = None):
    """(DistEnv, Config) validated for the world size, the output dir and the model id, before any
    process group exists. Raises ConfigError / DistEnvError naming what is wrong."""
    from simcse_dist.config import load_config
    from simcse_dist.distributed import DistEnv
    from simcse_dist.train.preflight import preflight
    from simcse_dist.train.rundir import check_same_run

    env = DistEnv.from_env()
    cfg = load_config(args.config, args.overrides)
    if not args.quiet:
        start_logging(level=cfg.log.level)
    cfg.validate(world_size or env.world_size)
    check_same_run(cfg)
    preflight(cfg, env.is_main)
    return env, cfg
