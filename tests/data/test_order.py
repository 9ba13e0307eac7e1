"""order.py and the sampler over it: keyed permutations without tables, the same global batches at
1, 2 and 3 ranks and after a world-size change, mixtures whose steps each come from one source."""

from __future__ import annotations

import numpy as np
import pytest
from reference import feistel

from simcse_dist.data.order import Mixture, Permutation, apportion, derive_key
from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 1000, 4099])
def test_permutation_is_a_bijection_equal_to_the_written_out_network(n):
    perm = Permutation(n, derive_key(3, 1))
    rows = perm(np.arange(n))
    assert sorted(rows.tolist()) == list(range(n))
    assert rows.tolist() == [feistel(n, derive_key(3, 1), p) for p in range(n)]


def test_permutation_at_a_billion_rows_matches_the_reference_at_scattered_positions():
    n = 10**9 + 7
    positions = np.array([0, 1, 12345, 5 * 10**8, n - 1])
    assert Permutation(n, 99)(positions).tolist() == [feistel(n, 99, int(p)) for p in positions]


def test_keys_give_different_orders_and_the_order_looks_shuffled():
    a, b = Permutation(1000, 1)(np.arange(1000)), Permutation(1000, 2)(np.arange(1000))
    assert (a != b).mean() > 0.9
    # a shuffle, not a rotation: consecutive positions land far apart
    assert np.median(np.abs(np.diff(a))) > 100


def _global_batches(plan_args, world: int, steps: range, weights=None, start: int | None = None):
    """{step: (source, rank-major concatenation of every micro-batch)} as `world` ranks see it."""
    rows, big_b, accum = plan_args
    samplers = [GlobalBatchSampler(BatchPlan(rows, big_b, world, accum), r, 11, True, weights) for r in range(world)]
    out = {}
    for step in steps:
        micro = [s.micro_batches(step) for s in samplers]
        sources = {mb.source for per_rank in micro for mb in per_rank}
        assert len(sources) == 1  # every micro-step of every rank: one source
        out[step] = (sources.pop(), [i for m in range(accum) for r in range(world) for i in micro[r][m].indices])
    return out


@pytest.mark.parametrize("rows,weights", [((100,), None), ((60, 37, 90), [1.0, 2.0, 0.5])])
def test_identical_global_batches_at_one_two_and_three_ranks(rows, weights):
    steps = range(0, 40)
    one = _global_batches((rows, 12, 1), 1, steps, weights)
    for world, accum in [(2, 1), (3, 1), (2, 2), (3, 2)]:
        assert _global_batches((rows, 12, accum), world, steps, weights) == one
    for source, batch in one.values():
        assert len(batch) == 12 and all(0 <= i < rows[source] for i in batch)


def test_resuming_at_another_world_size_continues_the_same_order():
    rows, weights = (50, 80), [1.0, 1.0]
    uninterrupted = _global_batches((rows, 6, 1), 2, range(30), weights)
    resumed = _global_batches((rows, 6, 1), 3, range(13, 30), weights)  # a checkpoint at step 13
    assert resumed == {s: uninterrupted[s] for s in range(13, 30)}


def test_mixture_gives_each_source_its_share_of_every_epoch():
    rows, big_b, weights = (600, 250, 1200), 10, [3.0, 1.0, 1.0]
    plan = BatchPlan(rows, big_b, 1, 1)
    smp = GlobalBatchSampler(plan, 0, 7, True, weights)
    spe = plan.steps_per_epoch
    assert spe == 60 + 25 + 120
    for epoch in range(3):
        sources = [smp.step_examples(s)[0] for s in range(epoch * spe, (epoch + 1) * spe)]
        counts = np.bincount(sources, minlength=3)
        target = spe * np.array(weights) / sum(weights)
        assert counts.sum() == spe and np.all(np.abs(counts - target) < 1), (counts, target)
        assert smp.mixture.steps_before((epoch + 1) * spe) == (counts * (epoch + 1)).tolist()
    epoch0 = [smp.step_examples(s) for s in range(spe)]
    by_source = [[i for src, batch in epoch0 if src == k for i in batch] for k in range(3)]
    # drawn more often than it has batches (41 steps, 25 batches): every row at least once in the epoch
    assert set(by_source[1]) == set(range(250)) and len(by_source[1]) == 410
    # drawn less often (41 steps, 120 batches): no row twice in the epoch; the next epochs go on
    assert len(set(by_source[2])) == len(by_source[2]) == 410
    epoch1 = [i for s in range(spe, 2 * spe) for src, batch in [smp.step_examples(s)] if src == 2 for i in batch]
    assert set(by_source[2]).isdisjoint(epoch1) and len(set(epoch1)) == 410  # still the first pass
    # the schedule interleaves sources instead of running them in blocks
    assert len({tuple(sources[i : i + 10]) for i in range(0, 100, 10)}) > 1 and sources != sorted(sources)


def test_steps_before_counts_the_schedule():
    m = Mixture([5, 3, 9], [1, 1, 1], seed=4)
    sources = [int(m.at(s // 17, np.array([s % 17]))[0][0]) for s in range(40)]
    for step in (0, 1, 16, 17, 18, 39):
        assert m.steps_before(step) == np.bincount(sources[:step], minlength=3).tolist()


def test_apportion_is_within_one_of_the_share_and_sums_exactly():
    for weights, total in [([1, 1, 1], 10), ([0.7, 0.2, 0.1], 33), ([5, 1e-3], 4)]:
        out = apportion(weights, total)
        share = total * np.array(weights) / sum(weights)
        assert sum(out) == total and np.all(np.abs(np.array(out) - share) < 1)
