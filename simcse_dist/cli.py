"""Entry points: simcse-train, simcse-eval, simcse-export."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .distributed import DistEnv, DistEnvError
from .fsutil import EXIT_WRITE_FAILURE, WriteFailure, write_text_atomic
from .preflight import preflight
from .readers import DataError
from .rundir import check_output_dir
from .utils import fail

STATUS_FILE_ENV = "SIMCSE_STATUS_FILE"


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
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
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
        preflight(cfg, env.is_main, lambda m: print(m, file=sys.stderr, flush=True))
    except (ConfigError, DistEnvError) as e:
        return fail(str(e))

    return run_training(cfg, env)


EXIT_CODES = """Exit codes: 0 done, or stopped on request with a checkpoint (rerun to resume); 2 bad input
(config, data, output dir in use, changed data, checkpoint layout); 3 non-finite loss
(train.on_nonfinite=stop); 4 a write failed (disk full, read-only, I/O error: the previous
checkpoint is intact); 130 aborted by a second Ctrl-C."""


def _write_status(status: str, step: int) -> None:
    """What launch/*.sh and slurm/train.sh read to tell a clean stop from a failure when the
    launcher itself exits non-zero (torchrun does on SIGTERM/SIGINT)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        write_text_atomic(Path(path), json.dumps({"status": status, "step": step}) + "\n")


def run_training(cfg, env: DistEnv, trainer_cls=None) -> int:
    """Start the process group, train, tear down; see EXIT_CODES."""
    from . import distributed as du
    from .checkpoint import CheckpointLayoutError
    from .preempt import watch_launcher
    from .rundir import DataChanged, RunLocked
    from .state import NonFiniteLossError
    from .trainer import Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.source != "single":
        watch_launcher()
    du.init_distributed(env, cfg.engine.dist_timeout_s)
    trainer, finished = None, False
    try:
        trainer = (trainer_cls or Trainer)(cfg, env)
        result = trainer.train()
        if env.is_main:
            _write_status("stopped" if result.stopped else "done", result.steps)
        finished = True
    except (ConfigError, DataError, CheckpointLayoutError, RunLocked, DataChanged) as e:
        return fail(str(e))
    except NonFiniteLossError as e:
        return fail(str(e), 3)
    except WriteFailure as e:
        return fail(str(e), EXIT_WRITE_FAILURE)
    except du.PeerFailed as e:  # the rank that failed reports why; exiting 0 keeps it the root cause
        print(f"{e} (see its error)", file=sys.stderr, flush=True)
        return 0
    except KeyboardInterrupt:
        return fail("aborted (second Ctrl-C): no checkpoint written since the last one", 130)
    finally:
        if trainer is not None:
            trainer.close()
        du.teardown(together=finished)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    from .standalone import eval_cli

    return eval_cli(argv)


def export_main(argv: list[str] | None = None) -> int:
    from .standalone import export_cli

    return export_cli(argv)


if __name__ == "__main__":
    sys.exit(train_main())
