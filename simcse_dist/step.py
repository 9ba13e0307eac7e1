"""One optimizer step's algorithm, apart from any run: encode -> gather -> masked loss ->
backward, with plain accumulation or gradient caching (Gao et al. 2021, arXiv 2101.06983).

Everything here takes callables and prepared batches, so it runs in-process on one rank with a
plain torch module (tests/test_step.py) exactly as under DeepSpeed on N ranks:

    encode(inputs)          -> z [b, k, d]   the encoder (a DeepSpeed engine in training)
    backward(loss, last)    accumulate d loss / d theta; `loss` is already this micro-step's
                            exact share of the step (the step divides by grad_accum itself);
                            `last` marks the micro-step after which gradients are complete
    loss_fn(z, row_valid, ids) -> (loss, masked count)   ContrastiveLoss below

A new objective is a new loss_fn (and, if it needs other views, its collate): this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .gather import gather_candidates, gather_no_grad
from .loss import duplicate_mask, padding_mask, simcse_loss
from .state import rng_state, set_rng_state

Encode = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Backward = Callable[[torch.Tensor, bool], None]


@dataclass(slots=True)
class Batch:
    """This rank's rows of one micro-step, the one item type from data to step.

    inputs:    input_ids, attention_mask[, token_type_ids], each [b, k, L] (k views per row)
    row_valid: [b] bool, False for the padding rows of a short last batch; None when no rank
               pads this micro-step (then every rank takes the unmasked path)
    ids:       [b, k] int64 text ids when duplicate texts are masked, else None
    tokens:    non-padding tokens, counted on the host (no device sync)
    source:    index of the training source (data.sources) the rows come from
    """

    inputs: dict[str, torch.Tensor]
    row_valid: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    tokens: int = field(default=0)
    source: int = 0

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
                     move(self.row_valid), move(self.ids), self.tokens, self.source)

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this on CUDA machines."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch({k: v.pin_memory() for k, v in self.inputs.items()}, pin(self.row_valid), pin(self.ids),
                     self.tokens, self.source)


@dataclass(frozen=True, slots=True)
class ContrastiveLoss:
    """SimCSE's loss of this rank's views against every rank's candidates (Eq. 1 / Eq. 5).

    collective (through gather.py): every rank calls it with the same shapes.
    """

    temperature: float
    hard_negative_weight: float = 0.0
    mask_duplicates: bool = False
    rank: int = 0
    world_size: int = 1

    def __call__(self, z: torch.Tensor, row_valid: torch.Tensor | None = None,
                 ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z [b, k, d] -> (this rank's loss, pairs masked as false negatives or None)."""
        b, k = z.shape[:2]
        anchors, candidates = gather_candidates(z)  # [b, d], [(k-1)*N*b, d]  (collective)
        offset = self.rank * b
        if row_valid is None and ids is None:  # the common case: no masks, no extra collective
            return simcse_loss(z, candidates, offset, self.temperature, self.hard_negative_weight), None
        if row_valid is None:
            row_valid = torch.ones(b, dtype=torch.bool, device=z.device)
        if ids is None:
            ids = torch.zeros(b, k, dtype=torch.long, device=z.device)
        # Padding rows and text ids of every rank, in one small collective.
        meta = gather_no_grad(torch.cat([row_valid.long().unsqueeze(1), ids], dim=1))  # [N*b, 1+k]
        valid, global_ids = meta[:, 0].bool(), meta[:, 1:]
        mask = padding_mask(valid, k - 1, b)
        masked = None
        if self.mask_duplicates:
            dup = duplicate_mask(global_ids, offset, b) & ~mask & row_valid.unsqueeze(1)
            masked = dup.sum()
            mask = mask | dup
        normalizer = valid.sum() / self.world_size  # mean over the real anchors of all ranks
        loss = simcse_loss(z, candidates, offset, self.temperature, self.hard_negative_weight,
                           mask, row_valid, normalizer)
        return loss, masked


@dataclass(slots=True)
class StepResult:
    loss: torch.Tensor  # this rank's loss of the step (mean over its anchors), detached fp32
    masked: torch.Tensor | None  # false-negative pairs masked in the step, or None


def _add(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    return x if total is None else (total if x is None else total + x)


def accumulate(batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: ContrastiveLoss) -> StepResult:
    """Plain accumulation: forward + backward per micro-step; negatives from that micro-step only."""
    n = len(batches)
    step_loss = torch.zeros((), device=batches[0].inputs["input_ids"].device)
    masked = None
    for i, batch in enumerate(batches):
        loss, m = loss_fn(encode(batch.inputs), batch.row_valid, batch.ids)
        backward(loss / n if n > 1 else loss, i == n - 1)
        step_loss = step_loss + loss.detach().float() / n
        masked = _add(masked, m)
    return StepResult(step_loss, masked)


def _cat(parts: list[torch.Tensor | None], fill: Callable[[int], torch.Tensor], rows: list[int]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat([fill(r) if p is None else p for p, r in zip(parts, rows, strict=True)])


def grad_cache(batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: ContrastiveLoss) -> StepResult:
    """Gradient caching: the loss over the whole step (every micro-step's rows, every rank) at
    the activation memory of one micro-batch. collective: every rank, same number of forwards.

    (a) encode every chunk without a graph, remembering the RNG state before each;
    (b) loss over all chunks at once and its gradient w.r.t. the embeddings (an fp32 leaf, so
        half-precision embeddings lose nothing to underflow in d loss / d z);
    (c) re-encode each chunk from its RNG state (same dropout masks) and back-propagate the
        cached gradient through the surrogate sum(z * d loss / d z), computed in fp32.
    """
    states, cached = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(rng_state())
            cached.append(encode(batch.inputs))
    rows = [c.shape[0] for c in cached]
    device = cached[0].device
    z = torch.cat(cached).detach().float().requires_grad_()  # [A*b, k, d]
    row_valid = _cat([b.row_valid for b in batches], lambda r: torch.ones(r, dtype=torch.bool, device=device), rows)
    ids = _cat([b.ids for b in batches], lambda r: torch.zeros(r, z.shape[1], dtype=torch.long, device=device), rows)
    loss, masked = loss_fn(z, row_valid, ids)
    loss.backward()  # d loss / d z only (z is a leaf); the gather's backward is a collective
    for i, (batch, grad, state) in enumerate(zip(batches, z.grad.split(rows), states, strict=True)):
        set_rng_state(state)
        backward((encode(batch.inputs).float() * grad).sum(), i == len(batches) - 1)
    return StepResult(loss.detach().float(), masked)


def forward_backward(batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: ContrastiveLoss,
                     use_grad_cache: bool) -> StepResult:
    """Everything of one optimizer step but the optimizer: gradients are complete afterwards."""
    return (grad_cache if use_grad_cache else accumulate)(batches, encode, backward, loss_fn)
