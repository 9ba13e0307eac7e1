"""What a run publishes at its end (best/, the status) survives a failure to write it: the rerun
of the same command finishes it, and never reports a file that does not exist. A rerun of a
finished run says so at once, says how to train on, and starts nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
from helpers import CLI_ENV, DEMO_DATA, REPO, read_jsonl


def overrides(model: Path, out: Path, **kw) -> list[str]:
    base = {
        "model.name_or_path": model,
        "data.train_file": DEMO_DATA / "wiki-demo.txt",
        "train.global_batch_size": 8,
        "train.max_steps": 2,
        "log.every_steps": 1,
        "log.wandb_mode": "disabled",
        "checkpoint.every_steps": 0,
        "train.output_dir": out,
        **kw,
    }
    return [f"{k}={v}" for k, v in base.items()]


def train(
    *args: str, status: Path | None = None, worker: list[str] | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """simcse-train (or a worker script taking its arguments), forked from the tests'
    pre-imported server (zygote.py), or `fresh`: a new interpreter, to see what it imports."""
    env = {**CLI_ENV, "PYTHONPATH": str(REPO), **({"SIMCSE_STATUS_FILE": str(status)} if status else {})}
    command = [*(worker or ["-m", "simcse_dist.cli"]), *args]
    if fresh:
        return subprocess.run(
            [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    return zygote.run(command, env=env, cwd=REPO, timeout=300)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_a_final_model_lost_to_a_full_disk_is_written_by_the_rerun(tiny_bert, tmp_path):
    """No dev set: best/ is the final model, written after the last checkpoint. On a tmpfs that
    holds the checkpoint but not best/, the run exits 4 naming best/; once there is room, the
    same command writes best/ from that checkpoint and reports it, and the status says done."""
    probe = tmp_path / "probe"
    assert train(*overrides(tiny_bert, probe)).returncode == 0
    checkpoint, best = size(probe / "checkpoints"), size(probe / "best")
    disk = tmp_path / "disk"
    disk.mkdir()
    room = checkpoint + best // 2 + (512 << 10)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out, status = disk / "run", tmp_path / "status.json"
        first = train(*overrides(tiny_bert, out), status=status)
        assert first.returncode == 4, first.stderr[-3000:]
        assert f"error: cannot write the best model {out / 'best'}: the disk is full (ENOSPC)" in first.stderr
        assert not (out / "best").exists() and (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
        assert not status.exists() and "done:" not in first.stdout
        subprocess.run(["mount", "-o", f"remount,size={room * 3}", str(disk)], check=True)
        again = train(*overrides(tiny_bert, out), status=status)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "did not publish its final model: writing" in again.stdout, again.stdout
        assert f"final model in {out / 'best'}" in again.stdout and (out / "best" / "config.json").is_file()
        assert json.loads((out / "best" / "best_info.json").read_text())["step"] == 2
        assert json.loads(status.read_text()) == {"status": "done", "step": 2}
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_failed_metrics_write_is_redone_by_the_rerun(tiny_bert, tmp_path):
    out = tmp_path / "run"
    over = overrides(tiny_bert, out, **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    worker = [str(REPO / "tests" / "workers" / "fault_worker.py"), "--fault", "metrics", "--step", "5"]
    first = train(*over, worker=worker)
    assert first.returncode == 4, first.stderr[-3000:]
    assert f"error: cannot write metrics {out / 'metrics.jsonl'}: the disk is full (ENOSPC)" in first.stderr
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "best").exists()
    again = train(*over)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "best" / "best_info.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_finished_run_rerun_starts_nothing_and_says_how_to_extend(tiny_bert, tmp_path):
    out, status = tmp_path / "run", tmp_path / "status.json"
    over = overrides(tiny_bert, out, **{"log.wandb_mode": "offline"})
    assert train(*over).returncode == 0
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    again = train(*over, status=status, fresh=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout and "raise train.max_steps" in again.stdout, again.stdout
    assert f"final model in {out / 'best'}" in again.stdout
    assert "engine:" not in again.stdout and "wandb:" not in again.stdout  # no model built, no logger
    assert sorted(p.name for p in (out / "wandb").glob("offline-run-*")) == runs
    assert json.loads(status.read_text()) == {"status": "done", "step": 2}
    assert "Setting accelerator to CPU" not in again.stdout + again.stderr


def test_config_of_the_readme_main_job_needs_nothing_outside_the_repo():
    from simcse_dist.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    paths = [cfg.data.train_file, cfg.eval.sts_dev_file]
    assert all(Path(p).is_file() and Path(p).resolve().is_relative_to(REPO) for p in paths), paths
    assert os.path.relpath(cfg.eval.sts_dev_file, REPO) == "data/demo/sts-demo.tsv"


@pytest.mark.slow
def test_the_card_of_best_names_no_local_path_and_its_code_runs_elsewhere(tiny_bert, tmp_path):
    """best/README.md is meant to be published: no path of this machine in it; its
    sentence-transformers snippet, given the folder, runs from another directory with nothing
    of simcse-dist importable."""
    import re

    out = tmp_path / "run"
    assert train(*overrides(tiny_bert, out)).returncode == 0
    card = (out / "best" / "README.md").read_text()
    assert str(tmp_path) not in card and str(REPO) not in card and "/root" not in card
    assert "# Unsupervised SimCSE on " in card and "Data: `wiki-demo.txt` (" in card
    snippet = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    snippet = re.sub(r'^model_id = "[^"]*".*$', f"model_id = {str(out / 'best')!r}", snippet, flags=re.M)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import sys\nsys.modules['simcse_dist'] = None  # only sentence-transformers\n" + snippet
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"]},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor(" in proc.stdout  # model.similarity printed
