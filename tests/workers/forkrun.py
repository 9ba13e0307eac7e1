"""torchrun for the tests' worker scripts, with every rank forked from this process after the
imports all ranks make (torch, transformers' model classes, DeepSpeed's engine, our trainer).

A rank process spends ~5 CPU-s importing before it does anything; on the 2-core CI machine
that is most of a worker test's cost. The ranks are still separate processes in a gloo process
group, started by torch's elastic agent (the code torchrun runs) with start_method="fork", so
what a worker tests is what it tests under torchrun. Tests of the launchers themselves (Ctrl-C,
a dying rank, srun) start the real ones.

    python tests/workers/forkrun.py NPROC SCRIPT [ARGS...]
    python tests/workers/forkrun.py NPROC -m MODULE [ARGS...]
"""

from __future__ import annotations

import importlib
import importlib.util
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


def run_main(target: list[str], argv: list[str]) -> int:
    """`python SCRIPT ARGS` or `python -m MODULE ARGS` in this process, as the interpreter
    would run it; returns its exit code."""
    main = types.ModuleType("__main__")
    if target[0] == "-m":
        spec = importlib.util.find_spec(target[1])
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            spec = importlib.util.find_spec(f"{target[1]}.__main__")
        main.__spec__, main.__package__, path = spec, spec.parent, spec.origin
    else:
        path = os.path.abspath(target[0])
        sys.path.insert(0, os.path.dirname(path))
    main.__file__ = path
    sys.argv = [path, *argv]
    # multiprocessing's alias of __main__ too: a spawned helper process re-imports it by that name
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    try:
        exec(compile(Path(path).read_text(), path, "exec"), main.__dict__)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def rank_main(target: list[str], argv: list[str]) -> None:
    """One rank. A non-zero exit is a failure for the agent (which only sees a function's
    exceptions)."""
    code = run_main(target, argv)
    if code != 0:
        raise RuntimeError(f"{' '.join(target)} exited with {code}")


def launch(nproc: int, target: list[str], argv: list[str]) -> None:
    """torchrun --standalone --nproc_per_node NPROC TARGET ARGS, the ranks forked from here."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork",
    )
    elastic_launch(config, rank_main)(target, argv)


def split_target(args: list[str]) -> tuple[list[str], list[str]]:
    """[SCRIPT, *ARGS] or ["-m", MODULE, *ARGS] -> (target, args)."""
    return (args[:2], args[2:]) if args[0] == "-m" else (args[:1], args[1:])


def main() -> None:
    nproc, *rest = sys.argv[1:]
    preload()
    launch(int(nproc), *split_target(rest))


if __name__ == "__main__":
    main()
