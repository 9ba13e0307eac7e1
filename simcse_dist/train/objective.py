"""The objective a step optimises: `Objective(spec, rank, world_size)(z, row_valid, ids, guide,
teacher) -> (loss, masked)`. It takes this rank's embeddings (and, when asked, a frozen guide's
and teacher's embeddings of the same rows), gathers the global candidates (gather.py,
distributed.gather_no_grad) and calls the pure losses (loss.py). The step layer (step.py) knows
only this signature.

One row per local anchor i (global row g = rank * b + i), in blocks of B = N*b columns:
[the positives of every rank | their hard negatives (k = 3) | every anchor (the guide's
contrast_anchors) | i's positive against every positive (the guide's contrast_positives)];
i's label is column g. Masks: padding rows, i itself, duplicate texts (`mask_duplicates`), and
what the guide scores above i's positive. For each Matryoshka prefix (dim, weight) the
contrastive term, plus the distillation term against the teacher's similarities over the same
row, is weighted and summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simcse_dist.config import LossConfig
from simcse_dist.distributed import gather_no_grad
from simcse_dist.train.gather import gather_with_grad
from simcse_dist.train.loss import (
    contrastive,
    cosine,
    distill_kl,
    duplicate_mask,
    guide_mask,
    hard_negative_bonus,
    padding_mask,
)

Maybe = torch.Tensor | None  # an input or output a step may not have (step.py's LossFn)


@dataclass(frozen=True, slots=True)
class ObjectiveSpec:
    """One source's objective, resolved from the `loss:` section (config.LossConfig)."""

    temperature: float = 0.05
    hard_negative_weight: float = 0.0
    mask_duplicates: bool = False
    matryoshka: tuple[tuple[int, float], ...] = ()
    """(dim, weight) per prefix; () = the whole embedding, weight 1."""
    guide_margin: float | None = None
    """None: no guide."""
    guide_strategy: str = "absolute"
    contrast_anchors: bool = False
    contrast_positives: bool = False
    distill_temperature: float | None = None
    """None: no distillation."""
    distill_weight: float = 1.0

    @classmethod
    def of(cls, loss: LossConfig, mask_duplicates: bool) -> ObjectiveSpec:
        """The spec of a source's resolved loss: section (duplicates decided per source)."""
        weights = loss.matryoshka_weights or [1.0] * len(loss.matryoshka_dims)
        guide, distill = loss.guide, loss.distill
        return cls(
            temperature=loss.temperature,
            hard_negative_weight=loss.hard_negative_weight,
            mask_duplicates=mask_duplicates,
            matryoshka=tuple(zip(loss.matryoshka_dims, weights, strict=True)),
            guide_margin=None if guide is None else guide.margin,
            guide_strategy="absolute" if guide is None else guide.margin_strategy,
            contrast_anchors=guide is not None and guide.contrast_anchors,
            contrast_positives=guide is not None and guide.contrast_positives,
            distill_temperature=None if distill is None else distill.temperature,
            distill_weight=1.0 if distill is None else distill.weight,
        )

    @property
    def uses_guide(self) -> bool:
        return self.guide_margin is not None

    @property
    def uses_teacher(self) -> bool:
        return self.distill_temperature is not None


