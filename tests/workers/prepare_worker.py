"""Every rank prepares the inputs named on the command line together (data/prepare.py), each
into its own cache dir, with its --workers tokenizing processes per rank; each rank prints one line
per input: `rank R: ok <entry> <rows> <built>`, or `rank R: <error type>: <message>` (and
`rank R read it` where the error was raised by the reader) and exits 3.

Started by torchrun (tests/helpers.run_gloo), or as plain processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (a test that kills one of them)."""

import argparse
import sys
import traceback

from harness import process_group, say

from simcse_dist import distributed as du


def stall(seconds: float) -> None:
    """A rank slower than the collective timeout, on any machine: its reader sleeps once."""
    import time

    from simcse_dist.data.inputs import UnitReader

    read, slept = UnitReader.__iter__, []

    def slow(self):
        if not slept:
            slept.append(time.sleep(seconds))
        return read(self)

    UnitReader.__iter__ = slow


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", action="append", required=True, help="one per input")
    p.add_argument("--input", action="append", required=True, help="a spec; a|b|c is a list")
    p.add_argument("--objective", default="unsup")
    p.add_argument("--workers", type=int, action="append", help="per input (default 1)")
    p.add_argument("--unit-bytes", type=int, default=1 << 15)
    p.add_argument("--shard-rows", type=int, default=100)
    p.add_argument("--timeout", type=int, default=120, help="the process group's")
    p.add_argument("--every-s", type=float, help="the heartbeat (default: a quarter of the timeout, at most 2 s)")
    p.add_argument("--stall-s", type=float, default=0.0, help="rank 0 sleeps this long before its first unit's rows")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from simcse_dist.config import resolve_model_path
    from simcse_dist.data.prepare import open_or_prepare

    tok = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"))
    with process_group(timeout_s=args.timeout) as env:
        if args.stall_s and env.rank == 0:
            stall(args.stall_s)
        for spec, cache, workers in zip(args.input, args.cache, args.workers or [1] * len(args.input), strict=True):
            try:
                corpus = open_or_prepare(
                    spec.split("|") if "|" in spec else spec,
                    None,
                    args.objective,
                    tok,
                    32,
                    cache_dir=cache,
                    workers=workers,
                    shard_rows=args.shard_rows,
                    unit_bytes=args.unit_bytes,
                    every_s=args.every_s or min(2.0, args.timeout / 4),
                )
            except Exception as e:  # noqa: BLE001 - what each rank saw is the test's subject
                read = any(f.filename.endswith("inputs.py") for f in traceback.extract_tb(e.__traceback__))
                say(f"rank {env.rank}: {type(e).__name__}: {e}")
                if read:  # this rank read the bad row; the others were told
                    say(f"rank {env.rank} read it")
                if isinstance(e, du.PeerFailed):
                    raise
                return 3
            say(f"rank {env.rank}: ok {corpus.directory} {corpus.num_rows} {corpus.built}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
