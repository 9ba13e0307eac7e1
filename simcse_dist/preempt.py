"""Stop requests and launcher death.

A stop request — SIGUSR1 or SIGTERM (Slurm preemption, time limits, a launcher shutting down),
the first SIGINT (Ctrl-C), or the stop file `SIMCSE_STOP_FILE` that slurm/train.sh's USR1 trap
creates — makes every rank finish its optimizer step and write a checkpoint; the trainer polls
`requested()` once per step and the ranks agree before acting. A second Ctrl-C aborts at once.

`watch_launcher()` turns the death of this rank's launcher (torchrun, or the deepspeed
launcher's runner) into the same stop request, so ranks never train on as orphans.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

STOP_FILE_ENV = "SIMCSE_STOP_FILE"
_HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, check_file: bool, say=None) -> None:
        self.signal_name: str | None = None
        self.say = say or (lambda s: print(s, file=sys.stderr, flush=True))
        path = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(path) if (path and check_file) else None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if signum == signal.SIGINT:
                self.say("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort)")

    def requested(self) -> bool:
        return self.signal_name is not None or (self.stop_file is not None and self.stop_file.exists())

    def reason(self) -> str:
        if self.signal_name:
            return self.signal_name
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "a stop request on another rank"

    def clear_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Give the signals back to whoever handled them before (tests build many runs)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _launcher_processes() -> list:
    """The processes whose death means this rank's job is over: the parent (torchrun's agent, or
    deepspeed.launcher.launch), and for the latter also its parent (the deepspeed runner,
    which a user or a scheduler kills)."""
    import psutil  # a dependency of deepspeed

    try:
        parent = psutil.Process(os.getppid())
        watched = [parent]
        if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            grand = parent.parent()
            if grand is not None and grand.pid > 1:
                watched.append(grand)
        return watched
    except psutil.Error:
        return []


def watch_launcher(interval_s: float = 1.0, grace_s: float = 120.0) -> threading.Thread | None:
    """Poll the launcher every `interval_s`; when it is gone, send this process SIGTERM (the
    ranks agree to stop, checkpoint and exit), and if the rank is still alive `grace_s` later
    (peers gone, a collective stuck) end it. No-op for a process started without a launcher."""
    watched = _launcher_processes()
    if not watched:
        return None

    import psutil

    def alive(p) -> bool:
        try:  # is_running also detects a reused pid; a killed parent stays a zombie until reaped
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    parent_pid = os.getppid()

    def run() -> None:
        while os.getppid() == parent_pid and all(alive(p) for p in watched):
            time.sleep(interval_s)
        print(f"rank pid {os.getpid()}: the launcher exited; stopping with a checkpoint", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=run, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread
