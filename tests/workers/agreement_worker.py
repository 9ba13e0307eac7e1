"""Run under torchrun (2 gloo ranks, a 60 s process-group timeout): rank 0 converts a checkpoint
to DeepSpeed's universal format (train/checkpoint.py) and the conversion fails. Rank 0 reports
its error and then waits 8 s before leaving; each rank prints what ended it and when, so a
rank 1 held in a plain barrier by the failed rank 0 would show up as a late or different end."""

import sys
import time
from pathlib import Path

from harness import process_group, say

from simcse_dist.config import CheckpointConfig
from simcse_dist.train.checkpoint import CheckpointManager


def main() -> int:
    ckpt = Path(sys.argv[1])
    with process_group(timeout_s=60) as env:
        manager = CheckpointManager(ckpt.parent.parent, CheckpointConfig(), env.rank, env.world_size)
        t0 = time.monotonic()
        try:
            manager.load(None, ckpt, universal=True)  # converts first: fails on rank 0 (no engine files)
        except BaseException as e:  # noqa: BLE001 - what ended each rank is the result
            say(f"rank {env.rank}: {type(e).__name__} after {time.monotonic() - t0:.1f} s")
            if env.rank == 0:
                time.sleep(8)
            raise SystemExit(0) from None
    return 1


if __name__ == "__main__":
    sys.exit(main())
