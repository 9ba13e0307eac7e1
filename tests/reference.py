"""Independent single-process references: the paper's loss written out, the global batch
formed from the documented order, no gather, no DeepSpeed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_simcse_loss(views: torch.Tensor, temperature: float, hard_negative_weight: float = 0.0,
                          texts: list[tuple[str, ...]] | None = None) -> torch.Tensor:
    """views [B, k, d]: anchor, positive[, hard negative]. Eq. 1 / Eq. 5 of Gao et al. (2021),
    one anchor at a time; the hard-negative weight is added to the anchor's own negative logit.

    With `texts` (the B examples' texts per view), false negatives are left out of anchor i's
    denominator, as documented: another row's positive whose text equals i's positive or whose
    anchor text equals i's anchor, and a hard negative whose text equals i's positive."""
    big_b, k, _ = views.shape
    terms = []
    for i in range(big_b):
        h = views[i, 0]
        row = [F.cosine_similarity(h, views[i, 1], dim=0) / temperature]  # the positive first
        for j in range(big_b):
            if j != i and not (texts and (texts[j][1] == texts[i][1] or texts[j][0] == texts[i][0])):
                row.append(F.cosine_similarity(h, views[j, 1], dim=0) / temperature)
        if k == 3:
            for j in range(big_b):
                if texts and texts[j][2] == texts[i][1]:
                    continue
                logit = F.cosine_similarity(h, views[j, 2], dim=0) / temperature
                row.append(logit + (hard_negative_weight if j == i else 0.0))
        row = torch.stack(row)
        terms.append(torch.logsumexp(row, dim=0) - row[0])
    return torch.stack(terms).mean()


def global_batch_indices(num_examples: int, global_batch: int, seed: int, step: int = 0) -> list[int]:
    """The documented data order: permutation of epoch 0 seeded with `seed`, cut in global batches."""
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return perm[step * global_batch:(step + 1) * global_batch].tolist()