class Objective:
    """The loss of this rank's views against every rank's candidates (module docstring).

    collective (through gather.py and distributed.gather_no_grad): every rank calls it with the
    same shapes and the same arguments present."""

    def __init__(self, spec: ObjectiveSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size

    def __call__(
        self, z: torch.Tensor, row_valid: Maybe = None, ids: Maybe = None, guide: Maybe = None, teacher: Maybe = None
    ) -> tuple[torch.Tensor, Maybe]:
        """z [b, k, d]; guide / teacher [b, k, d'] (no gradient) -> (this rank's loss, the pairs
        masked as false negatives, or None when nothing is masked)."""
        s = self.spec
        if s.uses_guide != (guide is not None) or s.uses_teacher != (teacher is not None):
            raise ValueError("the guide / teacher embeddings must be given exactly when the objective uses them")
        b, k, d = z.shape
        offset = self.rank * b
        labels = torch.arange(b, device=z.device) + offset
        with_anchors, with_positives = s.uses_guide and s.contrast_anchors, s.uses_guide and s.contrast_positives
        blocks = (k - 1) + int(with_anchors) + int(with_positives)
        mask = masked = weight = normalizer = None
        if row_valid is not None or ids is not None or s.uses_guide:
            row_valid = torch.ones(b, dtype=torch.bool, device=z.device) if row_valid is None else row_valid
            ids = torch.zeros(b, k, dtype=torch.long, device=z.device) if ids is None else ids
            # Padding rows and text ids of every rank, in one small collective.
            meta = gather_no_grad(torch.cat([row_valid.long().unsqueeze(1), ids], dim=1))  # [N*b, 1+k]
            valid, global_ids = meta[:, 0].bool(), meta[:, 1:]
            mask = padding_mask(valid, blocks, b) | self._self_mask(
                z.device, b, valid.shape[0], k, with_anchors, with_positives
            )
            if s.mask_duplicates:
                dup = duplicate_mask(global_ids, offset, b, with_anchors, with_positives) & ~mask
                masked = (dup & row_valid.unsqueeze(1)).sum()
                mask = mask | dup
            if s.uses_guide:
                flagged = (
                    guide_mask(
                        self._rows(guide, gather_no_grad(guide), with_anchors, with_positives),
                        labels,
                        s.guide_margin,
                        s.guide_strategy,
                    )
                    & ~mask
                )
                count = (flagged & row_valid.unsqueeze(1)).sum()
                masked = count if masked is None else masked + count
                mask = mask | flagged
            weight, normalizer = row_valid, valid.sum() / self.world_size  # mean over the real anchors of all ranks
        gathered = gather_with_grad(z if with_anchors else z[:, 1:])  # [N*b, k or k-1, d]  (collective)
        teacher_sims = None
        if s.uses_teacher:
            teacher_sims = self._rows(teacher, gather_no_grad(teacher), with_anchors, with_positives)
        loss = None
        for dim, w in s.matryoshka or ((d, 1.0),):
            sims = self._rows(
                z[..., :dim], gathered[..., :dim], with_anchors, with_positives, gathered_all=with_anchors
            )
            logits = sims / s.temperature
            if s.hard_negative_weight != 0.0 and k == 3:
                logits = logits + hard_negative_bonus(logits, labels, gathered.shape[0], s.hard_negative_weight)
            term = contrastive(logits, labels, mask, weight, normalizer)
            if teacher_sims is not None:
                term = term + s.distill_weight * distill_kl(
                    sims, teacher_sims, s.distill_temperature, mask, weight, normalizer
                )
            term = term if w == 1.0 else w * term
            loss = term if loss is None else loss + term
        return loss, masked

    @staticmethod
    def _rows(
        local: torch.Tensor, everyone: torch.Tensor, anchors: bool, positives: bool, gathered_all: bool = True
    ) -> torch.Tensor:
        """Cosine rows [b, M] in the module docstring's layout. everyone: every rank's views,
        rank-major: all k views, or (gathered_all False) views 1..k-1."""
        first = 1 if gathered_all else 0  # index of the positive view in `everyone`
        candidates = [everyone[:, v] for v in range(first, everyone.shape[1])]
        if anchors:
            candidates.append(everyone[:, 0])
        rows = cosine(local[:, 0], torch.cat(candidates))  # one product: the plain SimCSE row
        if positives:
            rows = torch.cat([rows, cosine(local[:, 1], everyone[:, first])], dim=1)
        return rows

    def _self_mask(self, device, b: int, big_b: int, k: int, anchors: bool, positives: bool) -> torch.Tensor:
        """[b, M] True at i's own column of the anchor block and of the positive-positive block."""
        mask = torch.zeros(b, big_b * ((k - 1) + int(anchors) + int(positives)), dtype=torch.bool, device=device)
        rows = torch.arange(b, device=device)
        g = rows + self.rank * b
        if anchors:
            mask[rows, big_b * (k - 1) + g] = True
        if positives:
            mask[rows, mask.shape[1] - big_b + g] = True
        return mask
