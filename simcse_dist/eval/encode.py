"""Sharded encoding: every rank encodes an equal share of the sentences, the shares are gathered.
What every evaluation (STS, retrieval, MTEB) and mining encode with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from simcse_dist import distributed as du
from simcse_dist import logs
from simcse_dist.data.packing import pack

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
    pack_tokens: int | None = None,
    prompt: str = "",
) -> torch.Tensor:
    """Embeddings [n, d] (fp32, CPU) of `sentences`, identical on every rank; `prompt` is
    prepended to each (its length goes to the encoder, which may leave it out of pooling).

    Sentences are sorted by their length in tokens and batched (little padding); under a launcher each rank
    encodes an equal share and the shares are gathered. Every rank runs the same number of
    forwards, which ZeRO-3 needs (its parameter all-gathers are collectives). `pack_tokens`:
    each batch's sentences are packed into rows of that many tokens (at least the batch's
    longest; `forward` must take packed inputs: model/packing.py says which models do).
    collective: every rank calls this with the same sentences.
    """
    from simcse_dist.data.collate import prompt_length

    n, world, rank = len(sentences), du.world_size(), du.rank()
    prompt_tokens = prompt_length(tokenizer, prompt)
    lengths = token_lengths(tokenizer, sentences, max_length, prompt)
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)
    per_rank = math.ceil(n / world)
    mine = order[rank::world]
    mine = mine + [mine[-1] if mine else order[-1]] * (per_rank - len(mine))  # equal shares
    chunks = []
    batches = range(0, per_rank, batch_size)
    bar = logs.progress(show_progress, total=len(batches), desc="encode", leave=False)
    for start in batches:
        texts = [prompt + sentences[i] for i in mine[start : start + batch_size]]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if pack_tokens:  # [b, 1, L] -> packed rows -> [b, 1, d]
            enc = pack({k: v[:, None] for k, v in enc.items()}, max(pack_tokens, enc["input_ids"].shape[-1]))
        if prompt_tokens:
            enc["prompt_lengths"] = torch.full((len(texts), 1) if pack_tokens else (len(texts),), prompt_tokens)
        emb = forward(**{k: v.to(device) for k, v in enc.items()})
        chunks.append(emb.reshape(len(texts), -1).float())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    local = torch.cat(chunks) if chunks else torch.empty(0)
    gathered = du.gather_no_grad(local).cpu()  # [world * per_rank, d], rank-major
    out = torch.empty(n, gathered.shape[-1])
    for r in range(world):
        idx = order[r::world]
        out[idx] = gathered[r * per_rank : r * per_rank + len(idx)]
    return out


def token_lengths(
    tokenizer, sentences: Sequence[str], max_length: int, prompt: str = "", chunk: int = 8192
) -> list[int]:
    """Each sentence's tokens after truncation, tokenized a chunk at a time (only the counts are
    kept). Batches of sentences sorted by these, not by characters, carry little padding (STS-B
    test, batch 128: 0.93 of the computed tokens are real, against 0.69 sorted by characters)."""
    lengths: list[int] = []
    for start in range(0, len(sentences), chunk):
        texts = [prompt + s for s in sentences[start : start + chunk]]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        lengths.extend(map(len, ids))
    return lengths


def pair_embeddings(
    forward: EncodeFn,
    tokenizer,
    sentences1: Sequence[str],
    sentences2: Sequence[str],
    device: torch.device,
    batch_size: int = 128,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [n, d] of both sides of n pairs. Each distinct sentence is encoded once (STS
    sets repeat many), so the cost is that of the unique sentences. `options`: encode's.
    collective: every rank calls this with the same sentences."""
    unique = list(dict.fromkeys([*sentences1, *sentences2]))
    row = {s: i for i, s in enumerate(unique)}
    emb = encode(forward, tokenizer, unique, device, batch_size, **options)
    return emb[[row[s] for s in sentences1]], emb[[row[s] for s in sentences2]]
