"""Entry points: simcse-train, simcse-eval, simcse-export."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config
from .distributed import DistEnv, DistEnvError
from .readers import DataError
from .rundir import check_output_dir
from .utils import fail


def _record(fn):
    """torchrun's error recording: the failing rank's traceback is what the launcher reports."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
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
        check_output_dir(cfg)
    except (ConfigError, DistEnvError) as e:
        return fail(str(e))

    return run_training(cfg, env)


def run_training(cfg, env: DistEnv, trainer_cls=None) -> int:
    """Start the process group, train, tear down. Exit codes: 0 done or stopped with a
    checkpoint, 2 bad input, 3 non-finite loss (train.on_nonfinite=stop)."""
    from . import distributed as du
    from .checkpoint import CheckpointLayoutError
    from .trainer import NonFiniteLossError, Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    du.init_distributed(env, cfg.engine.dist_timeout_s)
    try:
        (trainer_cls or Trainer)(cfg, env).train()
    except (DataError, CheckpointLayoutError) as e:
        return fail(str(e))
    except NonFiniteLossError as e:
        fail(str(e))
        return 3
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
