"""The input pipeline's options change nothing but speed: the token cache and DataLoader workers
give the same training as tokenizing in the step; and the ZeRO stage the engine builds."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO_DATA, read_jsonl

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.engine import built_zero_stage, deepspeed_config
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
    assert t1.collate.cache.tokenized and not t2.collate.cache.tokenized  # built once, then reused
    entries = [d for d in cache.iterdir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["num_columns"] == (1 if objective == "unsup" else 3)


def _ds_json(tmp_path, zero: dict) -> str:
    path = tmp_path / f"ds-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return str(path)


def test_one_rank_builds_zero_1_and_2_as_stage_0(tmp_path):
    def stage(zero_stage: int, world: int, ds: dict | None = None) -> int:
        over = [f"engine.zero_stage={zero_stage}", "train.global_batch_size=12"]
        if ds is not None:
            over.append(f"engine.deepspeed_config={_ds_json(tmp_path, ds)}")
        cfg = load_config(None, over)
        built = built_zero_stage(cfg, world)
        assert deepspeed_config(cfg, world)["zero_optimization"]["stage"] == built
        return built

    assert [stage(s, 1) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [stage(s, 2) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert stage(2, 1, {"offload_optimizer": {"device": "cpu"}}) == 2  # offload is about memory: kept
    assert stage(2, 1, {"offload_optimizer": {"device": "none"}}) == 0
    assert stage(1, 1, {"stage": 1}) == 1  # asked for explicitly in the DeepSpeed JSON
    assert stage(2, 1, {"reduce_bucket_size": 1000}) == 0
