"""Chinese end to end and the seed sweep, in one run to keep it fast: a WordPiece tokenizer
trained here on the Chinese data + a tiny BERT, supervised SimCSE on the OCNLI triplets, dev
evaluation on CNSD STS-B in training, then `simcse-sweep` over 2 seeds with 2 gloo ranks each,
checked against a written-out mean/std and an independent Spearman of one seed's best/."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from eval_reference import cosine, documented_embeddings, spearman_by_hand
from helpers import REPO, SHARED_DATA

from simcse_dist.cli.sweep import eval_command, summarize, train_command

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


def _tsv_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n")[1:] if line]


@pytest.fixture(scope="module")
def chinese_bert(tmp_path_factory) -> Path:
    """Tiny BERT with a character-level WordPiece vocabulary learned from the Chinese files."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("zh-bert")
    texts = [f for row in _tsv_rows(SHARED_DATA / "cnsd-stsb" / "train.tsv") for f in row[:2]]
    texts += [f for row in _tsv_rows(SHARED_DATA / "zh-nli-ocnli.tsv") for f in row]
    wordpiece = BertWordPieceTokenizer(handle_chinese_chars=True, lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=8000, min_frequency=1, limit_alphabet=8000)
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.3,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    return out


@needs_data
def test_chinese_tokenizer_covers_the_dev_set(chinese_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chinese_bert)
    assert tokenizer.tokenize("一个戴着安全帽的男人在跳舞。") == list("一个戴着安全帽的男人在跳舞。")
    dev = [s for row in _tsv_rows(SHARED_DATA / "cnsd-stsb" / "dev.tsv") for s in row[:2]]
    ids = [i for row in tokenizer(dev)["input_ids"] for i in row]
    assert sum(i == tokenizer.unk_token_id for i in ids) / len(ids) < 0.01


def test_sweep_commands_use_torchrun_only_for_several_ranks(tmp_path):
    one = train_command("c.yaml", 3, tmp_path / "seed-3", ["train.max_steps=2"], 1)
    assert one[1:] == [
        "-m",
        "simcse_dist.cli",
        "--config",
        "c.yaml",
        "train.max_steps=2",
        "train.seed=3",
        f"train.output_dir={tmp_path / 'seed-3'}",
    ]
    two = train_command("c.yaml", 3, tmp_path / "seed-3", [], 2)
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    args = type(
        "A",
        (),
        {"nproc_per_node": 2, "tasks": "stsb", "split": "dev", "data_dir": "d", "precision": "fp32", "pooler": None},
    )()
    cmd = eval_command(tmp_path / "seed-3", args, tmp_path / "e.json")
    assert "torch.distributed.run" in cmd and "simcse_dist.cli.eval" in cmd


def test_summarize_mean_and_sample_std():
    got = summarize({1: {"stsb": 70.0, "avg": 70.0}, 2: {"stsb": 74.0, "avg": 74.0}, 3: {"stsb": 75.0, "avg": 75.0}})
    # mean 73, sample variance ((-3)^2 + 1^2 + 2^2) / 2 = 7
    assert got["mean"]["stsb"] == pytest.approx(73.0) and got["std"]["stsb"] == pytest.approx(math.sqrt(7))


@needs_data
@pytest.mark.slow
def test_chinese_sweep_end_to_end(tmp_path, chinese_bert):
    config = {
        "model": {"name_or_path": str(chinese_bert), "pooler": "cls", "mlp_only_train": False},
        "data": {"train_file": str(SHARED_DATA / "zh-nli-ocnli.tsv"), "max_seq_len": 32},
        "train": {"objective": "sup", "global_batch_size": 16, "max_steps": 3, "output_dir": str(tmp_path / "sweep")},
        "optim": {"lr": 1e-3},
        "engine": {"zero_stage": 2},
        "eval": {"sts_dev_file": str(SHARED_DATA / "cnsd-stsb" / "dev.tsv"), "every_steps": 3},
        "log": {"wandb_mode": "disabled", "progress_bar": False},
    }
    (tmp_path / "zh.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "simcse_dist.cli.sweep",
        "--config",
        str(tmp_path / "zh.yaml"),
        "--seeds",
        "1,2",
        "--tasks",
        "cnsd-stsb",
        "--split",
        "dev",
        "--data-dir",
        str(SHARED_DATA),
        "--nproc-per-node",
        "2",
        "log.every_steps=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "CNSD-STSB" in proc.stdout and "±" in proc.stdout

    result = json.loads((tmp_path / "sweep" / "sweep-dev.json").read_text())
    assert result["seeds"] == [1, 2]
    scores = [result["per_seed"][s]["cnsd-stsb"] for s in ("1", "2")]
    assert scores[0] != scores[1]  # the seed changes data order and MLP init
    assert result["mean"]["cnsd-stsb"] == pytest.approx((scores[0] + scores[1]) / 2)
    assert result["std"]["cnsd-stsb"] == pytest.approx(abs(scores[0] - scores[1]) / math.sqrt(2))
    for seed in (1, 2):
        run = tmp_path / "sweep" / f"seed-{seed}"
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
        assert (run / "best" / "2_Dense" / "model.safetensors").is_file()  # cls keeps its MLP

    # seed 1's number, recomputed independently from its best/ with AutoModel + [CLS] + MLP
    rows = _tsv_rows(SHARED_DATA / "cnsd-stsb" / "dev.tsv")
    unique = list(dict.fromkeys([r[0] for r in rows] + [r[1] for r in rows]))
    emb = documented_embeddings(tmp_path / "sweep" / "seed-1" / "best", unique)
    index = {s: i for i, s in enumerate(unique)}
    sims = cosine(emb[[index[r[0]] for r in rows]], emb[[index[r[1]] for r in rows]])
    # a tiny random model has many near-equal cosines, so ~1e-7 padding noise may swap a few ranks
    assert 100 * spearman_by_hand(sims, [float(r[2]) for r in rows]) == pytest.approx(scores[0], abs=1e-3)
