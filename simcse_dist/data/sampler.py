"""The batch arithmetic and the sampler: sources -> this rank's micro-batches of row indices,
the same global batches at every world size.

The order is a pure function of (seed, epoch, step) (order.py): each step's global batch is a
run of `global_batch_size` positions of one source's keyed permutation, cut into `grad_accum`
chunks (one per micro-step), and each chunk into `world_size` contiguous slices, rank-major.
So the concatenation of all ranks' micro-batches is exactly what one process would see with the
same global batch, which is what makes N ranks reproduce one process (and makes resuming a
matter of two integers). Nothing here holds a per-row array.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simcse_dist.data.order import Mixture, Permutation, derive_key
from simcse_dist.data.packing import balanced_order
from simcse_dist.data.readers import DataError


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Batch arithmetic: global = world_size x grad_accum x micro; an epoch is one pass over
    every source, `batches_per_source[i]` global batches of source i."""

    source_rows: tuple[int, ...]
    global_batch_size: int
    world_size: int
    grad_accum: int
    drop_last: bool = True

    @property
    def num_examples(self) -> int:
        return sum(self.source_rows)

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.world_size * self.grad_accum)

    @property
    def batches_per_source(self) -> tuple[int, ...]:
        big_b = self.global_batch_size
        return tuple(n // big_b if self.drop_last else -(-n // big_b) for n in self.source_rows)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_source)

    @property
    def dropped_per_epoch(self) -> int:
        return sum(n % self.global_batch_size for n in self.source_rows) if self.drop_last else 0


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """This rank's rows of one micro-step, all of one source. Every rank holds the same number
    of rows (the gather needs equal shapes, ZeRO-3 needs every rank to forward); rows past
    `valid` are padding (copies of a real example) that the loss masks out."""

    indices: list[int]
    valid: int
    full: bool = True
    """Every rank's share of this micro-step is complete (no padding anywhere)."""
    source: int = 0


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous, as even as possible, larger parts first (numpy.array_split's rule)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class GlobalBatchSampler:
    """Index lists of this rank's micro-batches; see the module docstring for the layout.

    With `drop_last=False` (one source) the last global batch of an epoch is short: it is split
    as evenly as possible over micro-steps and ranks, and shorter shares are padded
    (`MicroBatch.valid`).
    """

    def __init__(
        self,
        plan: BatchPlan,
        rank: int,
        seed: int,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        row_tokens: Callable[[int, list[int]], np.ndarray] | None = None,
        balance_micro_steps: bool = False,
    ) -> None:
        """row_tokens(source, rows) -> tokens per row: balance each full step's rows by tokens over
        the ranks, and over the micro-steps too with `balance_micro_steps` (gradient caching,
        where the loss spans the whole step); None keeps the contiguous slices."""
        empty = [i for i, b in enumerate(plan.batches_per_source) if b == 0]
        if empty:
            i = empty[0]
            raise DataError(
                (f"{names[i]}: " if names else "") + f"{plan.source_rows[i]} training examples are fewer than one "
                f"global batch (train.global_batch_size={plan.global_batch_size})"
                + ("; set data.drop_last=false to train on them" if len(plan.source_rows) == 1 else "")
            )
        self.plan, self.rank, self.seed, self.shuffle = plan, rank, seed, shuffle
        self.mixture = Mixture(plan.batches_per_source, weights or [1.0] * len(plan.source_rows), seed)
        self.row_tokens, self.balance_micro_steps = row_tokens, balance_micro_steps
        self._balanced_step: tuple[int, list[int]] | None = None  # DataLoader workers ask once per micro-step

    def balanced(self, source: int, examples: list[int]) -> list[int]:
        """A full step's rows reordered so that the contiguous slices below carry about equal
        tokens: a pure function of the rows' token counts and the slice count (design.md, data
        order, step 5). The loss is invariant to which rank or micro-step holds a row as long as
        the negatives span the same rows, so the update does not change."""
        p = self.plan
        parts = p.grad_accum * p.world_size
        if self.row_tokens is None or len(examples) != p.global_batch_size or len(examples) % parts:
            return examples
        costs = self.row_tokens(source, examples)
        rows = np.asarray(examples, dtype=np.int64)
        if self.balance_micro_steps or p.grad_accum == 1:
            return rows[balanced_order(costs, parts)].tolist()
        chunk = len(examples) // p.grad_accum  # negatives per micro-step: balance within each
        out = []
        for a in range(p.grad_accum):
            part = slice(a * chunk, (a + 1) * chunk)
            out += rows[part][balanced_order(costs[part], p.world_size)].tolist()
        return out

    def step_examples(self, step: int) -> tuple[int, list[int]]:
        """(source, the global batch of one optimizer step in the order one process sees it)."""
        p = self.plan
        epoch, s = divmod(step, p.steps_per_epoch)
        source, stream = (int(x[0]) for x in self.mixture.at(epoch, np.array([s])))
        n, big_b = p.source_rows[source], p.global_batch_size
        source_epoch, b = divmod(stream, p.batches_per_source[source])
        positions = np.arange(b * big_b, min((b + 1) * big_b, n))
        if self.shuffle:
            positions = Permutation(n, derive_key(self.seed, source, source_epoch))(positions)
        return source, positions.tolist()

    def micro_batches(self, step: int) -> list[MicroBatch]:
        p = self.plan
        source, examples = self.step_examples(step)
        if self.row_tokens is not None:
            if self._balanced_step is None or self._balanced_step[0] != step:
                self._balanced_step = (step, self.balanced(source, examples))
            examples = self._balanced_step[1]
        out = []
        for chunk in _split(examples, p.grad_accum):  # one chunk per micro-step
            shares = _split(chunk, p.world_size)  # rank-major contiguous slices
            rows = max(1, len(shares[0]))  # the first share is the largest
            mine = shares[self.rank]
            filler = (mine or chunk or examples)[:1]
            full = len(chunk) == rows * p.world_size
            out.append(MicroBatch(mine + filler * (rows - len(mine)), len(mine), full, source))
        return out

    def iter_steps(self, start_step: int, total_steps: int) -> Iterator[tuple[int, list[MicroBatch]]]:
        """Yield (global_step, [this rank's MicroBatch per micro-step]) for start_step..total_steps-1."""
        for step in range(start_step, total_steps):
            yield step, self.micro_batches(step)


class StepKeys(torch.utils.data.Sampler):
    """(step, micro-step) keys for steps start..total-1, in training order (a DataLoader sampler)."""

    def __init__(self, start: int, total: int, grad_accum: int) -> None:
        self.start, self.total, self.grad_accum = start, total, grad_accum

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((step, j) for step in range(self.start, self.total) for j in range(self.grad_accum))

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.grad_accum


class StepBatches(torch.utils.data.Dataset):
    """(step, micro-step) -> `prepare(MicroBatch)` of this rank: what DataLoader workers run.
    The sampler is deterministic in (seed, epoch, step), so workers need no shared state."""

    def __init__(self, sampler: GlobalBatchSampler, prepare) -> None:
        self.sampler, self.prepare = sampler, prepare

    def __getitem__(self, key: tuple[int, int]):
        step, micro_step = key
        return self.prepare(self.sampler.micro_batches(step)[micro_step])
