"""A user's mistake is one line, printed once whatever the number of ranks, naming where the bad
value came from; a redirected log gets no progress-bar frames."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import CLI_ENV, DEMO_DATA, REPO


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env={**CLI_ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_a_bad_override_under_torchrun_is_reported_once_as_from_the_command_line(tmp_path):
    """Rank 0 is made 3 s slower than rank 1 to reach the error: rank 1 must not exit first, or
    torchrun ends rank 0 before it printed (what a loaded machine did by chance)."""
    late_rank_0 = tmp_path / "late_rank_0.py"
    late_rank_0.write_text(
        "import os, sys, time\n"
        "from simcse_dist.cli.train import main\n"
        "if os.environ['RANK'] == '0':\n"
        "    time.sleep(3)\n"
        "sys.exit(main())\n"
    )
    proc = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(late_rank_0),
            "--config",
            "configs/demo.yaml",
            "model.pooler=nope",
            f"train.output_dir={tmp_path / 'run'}",
        ]
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model.pooler: 'nope' is not one of cls | cls_before_pooler | avg | avg_first_last | "
        "avg_top2 | pooler_output | last_token (aliases: pooler = pooler_output, last-avg = avg, first-last-avg = "
        "avg_first_last) (from the command line)"
    ], proc.stderr[-3000:]


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pooler: cls\n  dropout: [0.1\n")
    proc = run([sys.executable, "-m", "simcse_dist.cli", "--config", str(bad)])
    assert proc.returncode == 2
    assert (
        proc.stderr == f"error: {bad}:4:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)\n"
    ), proc.stderr


def test_simcse_eval_writes_no_progress_frames_into_a_redirected_log(tiny_bert, tmp_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text((DEMO_DATA / "sts-demo.tsv").read_text())
    proc = run(
        [
            sys.executable,
            "-m",
            "simcse_dist.cli.eval",
            "--model",
            str(tiny_bert),
            "--pooler",
            "avg",
            "--sts-file",
            str(sts),
            "--batch-size",
            "8",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert "sts.tsv: 101 pairs from" in proc.stdout and "sts.tsv |  Avg." in proc.stdout, proc.stdout
