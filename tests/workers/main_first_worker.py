"""Two gloo ranks with a 3 s process-group timeout: rank 0 works for 8 s (calling tick) while rank
1 waits in distributed.main_first; then the same with a plain barrier, which must time out."""

import sys
import time

import torch.distributed as dist
from harness import process_group, say

from simcse_dist import distributed as du


def main() -> int:
    def work(tick):
        for _ in range(80):
            time.sleep(0.1)
            tick()
        return "built"

    with process_group(timeout_s=3) as env:
        result = du.main_first(work, every_s=1.0)
        say(f"rank {env.rank}: main_first -> {result}")
        if sys.argv[1:] == ["--barrier"]:  # the control: one long wait in a single collective
            if env.rank == 0:
                time.sleep(8)
            dist.barrier()
            say(f"rank {env.rank}: barrier passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
