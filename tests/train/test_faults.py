"""Faults a user meets, each injected for real: Ctrl-C and SIGTERM to real processes and
launchers, a killed launcher, a read-only and a full file system, two runs in one output dir,
an edited training file, a finished run extended, degenerate configs; and what the logs show."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zygote
from helpers import DEMO_DATA, REPO, read_jsonl, run_gloo
from helpers import wait_for_step as wait_for_metrics

from simcse_dist.cli.train import main as train_main

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
    "WANDB_MODE": "disabled",
}


def args(model: Path, out: Path, steps: int = 400, **kw) -> list[str]:
    base = {
        "model.name_or_path": model,
        "model.dropout": 0.1,
        "data.train_file": DEMO_DATA / "wiki-demo.txt",
        "train.global_batch_size": 8,
        "train.max_steps": steps,
        "log.every_steps": 1,
        "log.wandb_mode": "disabled",
        "checkpoint.every_steps": 0,
        "train.output_dir": out,
        **kw,
    }
    return [f"{k}={v}" for k, v in base.items()]


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """Its own session, as a terminal's foreground job is its own process group."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**ENV, **kw.pop("env", {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def python_cli(*a: str) -> list[str]:
    return [sys.executable, "-m", "simcse_dist.cli", *a]


def run_cli(*a: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """simcse-train to its end, forked from the tests' pre-imported server (zygote.py)."""
    return zygote.run(["-m", "simcse_dist.cli", *a], env=ENV, cwd=REPO, timeout=timeout)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    wait_for_metrics(out / "metrics.jsonl", step, proc)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_a_second_aborts(tiny_bert, tmp_path):
    out, status = tmp_path / "run", tmp_path / "status.json"
    proc = start(python_cli(*args(tiny_bert, out)), env={"SIMCSE_STATUS_FILE": str(status)})
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in log and "stopped at step" in log, log[-2000:]
    assert "Traceback" not in log and len(checkpoints(out)) == 1
    assert not (out / ".lock").exists()
    # the status the launch scripts read names the step it stopped at, not the planned total
    (name,) = checkpoints(out)
    assert json.loads(status.read_text()) == {"status": "stopped", "step": int(name.removeprefix("step-"))}
    # A second Ctrl-C while the first is being honoured aborts at once, without a traceback.
    proc = start(python_cli(*args(tiny_bert, tmp_path / "abort")))
    wait_for_step(tmp_path / "abort", 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    log = finish(proc)
    assert proc.returncode in (0, 130), log[-3000:]  # 0 if the step and checkpoint beat the second signal
    assert "Traceback" not in log
    if proc.returncode == 130:
        assert "aborted (second Ctrl-C)" in log


@pytest.mark.slow
@pytest.mark.parametrize("script,sig", [("cpu-gloo.sh", signal.SIGINT), ("deepspeed.sh", signal.SIGTERM)])
def test_launch_scripts_exit_0_after_a_clean_stop(tiny_bert, tmp_path, script, sig):
    """torchrun exits 1 after forwarding the signal; the deepspeed runner exits 1 too: the
    scripts read the trainer's status and report the clean stop as 0."""
    out = tmp_path / "run"
    env = {"NPROC": "2", "MASTER_PORT": str(29600 + os.getpid() % 300)}
    proc = start(["bash", str(REPO / "launch" / script), *args(tiny_bert, out)], env=env)
    wait_for_step(out, 2, proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(sig)  # `kill` of the script: it forwards SIGTERM to the launcher
    log = finish(proc)
    assert proc.returncode == 0, log[-4000:]
    assert "stopped at step" in log and len(checkpoints(out)) == 1, log[-3000:]


@pytest.mark.slow
def test_ctrl_c_during_start_up_under_a_launch_script(tiny_bert, tmp_path):
    """torchrun forwards the Ctrl-C to ranks still importing and preparing: they leave at once
    (nothing was trained), the script exits 0 within seconds, not after torchrun's timeout."""
    out = tmp_path / "run"
    proc = start(["bash", str(REPO / "launch" / "torchrun.sh"), *args(tiny_bert, out)], env={"NPROC": "2"})
    deadline = time.time() + 60
    while time.time() < deadline and len(psutil.Process(proc.pid).children(recursive=True)) < 3:
        time.sleep(0.05)
    time.sleep(1.5)  # the ranks are importing
    everyone = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    log = finish(proc)
    _, alive = psutil.wait_procs(everyone, timeout=5)
    assert proc.returncode == 0 and not alive and time.time() - t0 < 20, (time.time() - t0, log[-3000:])
    assert log.count("stopped during start-up (SIGINT)") == 1, log[-3000:]
    assert "[rank" not in log, log[-3000:]  # no rank traceback (torchrun prefixes them with [rankN])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(tiny_bert, tmp_path, launcher):
    out = tmp_path / "run"
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "simcse_dist.cli",
            *args(tiny_bert, out),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus=2",
            f"--master_port={29900 + os.getpid() % 90}",
            "--module",
            "simcse_dist.cli",
            *args(tiny_bert, out),
        ]
    proc = start(cmd)
    wait_for_step(out, 2, proc)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "simcse_dist.cli" in " ".join(p.cmdline())
        and "launcher" not in " ".join(p.cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    proc.kill()  # kill -9 of the launcher: nothing forwards any signal
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, "ranks outlived their launcher by a minute"
    assert len(checkpoints(out)) == 1  # they stopped together, with a checkpoint


def test_read_only_output_dir_and_a_file_in_its_place(tiny_bert, tmp_path, capsys):
    ro_src, ro = tmp_path / "src", tmp_path / "ro"
    ro_src.mkdir(), ro.mkdir()
    if subprocess.run(["mount", "--bind", str(ro_src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        assert train_main(args(tiny_bert, ro / "run")) == 2
        err = capsys.readouterr().err
        assert f"error: train.output_dir: cannot create {ro / 'run'}: Read-only file system" in err
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    (tmp_path / "file").write_text("x")
    assert train_main(args(tiny_bert, tmp_path / "file")) == 2
    assert "train.output_dir: cannot create" in capsys.readouterr().err


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tiny_bert, tmp_path):
    """A 16 MB tmpfs holds one checkpoint of the tiny model (~12 MB) but not a second: the second
    save stops every rank before writing, rank 0 names the path and the cause, exit 4."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "simcse_dist.cli",
            *args(tiny_bert, out, steps=8, **{"checkpoint.every_steps": 2}),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert (
            f"error: cannot write checkpoint {out / 'checkpoints' / 'step-00000004.tmp'}: the disk is full (ENOSPC)"
            in log
        ), log[-4000:]
        assert f"The previous checkpoint {out / 'checkpoints' / 'step-00000002'} is intact" in log
        assert "exitcode  : 4" in log  # torchrun's report names rank 0 and its exit code
        assert "Connection closed" not in log
        assert checkpoints(out) == ["step-00000002"]  # no half-written directory a later run would use
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_two_runs_in_one_output_dir_and_a_stale_lock(tiny_bert, tmp_path):
    out = tmp_path / "run"
    first = start(python_cli(*args(tiny_bert, out, steps=100000)))
    wait_for_step(out, 1, first)
    t0 = time.time()
    second = run_cli(*args(tiny_bert, out), timeout=120)
    assert second.returncode == 2 and time.time() - t0 < 60
    lock = json.loads((out / ".lock").read_text())
    assert f"train.output_dir: {out} is in use by another run (host {lock['host']}, pid {first.pid}" in second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # the first run dies without releasing its lock
    first.wait()
    third = run_cli(
        *args(tiny_bert, out, steps=100000),
        "checkpoint.resume=false",
        "train.max_steps=2",
        "train.overwrite=true",
        timeout=120,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of a run that is gone (process {first.pid} is gone)" in third.stderr + third.stdout


def test_edited_training_file_is_refused_on_resume(tiny_bert, tmp_path, single_process_group):
    from simcse_dist.config import load_config
    from simcse_dist.train.rundir import DataChanged
    from simcse_dist.train.trainer import Trainer

    data = tmp_path / "wiki.txt"
    data.write_text((DEMO_DATA / "wiki-demo.txt").read_text())
    over = args(tiny_bert, tmp_path / "run", steps=2, **{"data.train_file": data, "log.progress_bar": "false"})
    Trainer(load_config(None, over), single_process_group).train()
    data.write_text(data.read_text().replace("a", "o", 1))  # same size, one letter changed
    longer = [*over, "train.max_steps=3"]
    with pytest.raises(DataChanged, match=f"{data}: content changed since the checkpoint"):
        Trainer(load_config(None, longer), single_process_group).train()
    allowed = Trainer(load_config(None, [*longer, "data.allow_changed_data=true"]), single_process_group)
    assert allowed.train().steps == 3


def test_checkpoint_in_another_data_order_is_refused_through_the_cli(tiny_bert, tmp_path):
    """A checkpoint whose recorded data order is not this version's: exit 2 naming both orders,
    and the checkpoint left as it was."""
    out = tmp_path / "run"
    over = args(tiny_bert, out, steps=2, **{"log.progress_bar": "false"})
    first = run_cli(*over)
    assert first.returncode == 0, first.stderr[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["sampler"] == "feistel-v1"
    state["sampler"] = "another-order-v0"
    state_file.write_text(json.dumps(state))
    again = run_cli(*over, "train.max_steps=4")
    assert again.returncode == 2, again.stderr[-3000:]
    err = again.stderr.strip().splitlines()[-1]
    assert (
        err.startswith("error: ")
        and "'another-order-v0'" in err
        and "'feistel-v1'" in err
        and "Traceback" not in again.stderr
    )
    assert json.loads(state_file.read_text()) == state


def test_raising_max_steps_extends_a_finished_run(tiny_bert, tmp_path, single_process_group, caplog):
    """The linear schedule is recomputed for the new total: step 5 runs at lr x (8 - 4) / 8."""
    from simcse_dist.config import load_config
    from simcse_dist.train.rundir import check_same_run
    from simcse_dist.train.trainer import Trainer

    out = tmp_path / "run"
    over = args(tiny_bert, out, steps=4, **{"log.progress_bar": "false", "optim.lr": 1e-4})
    Trainer(load_config(None, over), single_process_group).train()
    cfg = load_config(None, [*over, "train.max_steps=8"])
    assert check_same_run(cfg) == []  # not "a different config"
    with caplog.at_level(logging.INFO, logger="simcse_dist"):
        Trainer(cfg, single_process_group).train()
    assert "extending the run from 4 to 8 steps" in "\n".join(caplog.messages)
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "train/lr" in r}
    assert sorted(rows) == list(range(1, 9))
    assert rows[5]["train/lr"] == pytest.approx(1e-4 * 4 / 8)


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.temperature=inf", "loss.temperature: must be a finite number > 0, got inf"),
        ("train.global_batch_size=1", "train.global_batch_size: 1 (grad_accum 1) leaves each anchor no negative"),
    ],
)
def test_degenerate_configs_are_refused(tiny_bert, tmp_path, capsys, override, message):
    assert train_main([*args(tiny_bert, tmp_path / "run"), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_hub_id_that_does_not_resolve_fails_within_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    assert (
        train_main(
            [
                f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}",
                "model.name_or_path=nobody/no-such-model",
                f"train.output_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    assert time.time() - t0 < 15
    err = capsys.readouterr().err
    assert "error: model.name_or_path: 'nobody/no-such-model' is not a local directory and could not be fetched" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_logs_a_person_reads(tiny_bert, tmp_path):
    """Redirected output: no progress bar, one wandb line, and loading best/ with plain
    transformers prints no weight report."""
    out = tmp_path / "run"
    proc = subprocess.run(
        python_cli(*args(tiny_bert, out, steps=3, **{"log.wandb_mode": "offline"})),
        cwd=REPO,
        env={k: v for k, v in ENV.items() if k != "WANDB_MODE"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "it/s]" not in log and "\r" not in log  # no tqdm bar
    assert sum("wandb" in line for line in log.splitlines()) == 1, log
    assert "done: 3 steps; final model in" in log and "last checkpoint" in log
    load = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoModel; AutoModel.from_pretrained({str(out / 'best')!r})"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert load.returncode == 0 and "LOAD REPORT" not in load.stdout + load.stderr, load.stderr


@pytest.mark.parametrize("visible,expected", [("2,5", ["--include", "localhost:2,5"]), (None, ["--num_gpus", "3"])])
def test_deepspeed_script_keeps_the_visible_gpus(tmp_path, visible, expected):
    """The DeepSpeed runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: the script passes
    the visible list as --include instead (a stand-in `deepspeed` records its arguments)."""
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = {**ENV, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args"), "NPROC": "3"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "deepspeed.sh"), "--config", "x.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "args").read_text().split("\n")
    assert argv[:2] == expected and "--module" in argv


def test_main_first_keeps_waiting_ranks_alive_past_the_collective_timeout():
    """Preparing a large corpus on rank 0 outlasts engine.dist_timeout_s; the waiting ranks must
    not fail. Control: the same wait in one barrier does time out (so the timeout is real)."""
    from helpers import run_gloo

    out = run_gloo(REPO / "tests" / "workers" / "main_first_worker.py", 2, [], timeout=120)
    assert "rank 0: main_first -> built" in out and "rank 1: main_first -> None" in out
    with pytest.raises(AssertionError, match="(?i)timeout|timed out"):
        run_gloo(REPO / "tests" / "workers" / "main_first_worker.py", 2, ["--barrier"], timeout=120)


@pytest.mark.slow
def test_rank_0_failing_alone_ends_its_peers_at_once(tmp_path):
    """Work that rank 0 does alone (DeepSpeed's checkpoint converter) fails: the other rank learns
    it through the agreement that follows at once, instead of waiting in a barrier for rank 0."""
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    (ckpt / "engine").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"format": 2, "step": 4, "world_size": 1, "zero_stage": 2, "parts": {}})
    )
    out = run_gloo(REPO / "tests" / "workers" / "agreement_worker.py", 2, [str(ckpt)], timeout=180)
    ends = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("rank "))
    assert ends.get("rank 0", "").startswith("CheckpointLayoutError") and "rank 1" in ends, out
    name, seconds = ends["rank 1"].split(" after ")
    assert (
        name == "PeerFailed" and float(seconds.removesuffix(" s")) < float(ends["rank 0"].split(" after ")[1][:-2]) + 4
    ), out
