"""Stop requests: SIGUSR1/SIGTERM (Slurm preemption, time limits, torchrun shutting down) or a
stop file (`SIMCSE_STOP_FILE`, created by slurm/train.sh's USR1 trap). The trainer polls
`requested()` once per optimizer step and agrees across ranks before acting."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_FILE_ENV = "SIMCSE_STOP_FILE"


class StopRequest:
    def __init__(self, check_file: bool) -> None:
        self.signal_name: str | None = None
        path = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(path) if (path and check_file) else None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal_name is not None or (self.stop_file is not None and self.stop_file.exists())

    def reason(self) -> str:
        return self.signal_name or f"stop file {self.stop_file}"

    def clear_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
