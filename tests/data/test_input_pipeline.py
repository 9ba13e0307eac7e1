"""The input pipeline's options change nothing but speed: prepared corpora (read by DataLoader
workers or in-process) give the same training as tokenizing every micro-batch's texts in the step."""

from __future__ import annotations

import pytest
from helpers import DEMO_DATA, read_jsonl

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.data.collate import Collator
from simcse_dist.data.readers import load_examples
from simcse_dist.train.trainer import Trainer


def _train(tiny_bert, out, objective, data, *overrides, on_the_fly: bool = False) -> list[tuple[float, float]]:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "model.dropout=0.1",
            f"train.objective={objective}",
            f"data.train_file={DEMO_DATA / data}",
            "train.global_batch_size=8",
            "train.max_steps=4",
            "log.every_steps=1",
            f"train.output_dir={out}",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, du.DistEnv.from_env({}))
    trainer.setup()
    if on_the_fly:  # the reference: the texts of each micro-batch through the tokenizer
        examples, _ = load_examples(str(DEMO_DATA / data), None, objective)
        collator = Collator(trainer.tokenizer, cfg.data.max_seq_len, objective)
        trainer.data.collators[0] = lambda indices: collator([examples[i] for i in indices])
    trainer.train()
    return [(r["train/loss"], r["train/grad_norm"]) for r in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.parametrize("objective,data", [("unsup", "wiki-demo.txt"), ("sup", "nli-demo.tsv")])
def test_prepared_data_and_workers_train_exactly_as_on_the_fly_tokenization(
    tiny_bert, tmp_path, single_process_group, objective, data
):
    """Dropout on, so equal losses also mean the DataLoader left the dropout RNG untouched."""
    cache = tmp_path / "cache"
    reference = _train(tiny_bert, tmp_path / "fly", objective, data, f"data.cache_dir={cache}", on_the_fly=True)
    prepared = _train(tiny_bert, tmp_path / "prepared", objective, data, f"data.cache_dir={cache}")
    workers = _train(tiny_bert, tmp_path / "workers", objective, data, f"data.cache_dir={cache}", "data.num_workers=2")
    assert len(reference) == 4 and len(set(reference)) == 4
    assert prepared == reference and workers == reference
    entries = [d for d in cache.iterdir() if d.is_dir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()  # prepared once, then reused
