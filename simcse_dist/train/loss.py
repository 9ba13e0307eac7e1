"""SimCSE's contrastive loss as pure functions of tensors (no process group in sight).

Gao, Yao, Chen (2021), "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
arXiv 2104.08821, Eq. 1 (unsupervised) and Eq. 5 (supervised with hard negatives):

    loss_i = -log  exp(sim(h_i, h_i+) / tau)
                  / sum_j [ exp(sim(h_i, h_j+) / tau) + exp(sim(h_i, h_j-) / tau) ]

over the j of the *global* batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    label_offset: int,
    temperature: float,
    hard_negative_weight: float = 0.0,
    num_positive_candidates: int | None = None,
    candidate_mask: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """InfoNCE of the local anchors against the global candidates.

    anchors:    [b, d]  this rank's anchors (view 0).
    candidates: [M, d]  all ranks' positives [B, d] (B = N*b, rank-major), followed in the
                supervised case by all ranks' hard negatives [B, d]; M = B or 2B.
    label_offset: rank * b, so anchor i's positive is candidate label_offset + i.
    hard_negative_weight: added (in log space, i.e. to the logit after /tau) to anchor i's own
                hard negative, candidate B + label_offset + i, as the official code's z3_weight.
    num_positive_candidates: B; defaults to M (no hard negatives).
    candidate_mask: [b, M] bool, True = not a negative of this anchor (padding rows of uneven
                batches, duplicates); an anchor's own positive is never masked.
    anchor_weight: [b] weights of the anchors' terms (0 for padding rows); default 1.
    normalizer: the sum of the weighted terms is divided by this; default the number of anchors
                (a mean). Under N ranks, pass (global real anchors) / N so that the engine's
                average over ranks gives the mean over the global batch.
    Cosine similarities and the softmax are computed in (at least) fp32 whatever the input dtype.
    """
    b = anchors.shape[0]
    big_b = candidates.shape[0] if num_positive_candidates is None else num_positive_candidates
    dtype = torch.promote_types(anchors.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    a = F.normalize(anchors.to(dtype), dim=-1)  # [b, d]
    c = F.normalize(candidates.to(dtype), dim=-1)  # [M, d]
    logits = a @ c.T / temperature  # [b, M]
    rows = torch.arange(b, device=logits.device)
    labels = rows + label_offset  # [b]
    if hard_negative_weight != 0.0 and candidates.shape[0] > big_b:
        bonus = torch.zeros_like(logits)
        bonus[rows, big_b + labels] = hard_negative_weight  # each anchor's own hard negative
        logits = logits + bonus
    if candidate_mask is not None:
        keep_label = torch.zeros_like(candidate_mask)
        keep_label[rows, labels] = True
        logits = logits.masked_fill(candidate_mask & ~keep_label, float("-inf"))
    per_anchor = F.cross_entropy(logits, labels, reduction="none")  # [b]
    if anchor_weight is not None:
        per_anchor = per_anchor * anchor_weight.to(per_anchor.dtype)
    return per_anchor.sum() / (b if normalizer is None else normalizer)


def simcse_loss(
    z: torch.Tensor,
    candidates: torch.Tensor,
    label_offset: int,
    temperature: float,
    hard_negative_weight: float = 0.0,
    candidate_mask: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Loss from local views z [b, k, d] (k = 2 unsup/pairs, 3 with hard negatives) and the
    candidates that `gather.gather_candidates` built from them."""
    global_b = candidates.shape[0] // (z.shape[1] - 1)
    return info_nce(
        z[:, 0],
        candidates,
        label_offset,
        temperature,
        hard_negative_weight,
        global_b,
        candidate_mask,
        anchor_weight,
        normalizer,
    )


def padding_mask(valid: torch.Tensor, num_views: int, num_anchors: int) -> torch.Tensor:
    """[b, M] True where the candidate is a padding row. valid: [B] bool over the global rows
    (rank-major), num_views: candidate views k-1."""
    return (~valid).repeat(num_views).unsqueeze(0).expand(num_anchors, -1)


def duplicate_mask(ids: torch.Tensor, label_offset: int, num_anchors: int) -> torch.Tensor:
    """[b, M] True where a candidate is a false negative of the anchor (SimCSE-style batches
    built from NLI repeat premises, wiki text repeats sentences).

    ids: [B, k] text ids of every global row and view (view 0 anchor, 1 positive, 2 hard
    negative). For local anchor i (global row g = label_offset + i), candidate j is masked when
    it is not g's own positive and either its text equals g's positive, or it is a positive
    whose row has the same anchor text as g (another hypothesis of the same premise).
    """
    big_b, k = ids.shape
    g = torch.arange(num_anchors, device=ids.device) + label_offset  # [b]
    own_positive = ids[g, 1]  # [b]
    blocks = [
        (ids[:, 1].unsqueeze(0) == own_positive.unsqueeze(1))  # [b, B]
        | (ids[:, 0].unsqueeze(0) == ids[g, 0].unsqueeze(1))
    ]
    blocks[0][torch.arange(num_anchors, device=ids.device), g] = False
    if k == 3:
        blocks.append(ids[:, 2].unsqueeze(0) == own_positive.unsqueeze(1))  # a hard negative equal to the positive
    return torch.cat(blocks, dim=1)
