"""Commands of the tests forked from a pre-imported server instead of started from scratch.

A Python process of ours spends ~5-6 CPU-s importing torch, transformers, DeepSpeed and the
trainer before it does anything: most of what a short training run costs on the 2-core CI
machine. `run` starts the command as a child of a multiprocessing forkserver that made those
imports once (per pytest worker) and never ran a torch op (a process forked after OpenMP ran
hangs in its own first parallel region). The child gets its own environment, working directory
and output files, and runs the script or module as `python` would run it; with `ranks`, it is
torch's elastic agent (what torchrun runs) forking that many ranks (workers/forkrun.py).

What it does not give: the launchers' own behaviour (signals, a dying rank, the exit codes of
torchrun or the deepspeed launcher) and what a fresh interpreter shows at import (a library's
import-time warning is printed once, by the server). Tests of those start real processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

import forkrun  # noqa: E402

# What libraries read from the environment when they load (libgomp: OMP_NUM_THREADS;
# huggingface_hub: HF_HUB_OFFLINE): the server's environment while it imports.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

_context = None


def _server():
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["forkrun", *forkrun.PRELOAD])
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
    forkrun.preload()  # imports the server did not make (a module moved): here, at their cost
    if ranks is None:
        code = forkrun.run_main(target, argv)
    else:
        try:
            forkrun.launch(ranks, target, argv)
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
    target, argv = forkrun.split_target(command)
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
