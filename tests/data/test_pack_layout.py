"""data/packing.py: first-fit decreasing against a written-out reference, and the token-balanced
order: a permutation of the step's rows, every slice within one row's tokens of any other, the
same rows per step (and per micro-step without gradient caching) as the contiguous order."""

from __future__ import annotations

import numpy as np
import pytest

from simcse_dist.data.packing import balanced_order, first_fit_decreasing
from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler


def reference_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows as lists of sentence indices: sort by length (longest first, stable), each sentence
    into the first row it fits, a new row when none does."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row in rows:
            if sum(lengths[j] for j in row) + lengths[i] <= capacity:
                row.append(i)
                break
        else:
            rows.append([i])
    return rows


def test_first_fit_decreasing_matches_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacity = int(rng.integers(8, 64))
        lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 40)))
        row, offset = first_fit_decreasing(lengths, capacity)
        want = reference_ffd(lengths.tolist(), capacity)
        got = [sorted(np.flatnonzero(row == r).tolist(), key=lambda i: offset[i]) for r in range(row.max() + 1)]
        assert got == want


def test_a_sentence_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing(np.array([3, 9]), 8)


def test_balanced_order_bounds_the_spread():
    rng = np.random.default_rng(1)
    for _ in range(500):
        parts, size = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        costs = rng.integers(1, 200, parts * size)
        order = balanced_order(costs, parts)
        assert sorted(order.tolist()) == list(range(len(costs)))
        loads = costs[order].reshape(parts, size).sum(1)
        assert loads.max() - loads.min() <= costs.max()
        assert np.array_equal(order, balanced_order(costs.copy(), parts))  # a pure function


class Lengths:
    """row_tokens of a toy source: row i has (i * 37) % 50 + 1 tokens."""

    def __call__(self, source: int, rows):
        return (np.asarray(rows) * 37) % 50 + 1


@pytest.mark.parametrize("accum,grad_cache", [(1, False), (2, True), (2, False)])
def test_balanced_sampler_keeps_each_steps_rows(accum, grad_cache):
    big_b, n = 24, 240
    for step in range(3):
        plain = GlobalBatchSampler(BatchPlan((n,), big_b, 1, accum), 0, 5)
        want = [sorted(mb.indices) for mb in plain.micro_batches(step)]
        for world in (1, 2, 3):
            plan = BatchPlan((n,), big_b, world, accum)
            ranks = [
                GlobalBatchSampler(plan, r, 5, row_tokens=Lengths(), balance_micro_steps=grad_cache)
                for r in range(world)
            ]
            micro = [s.micro_batches(step) for s in ranks]  # [rank][micro-step]
            got = [sorted(i for r in range(world) for i in micro[r][a].indices) for a in range(accum)]
            if grad_cache:  # rows may move between micro-steps: the step's set is kept
                assert sorted(sum(got, [])) == sorted(sum(want, []))
            else:  # negatives per micro-step: each micro-step's set is kept
                assert got == want
            # balanced over every slice of the step (grad_cache), else over the ranks of each micro-step
            groups = (
                [[mb for per_rank in micro for mb in per_rank]]
                if grad_cache or accum == 1
                else [[micro[r][a] for r in range(world)] for a in range(accum)]
            )
            for group in groups:
                costs = [Lengths()(0, mb.indices) for mb in group]
                loads = [int(c.sum()) for c in costs]
                assert max(loads) - min(loads) <= max(int(c.max()) for c in costs)
