"""Sampler and collator: the same global batches at every world size, equal shares, dynamic padding."""

from __future__ import annotations

import pytest
import torch
from helpers import DEMO_DATA
from reference import global_batch_indices
from transformers import AutoTokenizer

from simcse_dist.data.collate import Collator
from simcse_dist.data.readers import DataError, load_examples
from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 4)])
def test_ranks_partition_the_single_process_global_batch(world, accum):
    n, big_b, seed = 100, 24, 5
    plan = BatchPlan((n,), big_b, world, accum)
    samplers = [GlobalBatchSampler(plan, r, seed) for r in range(world)]
    spe = plan.steps_per_epoch
    assert spe == 4 and plan.dropped_per_epoch == 4
    seen_epoch0 = []
    for step in range(2 * spe):
        epoch, s = divmod(step, spe)
        per_rank = [[mb.indices for mb in dict(smp.iter_steps(step, step + 1))[step]] for smp in samplers]
        for micro in range(accum):
            chunk = [i for r in range(world) for i in per_rank[r][micro]]  # rank-major concatenation
            assert all(len(per_rank[r][micro]) == big_b // (world * accum) for r in range(world))
            expected = global_batch_indices(n, big_b, seed, step)
            size = big_b // accum
            assert chunk == expected[micro * size : (micro + 1) * size]
            if epoch == 0:
                seen_epoch0 += chunk
    assert len(seen_epoch0) == len(set(seen_epoch0)) == spe * big_b  # nothing seen twice in an epoch


@pytest.mark.parametrize("world,accum", [(2, 1), (3, 1), (2, 2), (4, 1)])
def test_without_drop_last_every_example_is_seen_once_per_epoch(world, accum):
    n, big_b = 29, 12  # 2 full global batches + 5 left over
    plan = BatchPlan((n,), big_b, world, accum, drop_last=False)
    assert plan.steps_per_epoch == 3 and plan.dropped_per_epoch == 0
    samplers = [GlobalBatchSampler(plan, r, seed=1) for r in range(world)]
    seen = []
    for step in range(3):
        shares = [dict(smp.iter_steps(step, step + 1))[step] for smp in samplers]
        for micro in range(accum):
            rows = {len(shares[r][micro].indices) for r in range(world)}
            assert len(rows) == 1  # every rank holds the same number of rows (padding included)
            real = [i for r in range(world) for i in shares[r][micro].indices[: shares[r][micro].valid]]
            valid = [shares[r][micro].valid for r in range(world)]
            (row_count,) = rows
            # "full" means no rank pads this micro-step, and all ranks agree on it
            assert {shares[r][micro].full for r in range(world)} == {sum(valid) == row_count * world}
            seen += real
    assert sorted(seen) == list(range(n))
    assert seen == global_batch_indices(n, n, 1, 0)  # the single-process order


def test_thirteen_examples_on_two_ranks_split_seven_and_six():
    plan = BatchPlan((13,), 16, 2, 1, drop_last=False)
    a, b = (GlobalBatchSampler(plan, r, 0, shuffle=False).micro_batches(0)[0] for r in range(2))
    assert (a.indices, a.valid, b.indices[:6], b.valid, len(b.indices)) == (list(range(7)), 7, list(range(7, 13)), 6, 7)


def test_epochs_reshuffle_and_no_shuffle_keeps_order():
    plan = BatchPlan((10,), 5, 1, 1)
    smp = GlobalBatchSampler(plan, 0, seed=0)
    assert smp.step_examples(0)[1] != smp.step_examples(2)[1]  # epochs 0 and 1
    assert sorted(smp.step_examples(2)[1] + smp.step_examples(3)[1]) == list(range(10))
    assert GlobalBatchSampler(plan, 0, 0, shuffle=False).step_examples(7) == (0, [5, 6, 7, 8, 9])


def test_fewer_examples_than_a_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatchSampler(BatchPlan((10,), 16, 1, 1), 0, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def test_unsup_collator_repeats_and_pads_dynamically(tokenizer):
    col = Collator(tokenizer, max_seq_len=32, objective="unsup")
    batch = col([("a short one",), ("a somewhat longer sentence than the other",)])
    ids = batch["input_ids"]
    longest = len(tokenizer("a somewhat longer sentence than the other")["input_ids"])
    assert ids.shape == (2, 2, longest) and longest < 32  # padded to the batch, not to max_seq_len
    assert torch.equal(ids[:, 0], ids[:, 1])
    assert batch["attention_mask"][0, 0].sum() == len(tokenizer("a short one")["input_ids"])


def test_sup_collator_shapes_and_truncation(tokenizer):
    col = Collator(tokenizer, max_seq_len=8, objective="sup")
    long = " ".join(["word"] * 50)
    batch = col([("p one", "h one", "n one"), (long, "h two", "n two")])
    assert batch["input_ids"].shape == (2, 3, 8)
    assert batch["input_ids"][1, 0, -1] == tokenizer.sep_token_id  # truncated, still ends with [SEP]


def test_load_examples_by_objective():
    unsup, blank = load_examples(str(DEMO_DATA / "nli-demo.tsv"), None, "unsup")
    assert all(len(e) == 1 for e in unsup) and blank == 0
    sup, _ = load_examples(str(DEMO_DATA / "nli-demo.tsv"), None, "sup")
    assert all(len(e) == 3 for e in sup) and sup[0][0] == unsup[0][0]
    with pytest.raises(DataError, match="wiki-demo.txt: train.objective=sup needs sent0,sent1"):
        load_examples(str(DEMO_DATA / "wiki-demo.txt"), None, "sup")
