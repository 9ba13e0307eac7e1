"""STS evaluation: sharded encoding, cosine similarity, Spearman correlation (scipy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from . import distributed as du
from .gather import gather_no_grad

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


def sts_spearman(
    forward: EncodeFn,
    tokenizer,
    pairs: tuple[list[str], list[str], list[float]],
    device: torch.device,
    batch_size: int = 128,
) -> float:
    """Spearman of cosine(s1, s2) against gold. collective: every rank calls this."""
    s1, s2, gold = pairs
    emb = encode(forward, tokenizer, list(s1) + list(s2), device, batch_size)
    return spearman(cosine_scores(emb[: len(s1)], emb[len(s1) :]), gold)
