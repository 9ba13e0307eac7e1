"""Scores of embeddings: cosine similarity, Spearman correlation (scipy), and the paper's
alignment and uniformity (Wang & Isola 2020; SimCSE's Eq. 2-3, Figure 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E ||f(x) - f(y)||^alpha over positive pairs of L2-normalised embeddings (lower is better)."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||f(x) - f(y)||^2) over all pairs of normalised embeddings (lower is better)."""
    x = F.normalize(x.float(), dim=-1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    from scipy.stats import spearmanr  # here, not at import: scipy.stats costs every rank ~1 s at start-up

    return float(spearmanr(pred, gold).statistic)


def sts_correlation(emb1: torch.Tensor, emb2: torch.Tensor, gold: Sequence[float]) -> float:
    """Spearman of cosine(emb1_i, emb2_i) against gold over all pairs given. For STS12-16 pass
    every subset of a year at once: that is the paper's "all" aggregation."""
    return spearman(cosine_scores(emb1, emb2), gold)


def align_uniform(
    emb1: torch.Tensor, emb2: torch.Tensor, gold: Sequence[float] | torch.Tensor, threshold: float = 4.0
) -> dict[str, float]:
    """The paper's Figure 2 quantities on an STS dev set (lower is better for both):

    align:   E ||f(x) - f(x+)||^2 over the pairs with gold > threshold (positives, as the paper:
             "STS-B pairs with scores higher than 4");
    uniform: log E exp(-2 ||f(x) - f(y)||^2) over all pairs of the dev sentences (both sides,
             repeats kept, as they appear in the set).
    Embeddings are L2-normalised inside loss.alignment / loss.uniformity.
    """
    gold_t = torch.as_tensor(gold, dtype=torch.float64)
    positive = gold_t > threshold
    if not bool(positive.any()):
        raise ValueError(f"align_uniform: no pair has a gold score above {threshold}")
    return {
        "align": float(alignment(emb1[positive], emb2[positive])),
        "uniform": float(uniformity(torch.cat([emb1, emb2]))),
    }
