"""End-to-end runs through the real entry points (torchrun, deepspeed launcher, plain python)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, REPO, cli, ok, read_jsonl, run_gloo

TRAIN_FIELDS = {"step", "train/loss", "train/lr", "train/grad_norm", "train/sentences_per_s", "train/tokens_per_s"}


@pytest.mark.slow
def test_two_ranks_train_minilm_on_wiki_sample(shared_data, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "token-cache"
    proc = ok(
        cli(
            [
                "--config",
                "configs/demo.yaml",
                f"data.train_file={shared_data / 'wiki1m-sample.txt'}",
                f"eval.sts_dev_file={DEMO_DATA / 'sts-demo.tsv'}",  # 101 pairs: STS-B dev's 1,500 add nothing here
                "eval.every_steps=10",
                "train.max_steps=20",
                "train.global_batch_size=16",
                "log.every_steps=1",
                "log.wandb_mode=disabled",
                "engine.zero_stage=2",
                f"train.output_dir={out}",
                f"data.cache_dir={cache}",
            ],
            launcher="torchrun",
            nproc=2,
        )
    )
    # Prepared once (both ranks taking units, rank 0 reporting): one complete entry, no partial build left over.
    assert proc.stdout.count("preparing wiki1m-sample.txt:") == 2, proc.stdout  # its start and end lines
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert entry.name.startswith("wiki1m-sample.txt.") and (entry / "manifest.json").is_file()
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for r in train:
        assert TRAIN_FIELDS <= r.keys() and all(math.isfinite(r[k]) for k in TRAIN_FIELDS)
    losses = [r["train/loss"] for r in train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses}"
    evals = [r for r in rows if "eval/stsb_spearman" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0.5 < r["eval/stsb_spearman"] < 1 for r in evals)  # MiniLM is a strong model already
    assert all(0 < r["eval/align"] < 2 and -4 < r["eval/uniform"] < 0 for r in evals)  # the paper's Fig. 2 axes

    # best/ is the highest-scoring evaluation, and loads with plain transformers.
    from transformers import AutoModel, AutoTokenizer

    best = max(evals, key=lambda r: r["eval/stsb_spearman"])
    info = __import__("json").loads((out / "best" / "best_info.json").read_text())
    assert info["step"] == best["step"] and info["stsb_dev_spearman"] == pytest.approx(best["eval/stsb_spearman"])
    model, tok = AutoModel.from_pretrained(out / "best"), AutoTokenizer.from_pretrained(out / "best")
    with torch.no_grad():
        h = model(**tok(["A man is playing a guitar."], return_tensors="pt")).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()
    assert (out / "config.yaml").read_text().count("zero_stage: 2") == 1


def _runs_for_equality(tiny_bert: Path, tmp_path: Path, stage: int, launcher: str) -> tuple[list, list]:
    common = [
        "--config",
        "configs/demo.yaml",
        f"model.name_or_path={tiny_bert}",
        "model.dropout=0",
        f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}",
        "train.global_batch_size=12",
        "train.max_steps=3",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        f"engine.zero_stage={stage}",
        "optim.lr=1e-3",
    ]
    # One rank prepares batches in the step; two ranks through a DataLoader worker each.
    ok(cli([*common, f"train.output_dir={tmp_path / 'one'}"]))
    ok(cli([*common, f"train.output_dir={tmp_path / 'two'}", "data.num_workers=1"], launcher=launcher, nproc=2))

    def steps(run: str) -> list[dict]:  # the training records (the demo config also evaluates at the end)
        return [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]

    return steps("one"), steps("two")


@pytest.mark.slow
@pytest.mark.parametrize("stage,launcher", [(0, "torchrun"), (2, "deepspeed")])
def test_one_rank_and_two_ranks_log_the_same_loss_and_grad_norm(tiny_bert, tmp_path, stage, launcher):
    """The outside check: same global batch, seed and data, dropout 0, fp32 -> same train/loss and
    train/grad_norm for the first steps (rel. diff <= 1e-4), whether 1 or 2 ranks share the batch."""
    one, two = _runs_for_equality(tiny_bert, tmp_path, stage, launcher)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    # The run actually trains: the loss moves between steps (lr 1e-3), so equality is not vacuous.
    assert abs(one[0]["train/loss"] - one[2]["train/loss"]) > 1e-3


@pytest.mark.slow
def test_bf16_smoke_every_zero_stage_with_sharded_eval(tiny_bert, tmp_path):
    """bf16 at ZeRO 0-3 on 2 ranks, with STS evaluation (every rank forwards: ZeRO-3 needs it)."""
    triplets = (DEMO_DATA / "nli-demo.tsv").read_text().splitlines()[1:42]
    dev = tmp_path / "dev.tsv"  # 41 pairs: an odd count, so the ranks' shares need padding
    dev.write_text(
        "sentence1\tsentence2\tscore\n"
        + "".join(
            f"{t.split(chr(9))[0]}\t{t.split(chr(9))[1 + i % 2]}\t{5.0 if i % 2 == 0 else 1.0}\n"
            for i, t in enumerate(triplets)
        )
    )
    run_gloo(
        REPO / "tests" / "workers" / "train_worker.py",
        2,
        [
            "--out",
            str(tmp_path),
            "--stages",
            "0,1,2,3",
            f"model.name_or_path={tiny_bert}",
            f"data.train_file={DEMO_DATA / 'nli-demo.tsv'}",
            "train.objective=sup",
            "engine.precision=bf16",
            "train.global_batch_size=16",
            "train.max_steps=4",
            "log.every_steps=2",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
            f"eval.sts_dev_file={dev}",
            "eval.every_steps=2",
            "eval.batch_size=8",
        ],
    )
    for stage in range(4):
        rows = read_jsonl(tmp_path / f"z{stage}" / "metrics.jsonl")
        train = [r for r in rows if "train/loss" in r]
        assert [r["step"] for r in train] == [2, 4]
        assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in train)
        evals = [r["eval/stsb_spearman"] for r in rows if "eval/stsb_spearman" in r]
        assert len(evals) == 2 and all(-1 <= e <= 1 for e in evals)
        assert (tmp_path / f"z{stage}" / "best" / "model.safetensors").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_malformed_row_names_file_and_line(tiny_bert, tmp_path, nproc):
    """With 2 ranks rank 0 prepares the file while rank 1 waits (distributed.main_first): rank 0's
    error ends both at once, not after engine.dist_timeout_s (600 s)."""
    bad = tmp_path / "bad.tsv"
    bad.write_text("sent0\tsent1\thard_neg\na\tb\tc\nonly\ttwo\n")
    t0 = time.monotonic()
    proc = cli(
        [
            "--config",
            "configs/demo.yaml",
            f"model.name_or_path={tiny_bert}",
            f"data.train_file={bad}",
            "train.objective=sup",
            f"train.output_dir={tmp_path / 'out'}",
            "log.wandb_mode=disabled",
        ],
        launcher="forked" if nproc == 1 else "torchrun",
        nproc=nproc,
    )
    assert proc.returncode == (2 if nproc == 1 else 1)  # torchrun reports a failed rank with 1
    assert f"{bad}:3: expected 3 fields" in proc.stderr
    assert time.monotonic() - t0 < 120


@pytest.mark.slow
def test_bf16_grad_cache_with_short_last_batch_every_zero_stage(tiny_bert, tmp_path):
    """Gradient caching through DeepSpeed's bf16 engine at ZeRO 0-3 on 2 ranks, across an epoch
    end with drop_last=false (216 triplets, 16 per step: step 14 holds the last 8)."""
    run_gloo(
        REPO / "tests" / "workers" / "train_worker.py",
        2,
        [
            "--out",
            str(tmp_path),
            "--stages",
            "0,1,2,3",
            f"model.name_or_path={tiny_bert}",
            f"data.train_file={DEMO_DATA / 'nli-demo.tsv'}",
            "train.objective=sup",
            "engine.precision=bf16",
            "train.global_batch_size=16",
            "train.grad_accum=2",
            "train.grad_cache=true",
            "data.drop_last=false",
            "train.max_steps=14",
            "log.every_steps=7",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
        ],
    )
    for stage in range(4):
        rows = read_jsonl(tmp_path / f"z{stage}" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [7, 14]
        assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows)
