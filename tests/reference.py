"""Independent single-process references: the paper's loss written out, the global batch
formed from the documented order, no gather, no DeepSpeed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_simcse_loss(views: torch.Tensor, temperature: float, hard_negative_weight: float = 0.0) -> torch.Tensor:
    """views [B, k, d]: anchor, positive[, hard negative]. Eq. 1 / Eq. 5 of Gao et al. (2021),
    one anchor at a time; the hard-negative weight is added to the anchor's own negative logit."""
    big_b, k, _ = views.shape
    terms = []
    for i in range(big_b):
        h = views[i, 0]
        pos = torch.stack([F.cosine_similarity(h, views[j, 1], dim=0) for j in range(big_b)]) / temperature
        logits = [pos]
        if k == 3:
            neg = torch.stack([F.cosine_similarity(h, views[j, 2], dim=0) for j in range(big_b)]) / temperature
            neg = neg + hard_negative_weight * F.one_hot(torch.tensor(i), big_b).to(neg.dtype)
            logits.append(neg)
        row = torch.cat(logits)
        terms.append(torch.logsumexp(row, dim=0) - row[i])
    return torch.stack(terms).mean()


def global_batch_indices(num_examples: int, global_batch: int, seed: int, step: int = 0) -> list[int]:
    """The documented data order: permutation of epoch 0 seeded with `seed`, cut in global batches."""
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return perm[step * global_batch:(step + 1) * global_batch].tolist()
