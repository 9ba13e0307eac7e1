"""Entry points: simcse-train, simcse-eval, simcse-export."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config
from .distributed import DistEnv, DistEnvError
from .readers import DataError


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="simcse-train",
        description="Train a SimCSE sentence encoder with DeepSpeed. "
        "Overrides are dotted keys: train.global_batch_size=128 engine.zero_stage=2",
    )
    parser.add_argument("--config", help="YAML config (defaults are the paper's unsup settings)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        env = DistEnv.from_env()
        cfg = load_config(args.config, args.overrides)
        cfg.validate(env.world_size)  # before any process group exists
    except (ConfigError, DistEnvError) as e:
        return _fail(str(e))

    from . import distributed as du
    from .trainer import Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    du.init_distributed(env, cfg.engine.dist_timeout_s)
    try:
        Trainer(cfg, env).train()
    except DataError as e:
        return _fail(str(e))
    finally:
        du.teardown()
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    from .standalone import eval_cli

    return eval_cli(argv)


def export_main(argv: list[str] | None = None) -> int:
    from .standalone import export_cli

    return export_cli(argv)


if __name__ == "__main__":
    sys.exit(train_main())
