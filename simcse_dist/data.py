"""Training data: examples -> per-rank micro-batches of token ids, the same global batches at
every world size.

The order is a pure function of (seed, epoch, step): the epoch's permutation is cut into global
batches of `global_batch_size`, each global batch into `grad_accum` chunks (one per micro-step),
and each chunk into `world_size` contiguous slices, rank-major. So the concatenation of all
ranks' micro-batches is exactly what one process would see with the same global batch, which
is what makes N ranks reproduce one process (and makes resuming a matter of two integers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .readers import DataError, read_train_examples, resolve_path

Example = tuple[str, ...]


def load_examples(path: str, fmt: str | None, objective: str) -> tuple[list[Example], int]:
    """Read training examples for `objective`; returns (examples, blank lines skipped).

    unsup uses the first column of any layout (a sentence seen twice, dropout making the pair);
    sup needs (sent0, sent1) pairs or (sent0, sent1, hard_neg) triplets.
    """
    examples, stats = read_train_examples(resolve_path(path), fmt)
    arity = len(examples[0])
    if objective == "unsup":
        if arity > 1:
            examples = [(ex[0],) for ex in examples]
    elif arity < 2:
        raise DataError(
            f"{path}: train.objective=sup needs sent0,sent1[,hard_neg] columns, but the file has one column"
        )
    return examples, stats.blank_lines


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Batch arithmetic: global = world_size x grad_accum x micro."""

    num_examples: int
    global_batch_size: int
    world_size: int
    grad_accum: int
    drop_last: bool = True

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.world_size * self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_examples % self.global_batch_size if self.drop_last else 0


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """This rank's rows of one micro-step. Every rank holds the same number of rows (the gather
    needs equal shapes, ZeRO-3 needs every rank to forward); rows past `valid` are padding
    (copies of a real example) that the loss masks out."""

    indices: list[int]
    valid: int
    full: bool = True
    """Every rank's share of this micro-step is complete (no padding anywhere)."""


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

    With `drop_last=False` the last global batch of an epoch is short: it is split as evenly
    as possible over micro-steps and ranks, and shorter shares are padded (`MicroBatch.valid`).
    """

    def __init__(self, plan: BatchPlan, rank: int, seed: int, shuffle: bool = True) -> None:
        if plan.steps_per_epoch == 0:
            raise DataError(
                f"{plan.num_examples} training examples are fewer than one global batch "
                f"(train.global_batch_size={plan.global_batch_size}); set data.drop_last=false to train on them"
            )
        self.plan, self.rank, self.seed, self.shuffle = plan, rank, seed, shuffle
        self._epoch: int | None = None
        self._perm: list[int] = []

    def permutation(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            n = self.plan.num_examples
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(n, generator=g).tolist()
            else:
                self._perm = list(range(n))
            self._epoch = epoch
        return self._perm

    def step_examples(self, epoch: int, step_in_epoch: int) -> list[int]:
        """The global batch of one optimizer step, in the order one process would see it."""
        big_b = self.plan.global_batch_size
        return self.permutation(epoch)[step_in_epoch * big_b:(step_in_epoch + 1) * big_b]

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[MicroBatch]:
        p = self.plan
        examples = self.step_examples(epoch, step_in_epoch)
        out = []
        for chunk in _split(examples, p.grad_accum):  # one chunk per micro-step
            shares = _split(chunk, p.world_size)  # rank-major contiguous slices
            rows = max(1, len(shares[0]))  # the first share is the largest
            mine = shares[self.rank]
            filler = (mine or chunk or examples)[:1]
            full = len(chunk) == rows * p.world_size
            out.append(MicroBatch(mine + filler * (rows - len(mine)), len(mine), full))
        return out

    def micro_batch(self, epoch: int, step_in_epoch: int, micro_step: int) -> list[int]:
        """Indices of one full micro-batch (kept for callers that know batches are full)."""
        return self.micro_batches(epoch, step_in_epoch)[micro_step].indices

    def iter_steps(self, start_step: int, total_steps: int) -> Iterator[tuple[int, list[MicroBatch]]]:
        """Yield (global_step, [this rank's MicroBatch per micro-step]) for start_step..total_steps-1."""
        spe = self.plan.steps_per_epoch
        for step in range(start_step, total_steps):
            epoch, s = divmod(step, spe)
            yield step, self.micro_batches(epoch, s)


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
        epoch, s = divmod(step, self.sampler.plan.steps_per_epoch)
        return self.prepare(self.sampler.micro_batches(epoch, s)[micro_step])


class Collator:
    """Examples -> {input_ids, attention_mask[, token_type_ids]} of shape [b, k, L].

    Dynamic padding: L is the longest sequence in this micro-batch (<= max_seq_len), never a
    fixed length. Unsupervised examples are tokenized once and repeated (k = 2): the two views
    differ only by dropout. Supervised examples give k = 2 (pairs) or 3 (with hard negative).
    """

    def __init__(self, tokenizer, max_seq_len: int, objective: str) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.objective = objective

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        b = len(examples)
        if self.objective == "unsup":
            k, texts = 2, [ex[0] for ex in examples]
        else:
            k, texts = len(examples[0]), [s for ex in examples for s in ex]
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_len, return_tensors="pt"
        )
        batch = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in enc:
                continue
            t = enc[key]
            if self.objective == "unsup":
                batch[key] = t.unsqueeze(1).expand(b, k, t.shape[-1]).contiguous()  # [b, 2, L]
            else:
                batch[key] = t.view(b, k, t.shape[-1])  # [b, k, L]
        return batch
