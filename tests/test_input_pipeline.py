"""The input pipeline's options change nothing but speed: the token cache and DataLoader workers
give the same training as tokenizing in the step."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO_DATA, read_jsonl

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.trainer import Trainer


def _train(tiny_bert, out, objective, data, *overrides) -> tuple[list[tuple[float, float]], Trainer]:
    cfg = load_config(None, [f"model.name_or_path={tiny_bert}", "model.dropout=0.1", f"train.objective={objective}",
                             f"data.train_file={DEMO_DATA / data}", "train.global_batch_size=8", "train.max_steps=4",
                             "log.every_steps=1", f"train.output_dir={out}", "log.wandb_mode=disabled",
                             "log.progress_bar=false", "checkpoint.every_steps=0", *overrides])
    trainer = Trainer(cfg, du.DistEnv.from_env({}), quiet=True)
    trainer.train()
    rows = read_jsonl(out / "metrics.jsonl")
    return [(r["train/loss"], r["train/grad_norm"]) for r in rows], trainer


@pytest.mark.parametrize("objective,data", [("unsup", "wiki-demo.txt"), ("sup", "nli-demo.tsv")])
def test_token_cache_and_workers_train_exactly_as_on_the_fly_tokenization(tiny_bert, tmp_path, single_process_group,
                                                                          objective, data):
    """Dropout on, so equal losses also mean the DataLoader left the dropout RNG untouched."""
    cache = tmp_path / "cache"
    reference, _ = _train(tiny_bert, tmp_path / "fly", objective, data, "data.token_cache=false")
    cached, t1 = _train(tiny_bert, tmp_path / "cached", objective, data, f"data.cache_dir={cache}")
    workers, t2 = _train(tiny_bert, tmp_path / "workers", objective, data, f"data.cache_dir={cache}",
                         "data.num_workers=2")
    fly_workers, _ = _train(tiny_bert, tmp_path / "fly-workers", objective, data, "data.token_cache=false",
                            "data.num_workers=1")
    assert len(reference) == 4 and len(set(reference)) == 4
    assert cached == reference and workers == reference and fly_workers == reference
    assert t1.data.collate.cache.tokenized and not t2.data.collate.cache.tokenized  # built once, then reused
    entries = [d for d in cache.iterdir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["num_columns"] == (1 if objective == "unsup" else 3)
