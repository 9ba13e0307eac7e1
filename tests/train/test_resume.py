"""Fault tolerance: exact resume after SIGKILL, stop requests, world-size change, rank failures,
NaN losses, interrupted checkpoint writes, and two runs in one output dir.

Nearly all the cost of these tests is starting processes (each rank imports torch, transformers
and DeepSpeed); steps are cheap. So runs to their end are forked from a pre-imported server
(zygote.py), and a run is launched only where a test needs a new one: the
uninterrupted 1-rank run (`one_rank_run`) is the reference and the source run dir of several
tests, and a killed run's own log is the reference its resumed run must repeat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
import zygote
from helpers import DEMO_DATA, REPO, read_jsonl, wait_for_step

from simcse_dist.config import CheckpointConfig
from simcse_dist.train.checkpoint import CheckpointLayoutError, CheckpointManager

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}
KEYS = ("train/loss", "train/grad_norm", "train/lr")


def common(model: Path, out: Path, steps: int = 16, **kw) -> list[str]:
    args = {
        "model.name_or_path": model,
        "model.dropout": 0.1,
        "data.train_file": DEMO_DATA / "wiki-demo.txt",
        "train.global_batch_size": 12,
        "train.max_steps": steps,
        "log.every_steps": 1,
        "log.wandb_mode": "disabled",
        "log.progress_bar": "false",
        "checkpoint.every_steps": 4,
        "engine.zero_stage": 2,
        "train.output_dir": out,
        **kw,
    }
    return ["--config", str(REPO / "configs" / "demo.yaml"), *(f"{k}={v}" for k, v in args.items())]


def command(args: list[str], nproc: int, module: str = "simcse_dist.cli") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]


def run(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A run to its end, forked from the tests' pre-imported server (zygote.py); `start` starts
    the real command, for the tests that signal or kill it."""
    ranks = nproc if nproc > 1 else None
    return zygote.run(
        ["-m", "simcse_dist.cli", *args], ranks=ranks, env={**ENV, **(env or {})}, cwd=REPO, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def start(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(args, nproc),
        cwd=REPO,
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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


def rows_before_kill(metrics: Path) -> dict[int, dict]:
    """last_rows of what a killed run left: text after the last newline is a row cut mid-write."""
    lines = metrics.read_text().split("\n")[:-1]
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if "train/loss" in r}


def sigkill_then_resume(args: list[str], out: Path, every: int, kill_at: int) -> tuple[dict, dict]:
    """Start `args` on 2 ranks (checkpoints every `every` steps), SIGKILL launcher and ranks once
    step `kill_at` is logged (before the checkpoint at 2 * every), and resume it on 2 ranks.
    Returns the rows logged before the kill and those of the resumed run's metrics.jsonl.

    The killed run is its own uninterrupted reference: up to the kill it ran without a break,
    and it logged kill_at - every >= 10 steps past the checkpoint it is resumed from, which
    the resumed run computes again. The checkpoint is `every` steps apart from the next one
    (and from the end) so that the kill lands well before it."""
    assert kill_at - every >= 10 and 2 * every - kill_at >= 6
    proc = start(args)
    wait_for_step(out / "metrics.jsonl", kill_at, proc)
    kill_tree(proc)
    before = rows_before_kill(out / "metrics.jsonl")
    done = [s for s, _ in CheckpointManager(out, CheckpointConfig(), 0, 2).complete()]
    # killed before its next checkpoint (the last one, 2 * every: a run that ended on its own wrote it)
    assert done == [every] and sorted(before) == list(range(1, max(before) + 1)), (done, sorted(before))
    resumed = ok(run(args))
    assert f"resumed from step {every}" in resumed.stdout
    return before, last_rows(out / "metrics.jsonl")


def fork_run(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` in `dst` as if it had stopped right after checkpoint `step`: no
    checkpoint nor metrics row after it (so the rows after it are the resumed run's)."""
    shutil.copytree(src, dst)
    for s, d in CheckpointManager(dst, CheckpointConfig(), 0, 1).complete():
        if s > step:
            shutil.rmtree(d)
    rows = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(f"{r}\n" for r in rows if json.loads(r)["step"] <= step))
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["train"]["output_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst / "checkpoints" / f"step-{step:08d}"


def max_rel_diff(ref: dict[int, dict], got: dict[int, dict], steps: range) -> float:
    return max(abs(got[s][k] - ref[s][k]) / abs(ref[s][k]) for s in steps for k in KEYS)


def no_dropout(model: Path, out: Path, **kw) -> list[str]:
    """The run of one_rank_run and of the tests that resume it or compare with it: 32 steps,
    dropout 0, so that the trajectory does not depend on the world size (the global batch, its
    order and the gathers are the same) beyond float tolerance; every checkpoint kept."""
    return common(model, out, steps=32, **{"model.dropout": 0, "checkpoint.keep_last": 8, **kw})


@pytest.fixture(scope="module")
def one_rank_run(tiny_bert, tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-2 run on 1 rank (no_dropout, checkpoints every 4 steps): the
    reference trajectory (bit for bit at 1 rank, to float tolerance at any world size) and a
    finished run dir. Tests copy it (fork_run) and never change it."""
    out = tmp_path_factory.mktemp("one-rank") / "run"
    ok(run(no_dropout(tiny_bert, out), nproc=1))
    return out


@pytest.fixture(scope="module")
def two_ranks_resumed_then_stopped(
    tiny_bert, one_rank_run, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """2 ranks resume a copy of one_rank_run at its step-4 checkpoint (written at 1 rank: through
    DeepSpeed's universal format, converted into the checkpoint's engine_universal/), then stop
    on the stop file (what slurm/train.sh's USR1 trap creates), created once step 16 is logged.
    One launch for two tests: the resume up to the stop is what
    test_one_rank_zero2_checkpoint_resumes_on_two_ranks_with_its_adam_state checks, the stop and
    its checkpoint what test_stop_file_then_resume_at_another_world_size starts from. Returns the
    run dir (tests copy it), the launcher's exit code and output, and the stop file."""
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    fork_run(one_rank_run, out, 4)
    stop_file = out.parent / "STOP"
    proc = start(no_dropout(tiny_bert, out, **{"checkpoint.every_steps": 0}), env={"SIMCSE_STOP_FILE": str(stop_file)})
    wait_for_step(out / "metrics.jsonl", 16, proc)
    stop_file.touch()
    output, _ = proc.communicate(timeout=120)
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, output, ""), stop_file


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tiny_bert, tmp_path, stage):
    """Dropout on (the augmentation): resuming must restore every rank's RNG, data position,
    optimizer and LR schedule for the loss sequence to be identical. Checkpoint at step 20,
    SIGKILL at step 32 or later: the resumed run repeats steps 21 to the kill bit for bit (the
    killed run's own log is the uninterrupted reference) and finishes the run."""
    out = tmp_path / "run"
    # the STS dev set is evaluated at the end only (demo.yaml: every 20 steps), as in the shorter
    # runs of the other tests: an evaluation costs more than a step
    kw = {"engine.zero_stage": stage, "checkpoint.every_steps": 20, "eval.every_steps": 40}
    args = common(tiny_bert, out, steps=40, **kw)
    ref, got = sigkill_then_resume(args, out, every=20, kill_at=32)
    assert sorted(got) == list(range(1, 41))
    for step in ref:
        assert all(got[step][k] == ref[step][k] for k in KEYS), (step, ref[step], got[step])


@pytest.mark.slow
def test_one_rank_zero2_checkpoint_resumes_on_two_ranks_with_its_adam_state(
    tiny_bert, tmp_path, one_rank_run, two_ranks_resumed_then_stopped
):
    """1 rank runs DeepSpeed's ZeRO-2 (one_rank_run); 2 ranks resume its checkpoint at step 4
    through DeepSpeed's universal format and follow the uninterrupted run up to their stop (step
    16 or later: two_ranks_resumed_then_stopped). The control resumes the same checkpoint with
    its Adam moments zeroed: it leaves the trajectory by more than the tolerance, so the
    comparison does see the optimizer state."""
    src, launch, _ = two_ranks_resumed_then_stopped
    ref = last_rows(one_rank_run / "metrics.jsonl")
    ckpt = one_rank_run / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["zero_stage"] == 2
    assert "resuming at world size 2 from a checkpoint written at world size 1" in ok(launch).stdout
    got = last_rows(src / "metrics.jsonl")
    stopped_at = max(got)
    assert stopped_at >= 16 and sorted(got) == list(range(1, stopped_at + 1))
    assert max_rel_diff(ref, got, range(5, stopped_at + 1)) < 1e-4

    # Control, test-only surgery: the resume converted step 4 with DeepSpeed's own converter
    # into the folder the manager reuses (engine_universal/ + COMPLETE); in a copy, zero the
    # moments in DeepSpeed's universal layout (zero/<param>/exp_avg*.pt holding {"param": tensor})
    # and resume that on 2 ranks the same way.
    control = fork_run(src, tmp_path / "control", 4)
    universal = control / "engine_universal"
    assert (universal / "COMPLETE").is_file()
    moments = list(universal.glob("zero/*/exp_avg*.pt"))
    assert moments
    for f in moments:
        state = torch.load(f, weights_only=False)
        state["param"] = torch.zeros_like(state["param"])
        torch.save(state, f)
    ok(run(no_dropout(tiny_bert, tmp_path / "control"), nproc=2))
    assert max_rel_diff(ref, last_rows(tmp_path / "control" / "metrics.jsonl"), range(5, stopped_at + 1)) > 3e-4


@pytest.mark.slow
def test_stop_file_then_resume_at_another_world_size(tiny_bert, tmp_path, one_rank_run, two_ranks_resumed_then_stopped):
    """2 ranks stop on the stop file (two_ranks_resumed_then_stopped), 1 rank resumes the ZeRO-2
    checkpoint through DeepSpeed's universal format, keeping the optimizer state: it follows the
    uninterrupted run (one_rank_run) to the end."""
    src, launch, stop_file = two_ranks_resumed_then_stopped
    assert launch.returncode == 0, launch.stdout[-3000:]
    assert "stopped at step" in launch.stdout and not stop_file.exists()
    done = [s for s, _ in CheckpointManager(src, CheckpointConfig(), 0, 2).complete()]
    stopped_at = done[-1]
    assert done == [4, stopped_at] and 16 <= stopped_at < 32  # the one resumed from, the stop's
    ckpt = fork_run(src, tmp_path / "run", stopped_at)
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    assert saved["zero_stage"] == 2 and saved["world_size"] == 2
    resumed = ok(run(no_dropout(tiny_bert, tmp_path / "run", **{"checkpoint.every_steps": 0}), nproc=1))
    assert "resuming at world size 1 from a checkpoint written at world size 2" in resumed.stdout
    ref, got = last_rows(one_rank_run / "metrics.jsonl"), last_rows(tmp_path / "run" / "metrics.jsonl")
    for step in range(stopped_at + 1, 33):  # Adam moments restored: same trajectory to float tolerance
        for k in KEYS:
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4), (step, k)


@pytest.mark.slow
def test_bf16_layout_changes_restore_the_exact_optimizer_state(tiny_bert, tmp_path):
    """bf16 at ZeRO-2 on 2 ranks. Loading its checkpoint at 1 rank (DeepSpeed's universal format)
    gives every parameter the same fp32 weight, Adam moments and step as loading it at 2. (The
    other direction, 1 rank -> 2, is held in fp32 with the trajectory by
    test_one_rank_zero2_checkpoint_resumes_on_two_ranks_with_its_adam_state.) The 2-rank worker
    trains the run itself before it loads the checkpoint: one launch for both."""
    worker = REPO / "tests" / "workers" / "resume_state_worker.py"
    args = common(tiny_bert, tmp_path / "w2", steps=4, **{"model.dropout": 0, "engine.precision": "bf16"})
    dumps = {}
    for nproc in (2, 1):  # the 2-rank worker first trains the 4 steps, the last one saving the checkpoint
        dump = tmp_path / f"on{nproc}.pt"
        train = ["--train-steps", "4"] if nproc == 2 else []
        # a finished run skips building its engine: one more step to go makes the worker restore it
        argv = ["--dump", str(dump), *train, *args, "train.max_steps=5"]
        ok(zygote.run([str(worker), *argv], ranks=nproc if nproc > 1 else None, env=ENV, cwd=REPO, timeout=300))
        dumps[nproc] = torch.load(dump, weights_only=False)
    own, other = dumps[2], dumps[1]
    assert own["route"] == "direct" and other["route"] == "universal"
    assert own["step"] == other["step"] == 4
    assert sorted(own["params"]) == sorted(other["params"])
    for name, state in own["params"].items():
        for key, value in state.items():
            assert torch.equal(value, other["params"][name][key]), (name, key)


def fake_checkpoint(path: Path, world_size: int, zero_stage: int, fmt: int = 2) -> Path:
    path.mkdir(parents=True)
    state = {"format": fmt, "step": 4, "world_size": world_size, "zero_stage": zero_stage, "parts": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def test_universal_only_for_partitioned_state_at_another_world_size(tmp_path):
    """ZeRO-0 holds the whole optimizer state on every rank: loaded as written at any world size.
    ZeRO 1-3 at another world size go through DeepSpeed's universal format. A checkpoint whose
    engine was built at another stage, or written in another checkpoint format, is refused,
    naming it and what differs."""
    cfg = CheckpointConfig()
    on = {w: CheckpointManager(tmp_path, cfg, 0, w) for w in (1, 2, 4)}
    z2 = fake_checkpoint(tmp_path / "z2", 2, 2)
    z0 = fake_checkpoint(tmp_path / "z0", 2, 0)
    assert [on[w].needs_universal(z2, 2) for w in (1, 2, 4)] == [True, False, True]
    assert [on[w].needs_universal(z0, 0) for w in (1, 2, 4)] == [False, False, False]
    with pytest.raises(CheckpointLayoutError) as e:
        on[1].needs_universal(z0, 2)
    assert str(e.value).startswith(f"{z0}: written by an engine built with ZeRO stage 0, this run builds stage 2")
    other = fake_checkpoint(tmp_path / "other", 1, 0, fmt=7)
    with pytest.raises(CheckpointLayoutError) as e:
        on[1].needs_universal(other, 0)
    assert str(e.value).startswith(f"{other}: written in checkpoint format 7, this version reads format 2")


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tiny_bert, tmp_path):
    args = common(tiny_bert, tmp_path / "run", steps=200, **{"checkpoint.every_steps": 0})
    proc = start(args, nproc=1)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and "(SIGTERM)" in out
    assert CheckpointManager(tmp_path / "run", CheckpointConfig(), 0, 2).latest() is not None


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_fast_under_torchrun(tiny_bert, tmp_path):
    args = [
        "--fault",
        "raise",
        "--rank",
        "1",
        "--step",
        "3",
        *common(tiny_bert, tmp_path / "run", **{"engine.dist_timeout_s": 30})[2:],
    ]
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "workers" / "fault_worker.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr + proc.stdout  # the failing rank's error is shown
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_a_rank_that_raises_without_launcher_ends_peers_within_timeout(tiny_bert, tmp_path):
    """Independent processes (as srun starts them, no agent to kill the peers): the survivor
    must leave its collective within engine.dist_timeout_s instead of hanging."""
    timeout_s = 20
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500), "WORLD_SIZE": "2"}
    args = [
        "--fault",
        "raise",
        "--rank",
        "1",
        "--step",
        "3",
        *common(tiny_bert, tmp_path / "run", **{"engine.dist_timeout_s": timeout_s})[2:],
    ]
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "workers" / "fault_worker.py"), *args],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=timeout_s + 120)[0] for p in procs]
    elapsed = time.time() - t0
    assert all(p.returncode != 0 for p in procs), outs
    assert "injected failure on rank 1" in outs[1]
    assert elapsed < timeout_s + 90, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("policy,log_every", [("stop", 1), ("stop", 10), ("skip", 1)])
def test_nonfinite_loss(tiny_bert, tmp_path, policy, log_every):
    """log_every 10: step 7 neither logs nor saves, so its agreement is read one step later (no
    host sync); step 8 would save a checkpoint and must not."""
    args = [
        "--fault",
        "nan",
        "--rank",
        "1",
        "--step",
        "7",
        *common(tiny_bert, tmp_path / "run", steps=10, **{"train.on_nonfinite": policy, "log.every_steps": log_every})[
            2:
        ],
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "workers" / "fault_worker.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=300,
    )
    ckpts = [s for s, _ in CheckpointManager(tmp_path / "run", CheckpointConfig(), 0, 2).complete()]
    if policy == "stop":
        assert proc.returncode != 0
        assert "non-finite train/loss at step 7; nothing after step 6 is saved" in proc.stderr
        assert ckpts == [4]  # the last good checkpoint is kept, nothing written after the NaN
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step 7: non-finite train/loss on some rank; step skipped" in proc.stdout
        rows = last_rows(tmp_path / "run" / "metrics.jsonl")
        assert rows[6]["train/loss"] == rows[6]["train/loss"]  # finite before the fault
        assert ckpts == [8, 10]


@pytest.mark.slow
def test_interrupted_checkpoint_write_leaves_previous_usable(tiny_bert, tmp_path, one_rank_run):
    """A copy of one_rank_run whose last checkpoint write was cut: it resumes from the one before
    and repeats the uninterrupted run bit for bit (same world size and config)."""
    reference = last_rows(one_rank_run / "metrics.jsonl")
    fork_run(one_rank_run, tmp_path / "run", 32)
    root = tmp_path / "run" / "checkpoints"
    done = [s for s, _ in CheckpointManager(tmp_path / "run", CheckpointConfig(), 0, 2).complete()]
    assert done == [4, 8, 12, 16, 20, 24, 28, 32]
    # A crash while writing step 32: the directory never got its COMPLETE marker nor its final name.
    (root / "step-00000032").rename(root / "step-00000032.tmp")
    (root / "step-00000032.tmp" / "COMPLETE").unlink()
    (root / "step-00000032.tmp" / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert CheckpointManager(tmp_path / "run", CheckpointConfig(), 0, 2).latest() == root / "step-00000028"
    resumed = ok(run(no_dropout(tiny_bert, tmp_path / "run"), nproc=1))
    assert "resumed from step 28" in resumed.stdout
    got = last_rows(tmp_path / "run" / "metrics.jsonl")
    for step in (29, 30, 31, 32):
        assert all(got[step][k] == reference[step][k] for k in KEYS)
    assert not (root / "step-00000032.tmp").exists()  # cleaned up by the next save


def test_output_dir_with_another_runs_config_is_refused(tiny_bert, tmp_path, one_rank_run):
    """A run dir (a copy of one_rank_run: a moved run dir is the same run, its config.yaml may
    name another train.output_dir) refuses a run with another config before it starts;
    train.overwrite discards it."""
    out = tmp_path / "run"
    shutil.copytree(one_rank_run, out)
    second = run(no_dropout(tiny_bert, out, **{"optim.lr": 1e-3}), nproc=1)
    assert second.returncode == 2
    assert "holds a run with a different config (optim.lr: 3e-05 -> 0.001)" in second.stderr
    third = ok(
        run(no_dropout(tiny_bert, out, **{"train.max_steps": 1, "optim.lr": 1e-3, "train.overwrite": "true"}), nproc=1)
    )
    assert "discarding the different run" in third.stdout


def tensor_numel(obj) -> int:
    """Elements of every tensor in a (nested) checkpoint object."""
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(tensor_numel(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_numel(v) for v in obj)
    return 0


def lora_args(model: Path, out: Path, stage: int, steps: int = 12, **kw) -> list[str]:
    """LoRA on a tiny random Qwen2 with dropout on (base and adapters) and gradient caching."""
    lora = {
        "model.pooler": "last_token",
        "model.lora.r": 4,
        "model.lora.target_modules": "[q_proj,v_proj]",
        "model.lora.dropout": 0.1,
        "train.grad_cache": "true",
        "train.grad_accum": 2,
        "engine.zero_stage": stage,
        **kw,
    }
    return common(model, out, steps=steps, **lora)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from helpers import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_lora_checkpoint_is_the_adapter_and_resumes_bit_exact_after_sigkill(tiny_qwen2, tmp_path, stage):
    """Checkpoint at step 16, SIGKILL at step 26 or later: the resumed run repeats steps 17 to
    the kill bit for bit (the killed run's own log is the uninterrupted reference)."""
    from simcse_dist.model.lora import base_fingerprint

    out = tmp_path / "run"
    kw = {"checkpoint.every_steps": 16, "eval.every_steps": 32}  # the STS dev set at the end only
    args = lora_args(tiny_qwen2, out, stage, steps=32, **kw)
    ref, got = sigkill_then_resume(args, out, every=16, kill_at=26)
    assert sorted(got) == list(range(1, 33))
    for step in ref:
        assert all(got[step][k] == ref[step][k] for k in KEYS), (step, ref[step], got[step])

    # what a checkpoint holds: the adapters (2 layers x (q: 4x32 + 32x4, v: 4x32 + 16x4) = 896
    # weights), their two Adam moments and, at ZeRO 1-3, their fp32 master copy; no base weight
    adapter = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    ckpt = CheckpointManager(tmp_path / "run", CheckpointConfig(), 0, 2).latest()
    held = sum(tensor_numel(torch.load(f, weights_only=False)) for f in (ckpt / "engine").rglob("*.pt"))
    assert 3 * adapter <= held <= 4 * adapter + 64, (held, adapter)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["base"] == base_fingerprint(str(tiny_qwen2)) and state["lora"]["r"] == 4


@pytest.mark.slow
def test_lora_resume_refuses_a_changed_base(tiny_qwen2, tmp_path):
    from helpers import make_tiny_decoder

    base = tmp_path / "base"
    shutil.copytree(tiny_qwen2, base)
    args = [*lora_args(base, tmp_path / "run", 0), "train.max_steps=4"]
    ok(run(args, nproc=1))
    other = make_tiny_decoder(tmp_path / "other", arch="qwen2", seed=1)
    shutil.copy(other / "model.safetensors", base / "model.safetensors")
    proc = run([*args, "train.max_steps=8"], nproc=1)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "sha256" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_lora_zero2_checkpoint_of_two_ranks_resumes_on_one(tiny_qwen2, tmp_path):
    """The adapters-only ZeRO-2 checkpoint of 2 ranks goes through DeepSpeed's universal format
    onto 1 rank and follows the uninterrupted run (dropout 0: the trajectory does not depend on N)."""
    kw = {"model.dropout": 0, "model.lora.dropout": 0, "engine.zero_stage": 2, "checkpoint.keep_last": 8}
    ok(run([*lora_args(tiny_qwen2, tmp_path / "ref", 2), *(f"{k}={v}" for k, v in kw.items())], nproc=2))
    ref = last_rows(tmp_path / "ref" / "metrics.jsonl")
    fork_run(tmp_path / "ref", tmp_path / "run", 4)
    resumed = ok(run([*lora_args(tiny_qwen2, tmp_path / "run", 2), *(f"{k}={v}" for k, v in kw.items())], nproc=1))
    assert "resuming at world size 1 from a checkpoint written at world size 2" in resumed.stdout
    got = last_rows(tmp_path / "run" / "metrics.jsonl")
    assert sorted(got) == list(range(1, 13))
    assert max_rel_diff(ref, got, range(5, 13)) < 1e-4
