"""The one item type between the data pipeline and the step: this rank's rows of a micro-step."""

from __future__ import annotations

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
    """

    inputs: dict[str, torch.Tensor]
    row_valid: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    tokens: int = field(default=0)
    source: int = 0

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            move(self.row_valid),
            move(self.ids),
            self.tokens,
            self.source,
        )

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this on CUDA machines."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(
            {k: v.pin_memory() for k, v in self.inputs.items()},
            pin(self.row_valid),
            pin(self.ids),
            self.tokens,
            self.source,
        )
