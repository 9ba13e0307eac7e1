"""What the project prints: the `simcse_dist.*` logger tree, rank 0 only, above progress bars.

Every module logs through `logging.getLogger(__name__)`. A console script calls `setup(rank,
level)` once; it gives the tree one handler that
- prints INFO as the message alone, WARNING as `warning: ...` (both on stdout) and ERROR as
  `error: ...` on stderr;
- drops the records of ranks other than 0, unless logged with `extra=ALL_RANKS`: what only that
  rank knows (its launcher died, its write failed);
- writes through `tqdm.write`, so that a progress bar on the terminal stays below the lines.
Used as a library (no `setup`), the records reach the root logger as usual.

`progress(...)` is the one rule for progress bars: a tqdm bar on rank 0 when stderr is a
terminal and INFO is shown; None otherwise (redirected logs get no `\\r` frames).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "simcse_dist"
_rank: int | None = None  # set by setup(); else read from the environment
ALL_RANKS = {"all_ranks": True}
"""`log.error(msg, extra=ALL_RANKS)`: printed by whichever rank logs it."""


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or getattr(record, "all_ranks", False)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno <= logging.DEBUG:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _Handler(logging.Handler):
    """stdout for INFO and WARNING, stderr for ERROR, both through tqdm.write."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when unset or unreadable): known
    before anything is parsed, so that an error in the config is printed once, not per rank."""
    for key in ("RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[key])
        except (KeyError, ValueError):
            continue
    return 0


def setup(rank: int | None = None, level: str = "info") -> logging.Logger:
    """Give the `simcse_dist` tree its handler (replacing an earlier one) at `level`."""
    global _rank
    _rank = env_rank() if rank is None else rank
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    handler = _Handler()
    handler.setFormatter(_Formatter())
    handler.addFilter(_RankFilter(_rank))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def set_level(level: str) -> None:
    logging.getLogger(ROOT).setLevel(level.upper())


def bars_shown() -> bool:
    """Whether this process shows progress bars: rank 0, stderr a terminal, INFO shown."""
    rank = env_rank() if _rank is None else _rank
    return rank == 0 and sys.stderr.isatty() and logging.getLogger(ROOT).isEnabledFor(logging.INFO)


def progress(enabled: bool = True, **kwargs):
    """A tqdm bar (kwargs as tqdm's) where `bars_shown()`, else None."""
    if not (enabled and bars_shown()):
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)
