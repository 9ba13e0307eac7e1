"""What the torchrun workers of the tests share: the process group's life, and a config or a
Trainer built from overrides the way simcse-train builds them (load_config, then validate)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers, reference

from simcse_dist import distributed as du  # noqa: E402
from simcse_dist import logs  # noqa: E402
from simcse_dist.config import Config, load_config  # noqa: E402

logs.setup()  # rank 0 prints what simcse-train would print


@contextlib.contextmanager
def process_group(timeout_s: int = 120):
    """The launcher's environment as a started process group; the ranks leave it together after
    a body that ended well (distributed.teardown), at once after a failure."""
    env = du.DistEnv.from_env()
    du.init_distributed(env, timeout_s)
    ok = False
    try:
        yield env
        ok = True
    finally:
        du.teardown(together=ok)


def say(line: str) -> None:
    """One line from one rank in a single write: ranks share the launcher's stdout, and under
    PYTHONUNBUFFERED print() writes the text and its newline apart, so two ranks' lines can mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def config(env: du.DistEnv, overrides: list[str], path: str | None = None) -> Config:
    cfg = load_config(path, overrides)
    cfg.validate(env.world_size)
    return cfg


def trainer(env: du.DistEnv, overrides: list[str], path: str | None = None, cls=None):
    from simcse_dist.train.trainer import Trainer

    return (cls or Trainer)(config(env, overrides, path), env)
