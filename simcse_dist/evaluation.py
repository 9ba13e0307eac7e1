"""STS evaluation: sharded encoding, cosine similarity, Spearman correlation (scipy),
alignment and uniformity (Wang & Isola 2020; SimCSE's Eq. 2-3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from . import distributed as du
from .gather import gather_no_grad
from .loss import alignment, uniformity

EncodeFn = Callable[..., torch.Tensor]


@torch.no_grad()
def encode(
    forward: EncodeFn,
    tokenizer,
    sentences: Sequence[str],
    device: torch.device,
    batch_size: int = 128,
    max_length: int = 512,
    show_progress: bool = False,
) -> torch.Tensor:
    """Embeddings [n, d] (fp32, CPU) of `sentences`, identical on every rank.

    Sentences are sorted by length and batched (little padding); under a launcher each rank
    encodes an equal share and the shares are gathered. Every rank runs the same number of
    forwards, which ZeRO-3 needs (its parameter all-gathers are collectives).
    collective: every rank calls this with the same sentences.
    """
    n, world, rank = len(sentences), du.world_size(), du.rank()
    order = sorted(range(n), key=lambda i: len(sentences[i]), reverse=True)
    per_rank = math.ceil(n / world)
    mine = order[rank::world]
    mine = mine + [mine[-1] if mine else order[-1]] * (per_rank - len(mine))  # equal shares
    chunks = []
    batches = range(0, per_rank, batch_size)
    if show_progress and du.rank() == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="encode", leave=False)
    for start in batches:
        texts = [sentences[i] for i in mine[start : start + batch_size]]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        chunks.append(forward(**enc).float())
    local = torch.cat(chunks) if chunks else torch.empty(0)
    gathered = gather_no_grad(local).cpu()  # [world * per_rank, d], rank-major
    out = torch.empty(n, gathered.shape[-1])
    for r in range(world):
        idx = order[r::world]
        out[idx] = gathered[r * per_rank : r * per_rank + len(idx)]
    return out


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    return float(spearmanr(pred, gold).statistic)


def pair_embeddings(
    forward: EncodeFn,
    tokenizer,
    sentences1: Sequence[str],
    sentences2: Sequence[str],
    device: torch.device,
    batch_size: int = 128,
    max_length: int = 512,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [n, d] of both sides of n pairs. Each distinct sentence is encoded once (STS
    sets repeat many), so the cost is that of the unique sentences.
    collective: every rank calls this with the same sentences."""
    unique = list(dict.fromkeys([*sentences1, *sentences2]))
    row = {s: i for i, s in enumerate(unique)}
    emb = encode(forward, tokenizer, unique, device, batch_size, max_length, show_progress)
    return emb[[row[s] for s in sentences1]], emb[[row[s] for s in sentences2]]


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


class StsValidator:
    """STS dev evaluation during training: decides when (every eval.every_steps and at the end),
    scores, and remembers the best score and its step (a checkpointed part)."""

    def __init__(self, pairs, every_steps: int, batch_size: int) -> None:
        """pairs: sts.StsData."""
        self.pairs, self.every_steps, self.batch_size = pairs, every_steps, batch_size
        self.best_score: float | None = None
        self.best_step: int | None = None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def run(self, engine, tokenizer, step: int) -> tuple[dict[str, float], bool]:
        """(eval/* metrics, whether this is a new best). collective: every rank."""
        engine.eval()
        s1, s2, gold = self.pairs.sentences1, self.pairs.sentences2, self.pairs.scores
        e1, e2 = pair_embeddings(engine, tokenizer, s1, s2, engine.device, self.batch_size)
        engine.train()
        score = sts_correlation(e1, e2, gold)
        metrics = {"eval/stsb_spearman": score}
        if max(gold) > 4.0:  # Wang & Isola's alignment needs positives (gold > 4), as the paper's Fig. 2
            au = align_uniform(e1, e2, gold)
            metrics.update({"eval/align": au["align"], "eval/uniform": au["uniform"]})
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step = score, step
            metrics["eval/best_stsb_spearman"] = score
        return metrics, improved

    def state_dict(self) -> dict:
        return {"score": self.best_score, "step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_step = state["score"], state["step"]
