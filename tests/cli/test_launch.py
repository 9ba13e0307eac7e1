"""`simcse-train --nproc N` (the README's main job): Ctrl-C as a terminal sends it, to the whole
foreground process group, once during start-up and once in training: one line, no traceback,
exit 0, every rank gone within seconds; a second Ctrl-C aborts with 130. And the launcher's
own errors: a bad config is one line, printed once, before any rank starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import CLI_ENV, REPO, read_jsonl

README_COMMAND = ["--nproc", "2", "--config", "configs/demo.yaml"]  # README "Main job", as a user types it


def simcse_train() -> list[str]:
    script = shutil.which("simcse-train")
    return [script] if script else [sys.executable, "-m", "simcse_dist.cli"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    """The README command in its own session, as a terminal runs a foreground job."""
    return subprocess.Popen(
        [*simcse_train(), *README_COMMAND, f"train.output_dir={out}", "log.wandb_mode=disabled", *extra],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the foreground process group


def finish(proc: subprocess.Popen, everyone: list[psutil.Process], within: float) -> str:
    t0 = time.time()
    out, _ = proc.communicate(timeout=120)
    gone, alive = psutil.wait_procs(everyone, timeout=max(1.0, within - (time.time() - t0)))
    assert not alive, f"still running: {alive}\n{out[-3000:]}"
    assert time.time() - t0 < within, f"took {time.time() - t0:.1f} s\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_a_clean_stop(tmp_path):
    proc = start(tmp_path / "run")
    deadline = time.time() + 60
    while time.time() < deadline and len(tree(proc)) < 3:  # the launcher and its two ranks exist
        time.sleep(0.05)
    time.sleep(1.5)  # the ranks are importing torch, deepspeed, transformers
    everyone = tree(proc)
    ctrl_c(proc)
    out = finish(proc, everyone, within=20)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "error" not in out.lower(), out[-3000:]
    assert out.count("stopped during start-up (SIGINT): nothing was trained or lost") == 1, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_in_training_checkpoints_and_exits_0(tmp_path):
    out_dir = tmp_path / "run"
    proc = start(out_dir, "train.max_steps=400", "log.every_steps=1", "eval.every_steps=1000")
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and read_jsonl(metrics)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    everyone = tree(proc)
    ctrl_c(proc)
    out = finish(proc, everyone, within=60)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "(SIGINT): checkpoint saved in" in stopped[0], out[-3000:]
    step = int(stopped[0].split()[3])
    assert (out_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_with_130(tmp_path):
    out_dir = tmp_path / "run"
    proc = start(
        out_dir, "train.max_steps=400", "log.every_steps=1", "eval.every_steps=1000", "checkpoint.every_steps=0"
    )
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and read_jsonl(metrics)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    everyone = tree(proc)
    ctrl_c(proc)
    time.sleep(0.2)
    ctrl_c(proc)
    out = finish(proc, everyone, within=30)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("error: aborted (second Ctrl-C)") == 1, out[-3000:]


def test_a_bad_config_is_one_line_before_any_rank_starts(tmp_path):
    proc = subprocess.run(
        [*simcse_train(), *README_COMMAND, "train.global_batch_size=33", f"train.output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: train.global_batch_size: 33 must be divisible by world_size x train.grad_accum = 2 x 1 = 2\n"
    ), proc.stderr
    assert proc.stdout == ""
