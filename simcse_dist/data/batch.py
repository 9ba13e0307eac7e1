"""The one item type between the data pipeline and the step: this rank's rows of a micro-step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Batch:
    """This rank's rows of one micro-step, the one item type from data to step.

    inputs:    input_ids, attention_mask[, token_type_ids], each [b, k, L] (k views per row)
    row_valid: [b] bool, False for the padding rows of a short last batch; None when no rank
               pads this micro-step (then every rank takes the unmasked path)
    ids:       [b, k] int64 text ids when duplicate texts are masked, else None
    tokens:    non-padding tokens, counted on the host (no device sync)
    source:    index of the training source (data.sources) the rows come from
    frozen_inputs: the same rows tokenized for a frozen model ("guide", "teacher") whose
               tokenizer is not the student's; a frozen model that shares it reads `inputs`
    guide, teacher: [b, k, d'] the frozen models' embeddings of the rows (no gradient): set by
               the trainer, or for the teacher read from precomputed embeddings; else None
    """

    inputs: dict[str, torch.Tensor]
    row_valid: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    tokens: int = field(default=0)
    source: int = 0
    frozen_inputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    guide: torch.Tensor | None = None
    teacher: torch.Tensor | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        each = lambda t: None if t is None else fn(t)  # noqa: E731
        return dataclasses.replace(
            self,
            inputs={k: fn(v) for k, v in self.inputs.items()},
            row_valid=each(self.row_valid),
            ids=each(self.ids),
            frozen_inputs={m: {k: fn(v) for k, v in d.items()} for m, d in self.frozen_inputs.items()},
            guide=each(self.guide),
            teacher=each(self.teacher),
        )

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this on CUDA machines."""
        return self._map(lambda t: t.pin_memory())
