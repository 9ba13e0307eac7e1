"""SimCSE's contrastive loss as pure functions of tensors (no process group in sight).

Gao, Yao, Chen (2021), "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
arXiv 2104.08821, Eq. 1 (unsupervised) and Eq. 5 (supervised with hard negatives):

    loss_i = -log  exp(sim(h_i, h_i+) / tau)
                  / sum_j [ exp(sim(h_i, h_j+) / tau) + exp(sim(h_i, h_j-) / tau) ]

over the j of the *global* batch. Alignment and uniformity: Wang & Isola (2020), the paper's
Eq. 2-3.
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
) -> torch.Tensor:
    """Mean InfoNCE over the local anchors against the global candidates.

    anchors:    [b, d]  this rank's anchors (view 0).
    candidates: [M, d]  all ranks' positives [B, d] (B = N*b, rank-major), followed in the
                supervised case by all ranks' hard negatives [B, d]; M = B or 2B.
    label_offset: rank * b, so anchor i's positive is candidate label_offset + i.
    hard_negative_weight: added (in log space, i.e. to the logit after /tau) to anchor i's own
                hard negative, candidate B + label_offset + i, as the official code's z3_weight.
    num_positive_candidates: B; defaults to M (no hard negatives).
    Cosine similarities and the softmax are computed in (at least) fp32 whatever the input dtype.
    """
    b = anchors.shape[0]
    big_b = candidates.shape[0] if num_positive_candidates is None else num_positive_candidates
    dtype = torch.promote_types(anchors.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    a = F.normalize(anchors.to(dtype), dim=-1)  # [b, d]
    c = F.normalize(candidates.to(dtype), dim=-1)  # [M, d]
    logits = a @ c.T / temperature  # [b, M]
    labels = torch.arange(b, device=logits.device) + label_offset  # [b]
    if hard_negative_weight != 0.0 and candidates.shape[0] > big_b:
        own_hard_negative = big_b + labels  # [b]
        bonus = torch.zeros_like(logits)
        bonus[torch.arange(b, device=logits.device), own_hard_negative] = hard_negative_weight
        logits = logits + bonus
    return F.cross_entropy(logits, labels)


def simcse_loss(
    z: torch.Tensor,
    candidates: torch.Tensor,
    label_offset: int,
    temperature: float,
    hard_negative_weight: float = 0.0,
) -> torch.Tensor:
    """Loss from local views z [b, k, d] (k = 2 unsup/pairs, 3 with hard negatives) and the
    candidates that `gather.gather_candidates` built from them."""
    global_b = candidates.shape[0] // (z.shape[1] - 1)
    return info_nce(z[:, 0], candidates, label_offset, temperature, hard_negative_weight, global_b)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E ||f(x) - f(y)||^alpha over positive pairs of L2-normalised embeddings (lower is better)."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||f(x) - f(y)||^2) over all pairs of normalised embeddings (lower is better)."""
    x = F.normalize(x.float(), dim=-1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
