"""Gradient caching details that need no second process: RNG replay, memory per chunk."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEMO_DATA

from simcse_dist.config import load_config
from simcse_dist.train.trainer import Trainer


@pytest.mark.parametrize("objective,data", [("unsup", "wiki-demo.txt"), ("sup", "nli-demo.tsv")])
def test_rng_replay_reencodes_the_cached_embeddings_bit_for_bit(
    tiny_bert, tmp_path, single_process_group, objective, data
):
    """Dropout on: the re-encoding pass must draw the same masks as the cached pass, or the
    unsupervised positives (two dropout views) would differ between the loss and its gradient."""
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "model.dropout=0.1",
            f"train.objective={objective}",
            f"data.train_file={DEMO_DATA / data}",
            "train.global_batch_size=16",
            "train.grad_accum=4",
            "train.grad_cache=true",
            "train.max_steps=1",
            f"train.output_dir={tmp_path}",
            "log.wandb_mode=disabled",
        ],
    )
    trainer = Trainer(cfg, single_process_group)
    trainer.setup()
    outputs: list[torch.Tensor] = []
    trainer.encoder.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    _, batches = next(trainer.data.steps(0, 1, trainer.engine.device))
    loss = trainer.forward_backward(batches).loss
    assert len(outputs) == 8  # 4 cached chunks, then 4 re-encoded ones
    for cached, again in zip(outputs[:4], outputs[4:], strict=True):
        assert torch.equal(cached, again)
    assert not torch.equal(outputs[0][:, 0], outputs[0][:, 1]) or objective == "sup"  # dropout is on
    # The cached loss is the loss of the re-encoded embeddings (the uncached computation).
    uncached, _ = trainer.loss_fns[0](
        torch.cat(outputs[4:]), None, torch.cat([b.ids for b in batches]) if batches[0].ids is not None else None
    )
    assert loss.item() == pytest.approx(uncached.item(), rel=1e-6)


def test_masked_negatives_are_counted_and_logged(tiny_bert, tmp_path, single_process_group):
    """train/masked_negatives = the (anchor, candidate) pairs the written-out rule excludes."""
    rows = (DEMO_DATA / "nli-demo.tsv").read_text().splitlines()
    fields = [r.split("\t") for r in rows[1:17]]
    for i in range(1, 16, 2):  # pairs of rows share a premise, as NLI hypotheses of one premise do
        fields[i][0] = fields[i - 1][0]
    data = tmp_path / "dup.tsv"
    data.write_text("\n".join([rows[0], *("\t".join(f) for f in fields)]) + "\n")
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "train.objective=sup",
            f"data.train_file={data}",
            "train.global_batch_size=16",
            "train.max_steps=1",
            "log.every_steps=1",
            f"train.output_dir={tmp_path / 'out'}",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
        ],
    )
    Trainer(cfg, single_process_group).train()
    logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    texts = [tuple(f) for f in fields]
    expected = sum(
        1 for i in range(16) for j in range(16) if j != i and (texts[j][1] == texts[i][1] or texts[j][0] == texts[i][0])
    )
    expected += sum(1 for i in range(16) for j in range(16) if texts[j][2] == texts[i][1])
    assert expected == 16  # each anchor masks its premise-sibling's entailment
    assert logged["train/masked_negatives"] == expected
