"""`simcse-train --nproc N`: N ranks on this machine through torch's elastic launcher, run in
this process, which owns the signals.

torchrun forwards a Ctrl-C to its ranks too, but then raises its own SignalException (a
traceback, exit 1) after the ranks stopped cleanly. Here the launcher's agent runs in a
thread: torch installs its signal handlers only from the main thread (elastic PContext.start),
so the main thread keeps ours and forwards each signal to the ranks (which torch starts in
sessions of their own, out of reach of the terminal's Ctrl-C). The ranks stop as they would
under any launcher; this process exits with their code: 0 after a clean stop, the failing
rank's code otherwise (that rank printed why), 130 after a second Ctrl-C; a third one kills
ranks that did not react to the second (stuck in a collective).
tests/cli/test_launch.py holds this to the README's command.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import uuid

from simcse_dist.cli.common import checked_config, fail
from simcse_dist.train.preempt import HANDLED, StopRequest

log = logging.getLogger("simcse_dist.cli.launch")  # not __name__: run as `python -m`, that is __main__


def launch(args: argparse.Namespace, rank_argv: list[str], stop: StopRequest) -> int:
    """Validate the config for `args.nproc` ranks (one error, before anything starts), then run
    `python -m simcse_dist.cli *rank_argv` on each rank and wait for them."""
    from simcse_dist.config import ConfigError
    from simcse_dist.distributed import DistEnvError

    if args.nproc < 1:
        return fail(f"--nproc: expected a number of ranks >= 1, got {args.nproc}")
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return fail("--nproc starts its own ranks: do not combine it with torchrun, deepspeed or srun")
    try:
        checked_config(args, world_size=args.nproc)
    except (ConfigError, DistEnvError) as e:
        return fail(str(e))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what happened
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does for several ranks on one machine
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")  # time to checkpoint after a signal
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    outcome: dict = {}

    def agent() -> None:
        try:
            elastic_launch(config, sys.executable)("-m", "simcse_dist.cli", *rank_argv)
            outcome["code"] = 0
        except ChildFailedError as e:
            _, failure = e.get_first_failure()
            outcome["code"] = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        except BaseException as e:  # noqa: BLE001 - reported below, from the main thread
            outcome["error"] = e

    forward = _Forwarder(stop)
    thread = threading.Thread(target=agent, name="elastic-agent", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        forward.flush()
    if "error" in outcome:
        return fail(f"the launcher failed: {type(outcome['error']).__name__}: {outcome['error']}")
    return outcome["code"]


class _Forwarder:
    """This process's handlers while ranks run: every signal is passed on, in order, to each rank
    (this process's children) once that rank listens: a rank that has not yet installed its
    handlers would turn a Ctrl-C into a KeyboardInterrupt traceback. A rank listens once it
    catches SIGUSR1 (Linux: SigCgt in /proc/<pid>/status), which only simcse-train's handlers do."""

    def __init__(self, stop: StopRequest) -> None:
        import psutil  # a dependency of deepspeed

        self.psutil, self.signals, self.sent = psutil, [], {}
        stop.close()
        for sig in HANDLED:
            signal.signal(sig, self._handle)
        if stop.signal_name is not None:  # a signal that came while this process was starting
            self.signals.append(signal.Signals[stop.signal_name])

    def _handle(self, signum, frame) -> None:
        self.signals.append(signal.Signals(signum))
        if self.signals.count(signal.SIGINT) >= 3:  # ranks that ignore two Ctrl-C (stuck in a collective)
            for rank in self.psutil.Process().children():
                rank.kill()
            return
        self.flush()

    def flush(self) -> None:
        if not self.signals:
            return
        for rank in self.psutil.Process().children():
            done = self.sent.get(rank.pid, 0)
            if done < len(self.signals) and _listens(rank.pid):
                for sig in self.signals[done:]:
                    try:
                        rank.send_signal(sig)
                    except self.psutil.Error:
                        break
                self.sent[rank.pid] = len(self.signals)


def _listens(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except OSError:
        return not os.path.isdir("/proc")  # no procfs: forward at once
    except StopIteration:
        return False
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)
