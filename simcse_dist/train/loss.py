"""The objectives as pure functions of tensors (no process group in sight).

SimCSE: Gao, Yao, Chen (2021), "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
arXiv 2104.08821, Eq. 1 (unsupervised) and Eq. 5 (supervised with hard negatives):

    loss_i = -log  exp(sim(h_i, h_i+) / tau)
                  / sum_j [ exp(sim(h_i, h_j+) / tau) + exp(sim(h_i, h_j-) / tau) ]

over the j of the *global* batch. Around it (train/objective.py composes them):
- Matryoshka (Kusupati et al. 2022): the same loss on prefixes of the embedding, weighted and
  summed; here that is the caller truncating before `cosine`.
- guided false-negative filtering (GISTEmbed, Solatorio 2024): `guide_mask` drops candidates a
  frozen guide scores above the positive (absolute or relative margin, NV-Retriever's forms);
  GISTEmbed also contrasts each anchor with the other anchors and its positive with the other
  positives, which the caller lays out as extra blocks of the same row.
- in-batch distillation (listwise, as RankCSE): `distill_kl` = KL(teacher || student) between the
  softmax distributions of a frozen teacher's and the student's similarities over the same
  candidates, at the distillation temperature.
A row of candidates is [b, M]; `mask` True = not a candidate of that anchor (padding, duplicates,
the guide, itself); an anchor's own positive (its label) is never masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, d] x [m, d] -> [n, m] cosine similarities in (at least) fp32, whatever the input dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    return F.normalize(x.to(dtype), dim=-1) @ F.normalize(y.to(dtype), dim=-1).T


def _keep_labels(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(mask)
    keep[torch.arange(mask.shape[0], device=mask.device), labels] = True
    return mask & ~keep


def contrastive(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each row's logits [b, M] against its label [b], masked candidates left
    out; the weighted terms summed and divided by `normalizer` (default b: a mean). Under N ranks
    pass (global real anchors) / N, so that the engine's average over ranks is the mean over the
    global batch."""
    if mask is not None:
        logits = logits.masked_fill(_keep_labels(mask, labels), float("-inf"))
    per_anchor = F.cross_entropy(logits, labels, reduction="none")  # [b]
    if anchor_weight is not None:
        per_anchor = per_anchor * anchor_weight.to(per_anchor.dtype)
    return per_anchor.sum() / (logits.shape[0] if normalizer is None else normalizer)


def guide_mask(guide_sims: torch.Tensor, labels: torch.Tensor, margin: float, strategy: str) -> torch.Tensor:
    """[b, M] True where the guide scores a candidate above its anchor's positive: absolute,
    sim > s_pos - margin; relative, sim > s_pos - |s_pos| * margin. The positive itself is never
    masked. guide_sims: the guide's cosine similarities over the same row layout."""
    pos = guide_sims.gather(1, labels.unsqueeze(1))  # [b, 1]
    threshold = pos - margin if strategy == "absolute" else pos - pos.abs() * margin
    return _keep_labels(guide_sims > threshold, labels)


def distill_kl(
    student_sims: torch.Tensor,
    teacher_sims: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per row, between softmax(sims / temperature) of the teacher's and
    the student's similarities over the same candidates (masked ones in neither), reduced as
    `contrastive` reduces. The teacher is a constant (no gradient)."""
    student = student_sims / temperature
    teacher = teacher_sims.detach().to(student.dtype) / temperature
    if mask is not None:
        student = student.masked_fill(mask, float("-inf"))
        teacher = teacher.masked_fill(mask, float("-inf"))
    log_p_teacher = F.log_softmax(teacher, dim=1)
    log_p_student = F.log_softmax(student, dim=1)
    p_teacher = log_p_teacher.exp()
    terms = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), torch.zeros_like(p_teacher))
    per_anchor = terms.sum(1)
    if anchor_weight is not None:
        per_anchor = per_anchor * anchor_weight.to(per_anchor.dtype)
    return per_anchor.sum() / (student.shape[0] if normalizer is None else normalizer)


def hard_negative_bonus(logits: torch.Tensor, labels: torch.Tensor, column: int, weight: float) -> torch.Tensor:
    """[b, M] zeros but `weight` at each anchor's own hard negative, column `column + label`."""
    bonus = torch.zeros_like(logits)
    bonus[torch.arange(logits.shape[0], device=logits.device), column + labels] = weight
    return bonus


def padding_mask(valid: torch.Tensor, num_views: int, num_anchors: int) -> torch.Tensor:
    """[b, M] True where the candidate is a padding row. valid: [B] bool over the global rows
    (rank-major), num_views: candidate blocks of B columns each."""
    return (~valid).repeat(num_views).unsqueeze(0).expand(num_anchors, -1)


def duplicate_mask(
    ids: torch.Tensor, label_offset: int, num_anchors: int, anchors: bool = False, positives: bool = False
) -> torch.Tensor:
    """[b, M] True where a candidate is a false negative of the anchor (SimCSE-style batches
    built from NLI repeat premises, wiki text repeats sentences).

    ids: [B, k] text ids of every global row and view (view 0 anchor, 1 positive, 2 hard
    negative). For local anchor i (global row g = label_offset + i), in the blocks [positives,
    hard negatives, (anchors), (positives vs i's positive)] of the row: a positive is masked when
    it is not g's own and either its text equals g's positive, or its row has the same anchor
    text as g (another hypothesis of the same premise); a hard negative when it equals g's
    positive; an anchor (with `anchors`) when it is not g's own and its text equals g's anchor or
    g's positive; the last block (with `positives`) as the first.
    """
    big_b, k = ids.shape
    rows = torch.arange(num_anchors, device=ids.device)
    g = rows + label_offset  # [b]
    own_anchor, own_positive = ids[g, 0].unsqueeze(1), ids[g, 1].unsqueeze(1)  # [b, 1]
    positive_block = (ids[:, 1].unsqueeze(0) == own_positive) | (ids[:, 0].unsqueeze(0) == own_anchor)  # [b, B]
    positive_block[rows, g] = False
    blocks = [positive_block]
    if k == 3:
        blocks.append(ids[:, 2].unsqueeze(0) == own_positive)  # a hard negative equal to the positive
    if anchors:
        anchor_block = (ids[:, 0].unsqueeze(0) == own_anchor) | (ids[:, 0].unsqueeze(0) == own_positive)
        anchor_block[rows, g] = False
        blocks.append(anchor_block)
    if positives:
        blocks.append(positive_block)
    return torch.cat(blocks, dim=1)
