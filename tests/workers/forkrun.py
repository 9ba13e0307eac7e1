"""torchrun for the tests' worker scripts, with every rank forked from this process after the
imports all ranks make (torch, transformers' model classes, DeepSpeed's engine, our trainer).

A rank process spends ~5 CPU-s importing before it does anything; on the 2-core CI machine
that is most of a worker test's cost. The ranks are still separate processes in a gloo process
group, started by torch's elastic agent (the code torchrun runs) with start_method="fork", so
what a worker tests is what it tests under torchrun. Tests of the launchers themselves (Ctrl-C,
a dying rank, srun) start the real ones.

    python tests/workers/forkrun.py NPROC SCRIPT [ARGS...]
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import uuid
from pathlib import Path

PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "deepspeed",
    "deepspeed.runtime.engine",
    # DeepSpeed imports its Muon optimizer (which compiles with torch.compile at import) when it
    # builds any ZeRO or bf16 optimizer: 1.4 s per rank otherwise.
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "scipy.stats",
    "simcse_dist.train.trainer",
)


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:  # a library moved a module: only slower
            pass


def rank_main(script: str, argv: list[str]) -> None:
    """One rank: the script as `python SCRIPT ARGS` would run it. A non-zero exit is a failure
    for the agent (which only sees exceptions from a function entrypoint)."""
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    # the script becomes __main__ as under `python SCRIPT`, and multiprocessing's alias of it
    # too (a spawned helper process re-imports the script by that name)
    main = types.ModuleType("__main__")
    main.__file__ = script
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    try:
        exec(compile(Path(script).read_text(), script, "exec"), main.__dict__)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{script} exited with {e.code}") from None


def main() -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc, script, *argv = sys.argv[1:]
    preload()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=int(nproc),
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork",
    )
    elastic_launch(config, rank_main)(script, argv)


if __name__ == "__main__":
    main()
