"""Stop requests and launcher death.

A stop request is SIGUSR1 or SIGTERM (Slurm preemption, time limits, a launcher shutting down),
the first SIGINT (Ctrl-C), or the stop file `SIMCSE_STOP_FILE` that slurm/train.sh's USR1 trap
creates. What it does depends on the phase of the process:
- starting (imports, config, data preparation, engine, resume): nothing is trained yet, so
  nothing can be lost: the handler raises `StartupInterrupted`, the rank leaves at once, and
  so do its peers (they got the same signal, or see a peer gone);
- training: every rank finishes its optimizer step and writes a checkpoint (the trainer polls
  `requested()` once per step and the ranks agree before acting);
- finishing (the last export): the run completes; the request is only noted.
A second Ctrl-C aborts at once (KeyboardInterrupt) in every phase; later ones are ignored.

`watch_launcher()` turns the death of this rank's launcher (torchrun, or the deepspeed
launcher's runner) into the same stop request, so ranks never train on as orphans.
Only the standard library is imported here: simcse-train installs the handlers before it
imports torch, so that a Ctrl-C during the imports is a stop request too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from simcse_dist import logs

log = logging.getLogger(__name__)

STOP_FILE_ENV = "SIMCSE_STOP_FILE"
HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
STARTING, TRAINING, FINISHING = "starting", "training", "finishing"


class StartupInterrupted(BaseException):
    """A stop request before training began (a BaseException: no `except Exception` swallows it)."""


class StopRequest:
    """This process's stop requests (see the module docstring); `install()` makes the handlers
    this process's, `close()` gives them back."""

    def __init__(self, check_file: bool = True, phase: str = STARTING) -> None:
        self.signal_name: str | None = None
        self.phase = phase
        path = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(path) if (path and check_file) else None
        self._previous: dict[int, object] = {}
        self._aborted = False

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self._aborted:
            return
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            self._aborted = True
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        if self.phase == STARTING:
            raise StartupInterrupted(self.signal_name)
        if signum == signal.SIGINT and self.phase == TRAINING:
            log.info("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort)")

    def training(self, check_file: bool) -> None:
        """Training begins: from now on a stop request means "checkpoint, then stop". A request
        that arrived while a handler could not raise (in C code) is raised here."""
        if self.phase == STARTING and self.signal_name is not None:
            raise StartupInterrupted(self.signal_name)
        self.phase = TRAINING
        if not check_file:
            self.stop_file = None

    def finishing(self) -> None:
        self.phase = FINISHING

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
        log.info(f"rank pid {os.getpid()}: the launcher exited; stopping with a checkpoint", extra=logs.ALL_RANKS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=run, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread
