"""Smoke test of `python -m bench.throughput`: every implementation builds and steps, the JSON is complete.

A tiny random BERT, 2 timed steps: this checks that the benchmark still drives the real
trainer path (Trainer.train_step's signature evolves), not the numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers import DEMO_DATA, REPO


def test_throughput_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.throughput",
        "--model",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--batch-sizes",
        "8",
        "--threads",
        "1",
        "--data",
        str(DEMO_DATA / "wiki-demo.txt"),
        "--impls",
        "simcse-z0,simcse-z1,simcse-z2,simcse-z3,plain,st-mnrl,plain-pretok,simcse-z0-nocache",
        "--output",
        str(out),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {
        "simcse-z0",
        "simcse-z1",
        "simcse-z2",
        "simcse-z3",
        "plain",
        "st-mnrl",
        "plain-pretok",
        "simcse-z0-nocache",
    }
    for r in rows.values():
        assert r["steps_timed"] == 2 and r["batch_size"] == 8
        assert r["ms_per_step"] > 0 and math.isfinite(r["sentences_per_s"])
    assert rows["plain"]["vs_plain"] == 1.0 and "vs_st" in rows["simcse-z0"]
    assert "vs plain" in proc.stdout  # the table was printed


def test_packing_bench_smoke(tmp_path):
    """`python -m bench.packing` at 1 and 2 ranks on one case: every row steps, packing computes
    fewer token positions per real token than padding."""
    out = tmp_path / "packing.json"
    cmd = [sys.executable, "-m", "bench.packing", "--model", "tiny", "--cases", "sup-nli-32", "--ranks", "1,2"]
    cmd += ["--nli", str(DEMO_DATA / "nli-demo.tsv")]
    cmd += ["--batch", "16", "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {(r["ranks"], r["impl"]): r for r in json.loads(out.read_text())["results"]}
    trainer = ("simcse-padded", "simcse-packed", "simcse-balanced")
    assert set(rows) == {(1, n) for n in (*trainer, "plain", "st-mnrl")} | {(2, n) for n in trainer}
    for ranks in (1, 2):
        assert rows[ranks, "simcse-packed"]["computed_per_real"] < rows[ranks, "simcse-padded"]["computed_per_real"]
        assert rows[ranks, "simcse-packed"]["computed_per_real"] >= 1.0
