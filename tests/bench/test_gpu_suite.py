"""The GPU suite's dry run (CI's stand-in for the GPU): `bash bench/gpu_suite.sh --dry-run` runs
the suite's whole code path on CPU with a tiny random BERT, and every section must report and pass.

The suite's own comparisons are to independent references (the same run on CPU, gradient
caching vs plain accumulation, the fixed GPU targets); what this test adds is that the
suite runs end to end, every check is there, and the JSON says what was substituted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, SHARED_DATA

CORRECTNESS = {
    "bf16 ZeRO-0",
    "bf16 ZeRO-2 (+ STS-B dev eval)",
    "bf16 ZeRO-3",
    "fp16 ZeRO-0 (fp32: dry run)",
    "fp32 dropout 0: GPU vs CPU losses",
    "grad cache (accum 2) vs accum 1",
    "short last batch, padding rows (ZeRO-3, grad cache)",
    "export + simcse-eval (STS-B dev)",
}


@pytest.mark.skipif(not (SHARED_DATA / "stsb" / "dev.tsv").exists(), reason=f"shared data not found at {SHARED_DATA}")
def test_gpu_suite_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert (out / "gpu_suite.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_suite.json").read_text())
    failed = [
        (s, c["name"], c["detail"][-1500:])
        for s, sec in result["sections"].items()
        for c in sec["checks"]
        if c["status"] == "fail"
    ]
    assert not failed, failed
    assert proc.returncode == 0 and result["passed"] and result["dry_run"], proc.stdout[-2000:]
    assert set(result["sections"]) == {"correctness", "throughput", "pipeline", "objectives", "lora", "packing"}
    checks = {s: {c["name"]: c for c in sec["checks"]} for s, sec in result["sections"].items()}
    assert set(checks["correctness"]) == CORRECTNESS
    assert all(c["status"] == "pass" for c in checks["correctness"].values())
    # numbers were recorded, not just statuses
    assert checks["correctness"]["fp32 dropout 0: GPU vs CPU losses"]["numbers"]["max_rel_diff"] <= 1e-3
    assert checks["correctness"]["grad cache (accum 2) vs accum 1"]["numbers"]["max_rel_diff"] <= 1e-3
    (packed,) = checks["packing"].values()  # the dry run: batch 8, both train, the ratio recorded
    assert packed["status"] == "pass" and packed["numbers"]["packed_over_padded"] > 0, packed
    (lora,) = checks["lora"].values()
    assert lora["status"] == "pass" and lora["numbers"]["sentences_per_s"] > 0 and lora["numbers"]["peak_rss_bytes"] > 0
    spearman = checks["correctness"]["export + simcse-eval (STS-B dev)"]["numbers"]["stsb_dev_spearman"]
    assert -100 <= spearman <= 100
    measured = checks["throughput"]["measured every implementation"]
    assert measured["status"] == "pass"
    assert {k.split(" ", 1)[1] for k in measured["numbers"]} == {
        "simcse-z0",
        "simcse-z2",
        "simcse-z3",
        "simcse-z0-compile",
        "plain",
        "st-mnrl",
    }
    assert checks["throughput"]["issue targets"]["status"] == "skipped"  # GPU only, and says so
    pipeline = checks["pipeline"]["DataLoader workers + backend"]
    assert pipeline["status"] == "pass" and pipeline["numbers"]["backend"] == "gloo"
    assert pipeline["numbers"]["dataloaders"][0]["num_workers"] == 2
    assert any("fp16" in s for s in result["substitutions"]) and result["versions"]["deepspeed"] != "missing"
    assert "| correctness |" in (out / "gpu_suite.md").read_text()
    objectives = checks["objectives"]
    assert set(objectives) == {f"objective {n}" for n in ("plain", "matryoshka", "guide", "distill")}
    assert objectives["objective guide"]["numbers"]["frozen_models"]  # the guide's memory line
    assert objectives["objective distill"]["numbers"]["frozen_s_per_step"] > 0
