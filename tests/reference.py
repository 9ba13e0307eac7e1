"""Independent single-process references: the paper's loss written out, the global batch
formed from the documented order (written out again here), no gather, no DeepSpeed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_simcse_loss(
    views: torch.Tensor,
    temperature: float,
    hard_negative_weight: float = 0.0,
    texts: list[tuple[str, ...]] | None = None,
) -> torch.Tensor:
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


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _M64))
    return h


def feistel(n: int, key: int, position: int) -> int:
    """docs/design.md "Data order", one position at a time in plain integers: a 6-round Feistel
    network over 2^bits >= n whose two halves swap widths every round, round r keyed by
    key(key, r), F = SplitMix64; images >= n are permuted again (cycle-walking)."""
    if n <= 1:
        return position
    bits = max(2, (n - 1).bit_length())
    keys = [_key(key, r) for r in range(6)]

    def network(x: int) -> int:
        hi, lo = bits // 2, bits - bits // 2
        for k in keys:
            left, right = x >> lo, x & ((1 << lo) - 1)
            x = (right << hi) | ((left + _splitmix64(right ^ k)) & ((1 << hi) - 1))
            hi, lo = lo, hi
        return x

    y = network(position)
    while y >= n:
        y = network(y)
    return y


def global_batch_indices(
    num_examples: int, global_batch: int, seed: int, step: int = 0, drop_last: bool = True
) -> list[int]:
    """The documented data order of one source: epoch e's rows are positions 0..n-1 through
    feistel(n, key(seed, 0, e)), cut in global batches."""
    per_epoch = num_examples // global_batch if drop_last else -(-num_examples // global_batch)
    epoch, s = divmod(step, per_epoch)
    key = _key(seed, 0, epoch)
    return [feistel(num_examples, key, p) for p in range(s * global_batch, min((s + 1) * global_batch, num_examples))]
