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


def reference_objective(
    views: torch.Tensor,
    temperature: float,
    hard_negative_weight: float = 0.0,
    dims: list[tuple[int, float]] | None = None,
    guide: torch.Tensor | None = None,
    margin: float = 0.0,
    strategy: str = "absolute",
    contrast_anchors: bool = False,
    contrast_positives: bool = False,
    teacher: torch.Tensor | None = None,
    distill_temperature: float = 0.05,
    distill_weight: float = 1.0,
) -> torch.Tensor:
    """The documented objective (docs/objectives.md) written out one anchor and one candidate at
    a time: views, guide, teacher [B, k, d]. Candidates of anchor i: every positive (its own is the
    label), every hard negative (k = 3; +weight on its own), with the guide the other anchors and
    (i's positive against) the other positives; the guide drops each candidate whose guide
    similarity exceeds the threshold from i's guide positive similarity. Per (dim, weight): weight x
    (cross-entropy of the kept candidates + distill_weight x KL(teacher || student) over them)."""
    big_b, k, d = views.shape
    cos = lambda x, y: F.cosine_similarity(x, y, dim=0)  # noqa: E731
    total = torch.zeros((), dtype=views.dtype)
    for dim, w in dims or [(d, 1.0)]:
        v = views[..., :dim]
        terms = []
        for i in range(big_b):
            pairs = [("p", j) for j in range(big_b)] + ([("n", j) for j in range(big_b)] if k == 3 else [])
            pairs += [("a", j) for j in range(big_b) if j != i] if guide is not None and contrast_anchors else []
            pairs += [("pp", j) for j in range(big_b) if j != i] if guide is not None and contrast_positives else []

            def sim(x, kind, j, i=i):
                left = x[i, 1] if kind == "pp" else x[i, 0]
                right = {"p": x[j, 1], "n": x[j, 2] if k == 3 else None, "a": x[j, 0], "pp": x[j, 1]}[kind]
                return cos(left, right)

            keep = []
            for kind, j in pairs:
                label = kind == "p" and j == i
                if guide is not None and not label:
                    pos = cos(guide[i, 0], guide[i, 1])
                    limit = pos - margin if strategy == "absolute" else pos - abs(pos) * margin
                    if sim(guide, kind, j) > limit:
                        continue
                keep.append((kind, j, label))
            student = torch.stack([sim(v, kind, j) for kind, j, _ in keep])
            logits = student / temperature
            bonus = [hard_negative_weight if (kind == "n" and j == i) else 0.0 for kind, j, _ in keep]
            logits = logits + torch.tensor(bonus, dtype=logits.dtype)
            label = next(n for n, (_, _, is_label) in enumerate(keep) if is_label)
            term = torch.logsumexp(logits, dim=0) - logits[label]
            if teacher is not None:
                t = torch.stack([sim(teacher, kind, j) for kind, j, _ in keep]) / distill_temperature
                log_pt, log_ps = F.log_softmax(t, dim=0), F.log_softmax(student / distill_temperature, dim=0)
                term = term + distill_weight * (log_pt.exp() * (log_pt - log_ps)).sum()
            terms.append(term)
        total = total + w * torch.stack(terms).mean()
    return total


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
