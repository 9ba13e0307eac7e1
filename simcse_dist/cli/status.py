"""`python -m simcse_dist.cli.status RC`: the exit code for a launcher that exited RC.

launch/*.sh and slurm/train.sh run torchrun or the deepspeed launcher, which exit non-zero after
they forwarded a stop signal to ranks that then checkpointed and exited 0. Rank 0 records how
the run ended in $SIMCSE_STATUS_FILE ({"status": "done" | "stopped", "step": N}, cli/train.py);
a run that ended so exits 0, anything else keeps RC. The one place this rule lives.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STATUS_FILE_ENV = "SIMCSE_STATUS_FILE"


def clean_stop(rc: int, status_file: str | None) -> tuple[int, str | None]:
    """(exit code, a line saying why it was changed or None)."""
    if rc == 0 or not status_file:
        return rc, None
    try:
        status = json.loads(Path(status_file).read_text())
    except (OSError, ValueError):
        return rc, None
    if isinstance(status, dict) and status.get("status") in ("done", "stopped"):
        return 0, f"launch: the launcher exited {rc} after the trainer ended cleanly ({json.dumps(status)}); exit 0"
    return rc, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rc = int(argv[0])
    except (IndexError, ValueError):
        print("usage: python -m simcse_dist.cli.status RC  (reads $SIMCSE_STATUS_FILE)", file=sys.stderr)
        return 2
    code, why = clean_stop(rc, os.environ.get(STATUS_FILE_ENV))
    if why:
        print(why, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
