"""The objective a step optimises: a loss_fn(z, row_valid, ids) -> (loss, masked) that takes
this rank's embeddings, gathers the global candidates (gather.py) and calls the pure loss
(loss.py). The step layer (step.py) knows only this signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simcse_dist.distributed import gather_no_grad
from simcse_dist.train.gather import gather_candidates
from simcse_dist.train.loss import duplicate_mask, padding_mask, simcse_loss


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

    def __call__(
        self, z: torch.Tensor, row_valid: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        loss = simcse_loss(
            z, candidates, offset, self.temperature, self.hard_negative_weight, mask, row_valid, normalizer
        )
        return loss, masked
