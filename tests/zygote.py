"""Commands of the tests forked from a pre-imported server instead of started from scratch.

A Python process of ours spends ~5-6 CPU-s importing torch, transformers, DeepSpeed and the
trainer before it does anything: most of what a short training run costs on the 2-core CI
machine. `run` starts the command as a child of a multiprocessing forkserver that made those
imports once (per pytest worker) and never ran a torch op (a process forked after OpenMP ran
hangs in its own first parallel region). The child gets its own environment, working directory
and output files, and runs the script or module as `python` would run it; with `ranks`, it is
torch's elastic agent (what torchrun runs, with start_method="fork") forking that many ranks.

What it does not give: the launchers' own behaviour (signals, a dying rank, the exit codes of
torchrun or the deepspeed launcher) and what a fresh interpreter shows at import (a library's
import-time warning is printed once, by the server). Tests of those start real processes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import tempfile
import types
import uuid
from pathlib import Path

import psutil

# What libraries read from the environment when they load (libgomp: OMP_NUM_THREADS;
# huggingface_hub: HF_HUB_OFFLINE): the server's environment while it imports.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

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


_context = None


def _server():
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["zygote", *PRELOAD])
        saved = dict(os.environ)
        os.environ.update(SERVER_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = ctx
    return _context


def _child(target: list[str], argv: list[str], ranks: int | None, env: dict, cwd: str, out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    preload()  # imports the server did not make (a module moved): here, at their cost
    if ranks is None:
        code = run_main(target, argv)
    else:
        try:
            launch(ranks, target, argv)
            code = 0
        except Exception as e:  # the agent's ChildFailedError: torchrun exits 1 and prints it
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(
    command: list[str],
    *,
    ranks: int | None = None,
    env: dict | None = None,
    cwd: Path | str = ".",
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`python *command` (command: [SCRIPT, *ARGS] or ["-m", MODULE, *ARGS]), or under
    torchrun with `ranks` ranks, forked from the server; the result as
    subprocess.run(capture_output=True, text=True) gives it. A command still running after
    `timeout` s is killed with its children (subprocess.TimeoutExpired)."""
    target, argv = split_target(command)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        proc = _server().Process(
            target=_child,
            args=(target, argv, ranks, dict(os.environ if env is None else env), str(cwd), str(out), str(err)),
        )
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(proc.pid)
                for p in [*tree.children(recursive=True), tree]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
            proc.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(
            command, proc.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )
