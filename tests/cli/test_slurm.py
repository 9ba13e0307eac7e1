"""`sbatch slurm/train.sh` on a real one-node Slurm cluster, preemption and requeue included.

The session fixture starts munged, slurmctld and two slurmd (nodes simcse-node1 and
simcse-node2, both on this machine) with tests/slurm/setup.sh, which installs the Debian packages
when they are missing, and stops them at the end (tests/slurm/teardown.sh). It needs root and
apt; without them the tests are skipped. Nothing is mocked: jobs go through sbatch, srun and
torchrun (or the deepspeed launcher), one task per node, like on a cluster.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEMO_DATA, REPO, read_jsonl

pytestmark = pytest.mark.slow

SLURM_TESTS = REPO / "tests" / "slurm"
SLURM_DIR = Path(os.environ.get("SIMCSE_SLURM_DIR", "/tmp/simcse-slurm"))
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for sbatch/scontrol against the test cluster; the cluster runs for the session."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (tests/slurm/setup.sh installs packages and starts daemons)")
    # One cluster per machine: a second pytest session waits for the first instead of restarting
    # its daemons under it.
    lock = open(f"{SLURM_DIR}.lock", "w")  # noqa: SIM115 (held for the session)
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.skip(f"another session holds {SLURM_DIR}.lock (its Slurm test cluster) for 15 min")
            time.sleep(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SIMCSE_STOP"))}
    env["SIMCSE_SLURM_DIR"] = str(SLURM_DIR)
    try:
        setup = subprocess.run(
            ["bash", str(SLURM_TESTS / "setup.sh")], capture_output=True, text=True, timeout=900, env=env
        )
        if setup.returncode == 77:
            pytest.skip(setup.stdout.strip().splitlines()[-1])
        assert setup.returncode == 0, f"tests/slurm/setup.sh failed:\n{setup.stdout}\n{setup.stderr}"
        yield {**env, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SLURM_TESTS / "teardown.sh")], env=env, timeout=120)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def train_args(model: Path, out: Path, max_steps: int) -> list[str]:
    """A tiny fp32 CPU run on the demo corpus: global batch 8 over 2 gloo ranks, a row per step."""
    return [
        "--config",
        "configs/demo.yaml",
        f"model.name_or_path={model}",
        f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}",
        f"train.max_steps={max_steps}",
        "train.global_batch_size=8",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        f"train.output_dir={out}",
    ]


class Submitter:
    """sbatch for one test; jobs it submitted that still run when the test ends are cancelled."""

    def __init__(self, env: dict) -> None:
        self.env, self.jobs = env, []

    def __call__(self, tmp: Path, args: list[str], nodes: int = 1, launcher: str = "torchrun") -> tuple[str, Path]:
        """Submits slurm/train.sh in CPU mode, 2 ranks in all; returns the job id and its output file."""
        job_env = {
            **self.env,
            "GPUS_PER_NODE": "0",
            "NPROC_PER_NODE": str(2 // nodes),
            "LAUNCHER": launcher,
            "PYTHON": sys.executable,
            "SIMCSE_STOP_DIR": str(tmp),
            "GLOO_SOCKET_IFNAME": "lo",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled",
        }
        proc = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--nodes={nodes}",
                "--time=15",
                "--job-name=simcse-test",
                f"--output={tmp}/slurm-%j.out",
                "slurm/train.sh",
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=job_env,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job, tmp / f"slurm-{job}.out"


@pytest.fixture
def sbatch(slurm_env):
    submit = Submitter(slurm_env)
    yield submit
    running = [j for j in submit.jobs if job_info(slurm_env, j).get("JobState") not in TERMINAL]
    if running:  # a failed test must not leave jobs that hold the nodes for the next one
        subprocess.run(["scancel", *running], env=slurm_env, timeout=30)


def job_info(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (no accounting here, so no sacct)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def wait_for(pred, timeout: float, what: str, log: Path | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log)}")


def wait_job(env: dict, job: str, log: Path, timeout: float) -> dict[str, str]:
    return wait_for(
        lambda: (i := job_info(env, job)).get("JobState") in TERMINAL and i, timeout, f"job {job} to end", log
    )


def tail(log: Path | None, n: int = 6000) -> str:
    return f"--- {log} ---\n{log.read_text()[-n:]}" if log is not None and log.exists() else ""


def last_row_per_step(path: Path) -> dict[int, dict]:
    """metrics.jsonl after a resume repeats the steps from the checkpoint on: the last row wins."""
    return {r["step"]: r for r in read_jsonl(path) if "train/loss" in r}


def test_sbatch_trains_to_completion_on_one_and_two_nodes(slurm_env, sbatch, tiny_bert, tmp_path):
    """2 ranks as 1 node x 2 (torchrun) and 2 nodes x 1 (torchrun, deepspeed launcher): each job
    completes, and all three make the same steps (fixed seed, exact gather)."""
    layouts = [(1, "torchrun"), (2, "torchrun"), (2, "deepspeed")]
    jobs = []
    for nodes, launcher in layouts:  # queued together; Slurm runs them as nodes free up
        tmp = tmp_path / f"{nodes}-{launcher}"
        tmp.mkdir()
        jobs.append((tmp, *sbatch(tmp, train_args(tiny_bert, tmp / "run", max_steps=4), nodes, launcher)))
    losses = []
    for (nodes, launcher), (tmp, job, log) in zip(layouts, jobs, strict=True):
        info = wait_job(slurm_env, job, log, timeout=240)
        text = log.read_text()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), tail(log)
        assert f"job {job} restart count 0: {nodes} node(s)" in text, tail(log)
        assert f"x {2 // nodes} rank(s), {launcher}, CPU, gloo, rendezvous 127.0.0.1:" in text, tail(log)
        assert "world_size 2" in text and f"job {job}: training finished" in text, tail(log)
        rows = last_row_per_step(tmp / "run" / "metrics.jsonl")
        assert sorted(rows) == [1, 2, 3, 4], tail(log)
        losses.append([rows[s]["train/loss"] for s in (1, 2, 3, 4)])
        assert (tmp / "run" / "best" / "config.json").is_file()
        assert not (tmp / f".simcse-stop-{job}").exists()
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_scancel_checkpoints_and_does_not_requeue(slurm_env, sbatch, tiny_bert, tmp_path):
    """scancel sends SIGTERM to the batch shell and to every process: the trainer checkpoints
    within KillWait (30 s here) and the job ends CANCELLED, not requeued (sbatch again resumes from it)."""
    out = tmp_path / "run"
    job, log = sbatch(tmp_path, train_args(tiny_bert, out, max_steps=3000))
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(read_jsonl(metrics)) >= 3, 180, "3 logged steps", log, poll=0.1)
    subprocess.run(["scancel", job], env=slurm_env, check=True, timeout=30)
    info = wait_job(slurm_env, job, log, timeout=120)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), tail(log)
    assert "batch shell got SIGTERM" in text and "requeueing" not in text.replace("not requeueing", ""), tail(log)
    stopped = re.findall(r"stopped at step (\d+)", text)
    assert len(stopped) == 1, tail(log)
    assert (out / "checkpoints" / f"step-{int(stopped[0]):08d}").is_dir(), tail(log)


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_env, sbatch, tiny_bert, tmp_path):
    steps = 300  # ~30 ms a step: the job is still training when the signal comes
    ref_out, out = tmp_path / "reference", tmp_path / "preempted"
    # The uninterrupted reference, outside Slurm, while the job runs.
    ref_env = {k: v for k, v in slurm_env.items() if k != "SLURM_CONF"}
    ref_env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    reference = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "simcse_dist.cli",
            *train_args(tiny_bert, ref_out, steps),
        ],
        cwd=REPO,
        env=ref_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job, log = sbatch(tmp_path, train_args(tiny_bert, out, steps), nodes=2)
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(read_jsonl(metrics)) >= 5, 180, "5 logged steps", log, poll=0.1)
        # What `#SBATCH --signal=B:USR1@N` does N seconds before the time limit, now.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
        info = wait_job(slurm_env, job, log, timeout=300)
        ref_log, _ = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, f"reference run failed:\n{ref_log[-6000:]}"

    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), tail(log)
    assert f"job {job} restart count 0:" in text and f"job {job} restart count 1:" in text, tail(log)
    assert "batch shell got SIGUSR1" in text and f"requeueing job {job}" in text, tail(log)
    stopped = re.findall(r"stopped at step (\d+)", text)
    resumed = re.findall(r"resumed from step (\d+)", text)
    assert len(stopped) == 1 and resumed == stopped and 0 < int(stopped[0]) < steps, tail(log)
    # The resumed run comes after the stop, and the first attempt printed nothing after requeueing.
    assert text.index("restart count 1:") > text.index(f"requeueing job {job}") > text.index("stopped at step")
    assert any((out / "checkpoints").iterdir())
    assert not (tmp_path / f".simcse-stop-{job}").exists()
    assert (out / "best" / "config.json").is_file()

    got, want = last_row_per_step(metrics), last_row_per_step(ref_out / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert got[steps]["train/loss"] == pytest.approx(want[steps]["train/loss"], rel=1e-6)
    mismatched = [
        (s, got[s]["train/loss"], want[s]["train/loss"])
        for s in want
        if got[s]["train/loss"] != pytest.approx(want[s]["train/loss"], rel=1e-6)
    ]
    assert not mismatched, f"stopped at step {stopped[0]}; (step, resumed, reference) differ: {mismatched[:10]}"
