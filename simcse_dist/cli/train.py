"""simcse-train: parse, validate, train, exit with a documented code (common.EXIT_CODES).

`simcse-train --nproc N ...` starts N ranks on this machine itself (cli/launch.py); without it,
this process is one rank of whatever launched it (torchrun, the deepspeed launcher, srun) or
the only one. Only the standard library is imported before the stop handlers are installed
(train/preempt.py): a Ctrl-C at any moment of the start-up is a clean stop, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from simcse_dist.cli.common import (
    EXIT_ABORTED,
    EXIT_CODES,
    EXIT_NONFINITE,
    EXIT_WRITE_FAILURE,
    checked_config,
    fail,
    fail_before_group,
    start_logging,
)
from simcse_dist.cli.status import STATUS_FILE_ENV
from simcse_dist.train.preempt import StartupInterrupted, StopRequest

log = logging.getLogger("simcse_dist.cli.train")  # not __name__: run as `python -m`, that is __main__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simcse-train",
        description="Train a SimCSE sentence encoder with DeepSpeed. "
        "Overrides are dotted keys: train.global_batch_size=128 engine.zero_stage=2",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (defaults are the paper's unsup settings)")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="start N ranks on this machine (GPUs, or CPU ranks on gloo) and own their signals: a clean stop exits 0",
    )
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only (log.level=warning)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config for the world size (--nproc N, else the launcher's) and print the DeepSpeed "
        "config it makes; reads no model, data or network (offline)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    stop = StopRequest().install()  # before anything heavy is imported
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    start_logging(args.quiet)
    try:
        if args.dry_run:
            return _dry_run(args)
        if args.nproc is not None:
            from simcse_dist.cli.launch import launch

            return launch(args, _without_nproc(argv), stop)
        # torchrun's error recording: an unexpected error's traceback is what the launcher reports
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_rank_main)(args, stop)
    except StartupInterrupted as e:
        return _stopped_at_start(str(e))
    except KeyboardInterrupt:
        return fail("aborted (second Ctrl-C)", EXIT_ABORTED)
    finally:
        stop.close()


def _dry_run(args: argparse.Namespace) -> int:
    from simcse_dist.config import ConfigError, load_config
    from simcse_dist.distributed import DistEnv, DistEnvError
    from simcse_dist.engine import deepspeed_config

    try:
        world = args.nproc or DistEnv.from_env().world_size
        cfg = load_config(args.config, args.overrides)
        cfg.validate(world)
    except (ConfigError, DistEnvError) as e:
        return fail(str(e))
    log.info(
        f"config valid for world size {world}: model {cfg.model.name_or_path} ({cfg.model.pooler} pooling"
        + (f", LoRA r={cfg.model.lora.r}" if cfg.model.lora.enabled else "")
        + f"), {cfg.micro_batch_size(world)} rows per rank and micro-step; DeepSpeed config:\n"
        + json.dumps(deepspeed_config(cfg, world), indent=2)
    )
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The arguments each rank gets: this command's, without --nproc N / --nproc=N."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _rank_main(args: argparse.Namespace, stop: StopRequest) -> int:
    from simcse_dist.config import ConfigError
    from simcse_dist.distributed import DistEnvError

    try:
        env, cfg = checked_config(args)
    except (ConfigError, DistEnvError) as e:
        return fail_before_group(str(e))
    return run_training(cfg, env, stop=stop)


def _stopped_at_start(reason: str) -> int:
    log.info(f"stopped during start-up ({reason}): nothing was trained or lost; rerun the same command to start")
    _write_status("stopped", None)
    return 0


def _write_status(status: str, step: int | None) -> None:
    """What cli/status.py reads for launch/*.sh and slurm/train.sh, to tell a clean stop from a
    failure when the launcher itself exits non-zero (torchrun does on SIGTERM/SIGINT). Rank 0 only."""
    from simcse_dist.fsutil import write_text_atomic
    from simcse_dist.logs import env_rank

    path = os.environ.get(STATUS_FILE_ENV)
    if path and env_rank() == 0:
        write_text_atomic(Path(path), json.dumps({"status": status, "step": step}) + "\n")


def run_training(cfg, env, trainer_cls=None, stop: StopRequest | None = None) -> int:
    """Start the process group, train, tear down; see EXIT_CODES. A stop request before training
    began, or a peer that left because of one, ends the rank with 0: nothing was lost."""
    from simcse_dist import distributed as du
    from simcse_dist.config import ConfigError
    from simcse_dist.data.readers import DataError
    from simcse_dist.fsutil import WriteFailure
    from simcse_dist.train.checkpoint import CheckpointLayoutError
    from simcse_dist.train.preempt import watch_launcher
    from simcse_dist.train.rundir import DataChanged, RunLocked
    from simcse_dist.train.state import NonFiniteLossError
    from simcse_dist.train.trainer import Trainer

    stop = stop or StopRequest().install()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.source != "single":
        watch_launcher()
    trainer, finished = None, False
    try:
        du.init_distributed(env, cfg.engine.dist_timeout_s)
        trainer = (trainer_cls or Trainer)(cfg, env, stop)
        result = trainer.train()
        _write_status("stopped" if result.stopped else "done", result.steps)
        finished = True
        return 0
    except StartupInterrupted as e:
        return _stopped_at_start(str(e))
    except (ConfigError, DataError, CheckpointLayoutError, RunLocked, DataChanged) as e:
        return fail(str(e))
    except NonFiniteLossError as e:
        return fail(str(e), EXIT_NONFINITE)
    except WriteFailure as e:  # raised by the rank whose write failed
        return fail(str(e), EXIT_WRITE_FAILURE, all_ranks=True)
    except KeyboardInterrupt:
        return fail("aborted (second Ctrl-C): no checkpoint written since the last one", EXIT_ABORTED)
    except Exception as e:
        if stop.phase == "starting" and stop.requested():  # a peer left on the same stop request
            return _stopped_at_start(stop.reason())
        if isinstance(e, du.PeerFailed):  # the rank that failed reports why; exiting 0 keeps it the root cause
            log.info(f"{e} (see its error)")
            return 0
        raise
    finally:
        if trainer is not None:
            trainer.close()
        du.teardown(together=finished)


if __name__ == "__main__":
    sys.exit(main())
