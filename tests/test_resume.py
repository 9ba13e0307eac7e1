"""Fault tolerance: exact resume after SIGKILL, stop requests, world-size change, rank failures,
NaN losses, interrupted checkpoint writes, and two runs in one output dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import DEMO_DATA, REPO, read_jsonl

from simcse_dist.checkpoint import CheckpointManager

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO)}
KEYS = ("train/loss", "train/grad_norm", "train/lr")


def common(model: Path, out: Path, steps: int = 16, **kw) -> list[str]:
    args = {"model.name_or_path": model, "model.dropout": 0.1, "data.train_file": DEMO_DATA / "wiki-demo.txt",
            "train.global_batch_size": 12, "train.max_steps": steps, "log.every_steps": 1,
            "log.wandb_mode": "disabled", "log.progress_bar": "false", "checkpoint.every_steps": 4,
            "engine.zero_stage": 2, "train.output_dir": out, **kw}
    return ["--config", str(REPO / "configs" / "demo.yaml"), *(f"{k}={v}" for k, v in args.items())]


def command(args: list[str], nproc: int, module: str = "simcse_dist.cli") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def run(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, nproc), capture_output=True, text=True, cwd=REPO,
                          env={**ENV, **(env or {})}, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(args, nproc), cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_jsonl(metrics)):
            return
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank: nothing gets to clean up."""
    root = psutil.Process(proc.pid)
    procs = [*root.children(recursive=True), root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # exited on its own between listing and killing
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def last_rows(metrics: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(metrics) if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tiny_bert, tmp_path, stage):
    """Dropout on (the augmentation): resuming must restore every rank's RNG, data position,
    optimizer and LR schedule for the loss sequence to be identical."""
    ok(run(common(tiny_bert, tmp_path / "ref", **{"engine.zero_stage": stage})))
    args = common(tiny_bert, tmp_path / "run", **{"engine.zero_stage": stage})
    proc = start(args)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 6, proc)
    kill_tree(proc)
    done = [s for s, _ in CheckpointManager(tmp_path / "run", 2, 0).complete()]
    assert done and max(done) < 16, done
    resumed = ok(run(args))
    assert f"resumed from step {max(done)}" in resumed.stdout
    ref, got = last_rows(tmp_path / "ref" / "metrics.jsonl"), last_rows(tmp_path / "run" / "metrics.jsonl")
    assert sorted(got) == sorted(ref) == list(range(1, 17))
    for step in ref:
        assert all(got[step][k] == ref[step][k] for k in KEYS), (step, ref[step], got[step])


