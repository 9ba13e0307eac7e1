"""One optimizer step's algorithm, apart from any run: encode -> gather -> masked loss ->
backward, with plain accumulation or gradient caching (Gao et al. 2021, arXiv 2101.06983).

Everything here takes callables and prepared batches, so it runs in-process on one rank with a
plain torch module (tests/train/test_step.py) exactly as under DeepSpeed on N ranks:

    encode(inputs)          -> z [b, k, d]   the encoder (a DeepSpeed engine in training)
    backward(loss, last)    accumulate d loss / d theta; `loss` is already this micro-step's
                            exact share of the step (the step divides by grad_accum itself);
                            `last` marks the micro-step after which gradients are complete
    loss_fn(z, row_valid, ids, guide, teacher) -> (loss, masked count)   objective.Objective

A new objective is a new loss_fn (objective.py) and, if it needs other views, its collate;
nothing here changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from simcse_dist.data.batch import Batch
from simcse_dist.train.state import rng_state, set_rng_state

Encode = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Backward = Callable[[torch.Tensor, bool], None]
Maybe = torch.Tensor | None
LossFn = Callable[[torch.Tensor, Maybe, Maybe, Maybe, Maybe], tuple[torch.Tensor, Maybe]]


@dataclass(slots=True)
class StepResult:
    loss: torch.Tensor  # this rank's loss of the step (mean over its anchors), detached fp32
    masked: torch.Tensor | None  # false-negative pairs masked in the step, or None


def _add(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    return x if total is None else (total if x is None else total + x)


def accumulate(batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: LossFn) -> StepResult:
    """Plain accumulation: forward + backward per micro-step; negatives from that micro-step only."""
    n = len(batches)
    step_loss = torch.zeros((), device=batches[0].inputs["input_ids"].device)
    masked = None
    for i, batch in enumerate(batches):
        loss, m = loss_fn(encode(batch.inputs), batch.row_valid, batch.ids, batch.guide, batch.teacher)
        backward(loss / n if n > 1 else loss, i == n - 1)
        step_loss = step_loss + loss.detach().float() / n
        masked = _add(masked, m)
    return StepResult(step_loss, masked)


def _cat(parts: list[torch.Tensor | None], fill: Callable[[int], torch.Tensor], rows: list[int]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    return torch.cat([fill(r) if p is None else p for p, r in zip(parts, rows, strict=True)])


def _every_chunk(rows: int) -> torch.Tensor:
    raise ValueError("frozen-model embeddings are given for every micro-step or for none")


def grad_cache(batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: LossFn) -> StepResult:
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
    frozen = [_cat([getattr(b, name) for b in batches], _every_chunk, rows) for name in ("guide", "teacher")]
    loss, masked = loss_fn(z, row_valid, ids, *frozen)
    loss.backward()  # d loss / d z only (z is a leaf); the gather's backward is a collective
    for i, (batch, grad, state) in enumerate(zip(batches, z.grad.split(rows), states, strict=True)):
        set_rng_state(state)
        backward((encode(batch.inputs).float() * grad).sum(), i == len(batches) - 1)
    return StepResult(loss.detach().float(), masked)


def forward_backward(
    batches: Sequence[Batch], encode: Encode, backward: Backward, loss_fn: LossFn, use_grad_cache: bool
) -> StepResult:
    """Everything of one optimizer step but the optimizer: gradients are complete afterwards."""
    return (grad_cache if use_grad_cache else accumulate)(batches, encode, backward, loss_fn)
