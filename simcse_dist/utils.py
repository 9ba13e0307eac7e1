"""Small helpers every entry point shares: quiet model loading and the one-line user error."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def quiet_transformers():
    """Load models without transformers' per-load weight report and progress bars. SimCSE
    backbones are saved without BERT's pooler layer on purpose (SimCSE never uses it), which
    transformers would list as MISSING/UNEXPECTED on every load and on every rank."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def fail(msg: str, code: int = 2) -> int:
    """A user's mistake: one line on stderr, no traceback; returns the exit code."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def write_line(line: str) -> None:
    """Print a log line above a tqdm progress bar instead of through it."""
    from tqdm.auto import tqdm

    tqdm.write(line)