@pytest.mark.slow
def test_stop_file_then_resume_at_another_world_size(tiny_bert, tmp_path):
    """2 ranks stop on the stop file (what slurm/train.sh's USR1 trap creates), 1 rank resumes
    the ZeRO-2 checkpoint through DeepSpeed's universal format, keeping the optimizer state."""
    ok(run(common(tiny_bert, tmp_path / "ref", **{"model.dropout": 0})))
    stop_file = tmp_path / "STOP"
    args = common(tiny_bert, tmp_path / "run", **{"model.dropout": 0, "checkpoint.every_steps": 0})
    proc = start(args, env={"SIMCSE_STOP_FILE": str(stop_file)})
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, proc)
    stop_file.touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and not stop_file.exists()
    (stopped_at, _), = CheckpointManager(tmp_path / "run", 2, 0).complete()
    assert 3 <= stopped_at < 16
    resumed = ok(run(args, nproc=1))
    assert "resuming at world size 1 from a checkpoint written at world size 2" in resumed.stdout
    ref, got = last_rows(tmp_path / "ref" / "metrics.jsonl"), last_rows(tmp_path / "run" / "metrics.jsonl")
    for step in range(stopped_at + 1, 17):  # Adam moments restored: same trajectory to float tolerance
        for k in KEYS:
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4), (step, k)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tiny_bert, tmp_path):
    args = common(tiny_bert, tmp_path / "run", steps=200, **{"checkpoint.every_steps": 0})
    proc = start(args, nproc=1)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and "(SIGTERM)" in out
    assert CheckpointManager(tmp_path / "run", 2, 0).latest() is not None


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_fast_under_torchrun(tiny_bert, tmp_path):
    args = ["--fault", "raise", "--rank", "1", "--step", "3",
            *common(tiny_bert, tmp_path / "run", **{"engine.dist_timeout_s": 30})[2:]]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "workers" / "fault_worker.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr + proc.stdout  # the failing rank's error is shown
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_a_rank_that_raises_without_launcher_ends_peers_within_timeout(tiny_bert, tmp_path):
    """Independent processes (as srun starts them, no agent to kill the peers): the survivor
    must leave its collective within engine.dist_timeout_s instead of hanging."""
    timeout_s = 20
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500), "WORLD_SIZE": "2"}
    args = ["--fault", "raise", "--rank", "1", "--step", "3",
            *common(tiny_bert, tmp_path / "run", **{"engine.dist_timeout_s": timeout_s})[2:]]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "workers" / "fault_worker.py"), *args],
                              cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=timeout_s + 120)[0] for p in procs]
    elapsed = time.time() - t0
    assert all(p.returncode != 0 for p in procs), outs
    assert "injected failure on rank 1" in outs[1]
    assert elapsed < timeout_s + 90, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(tiny_bert, tmp_path, policy):
    args = ["--fault", "nan", "--rank", "1", "--step", "7",
            *common(tiny_bert, tmp_path / "run", steps=10, **{"train.on_nonfinite": policy})[2:]]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "workers" / "fault_worker.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    ckpts = [s for s, _ in CheckpointManager(tmp_path / "run", 2, 0).complete()]
    if policy == "stop":
        assert proc.returncode != 0
        assert "non-finite train/loss at step 7; no update applied" in proc.stderr
        assert ckpts == [4]  # the last good checkpoint is kept, nothing written after the NaN
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step 7: non-finite train/loss on some rank; step skipped" in proc.stdout
        rows = last_rows(tmp_path / "run" / "metrics.jsonl")
        assert rows[6]["train/loss"] == rows[6]["train/loss"]  # finite before the fault
        assert ckpts == [8, 10]


@pytest.mark.slow
def test_interrupted_checkpoint_write_leaves_previous_usable(tiny_bert, tmp_path):
    args = common(tiny_bert, tmp_path / "run", steps=8, **{"checkpoint.every_steps": 2})
    ok(run(args, nproc=1))
    reference = last_rows(tmp_path / "run" / "metrics.jsonl")
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in CheckpointManager(tmp_path / "run", 2, 0).complete()] == [6, 8]
    # A crash while writing step 8: the directory never got its COMPLETE marker nor its final name.
    (root / "step-00000008").rename(root / "step-00000008.tmp")
    (root / "step-00000008.tmp" / "COMPLETE").unlink()
    (root / "step-00000008.tmp" / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert CheckpointManager(tmp_path / "run", 2, 0).latest() == root / "step-00000006"
    resumed = ok(run(args, nproc=1))
    assert "resumed from step 6" in resumed.stdout
    got = last_rows(tmp_path / "run" / "metrics.jsonl")
    for step in (7, 8):
        assert all(got[step][k] == reference[step][k] for k in KEYS)
    assert not (root / "step-00000008.tmp").exists()  # cleaned up by the next save


def test_output_dir_with_another_runs_config_is_refused(tiny_bert, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = run(common(tiny_bert, out, steps=1), nproc=1)
    ok(first)
    second = run(common(tiny_bert, out, steps=1, **{"optim.lr": 1e-3}), nproc=1)
    assert second.returncode == 2
    assert "holds a run with a different config (optim.lr: 3e-05 -> 0.001)" in second.stderr
    third = ok(run(common(tiny_bert, out, steps=1, **{"optim.lr": 1e-3, "train.overwrite": "true"}), nproc=1))
    assert "discarding the different run" in third.stdout
