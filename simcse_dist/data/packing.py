"""Sequence packing and the token-balanced order, on the host (numpy, no model).

`pack`: a micro-batch's padded [b, k, L] inputs -> rows of at most `capacity` tokens holding
whole sentences (first-fit decreasing), with what the encoder needs to keep the sentences apart
(model/packing.py): position ids restarting at every sentence, a segment id per token (the
block-diagonal attention mask is `segment[i] == segment[j]`), and each sentence's first token
and length to pool it back into [b, k, d]. `unpack` is its inverse (frozen models read padded
inputs).

`balanced_order`: the rows of one optimizer step reordered so that the sampler's contiguous
slices (micro-steps x ranks) carry about the same number of tokens. See docs/design.md, the data
order, step 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simcse_dist.data.corpus import PreparedCorpus

PACKED_KEYS = ("position_ids", "pack_segments", "pack_starts", "pack_lengths")
"""Keys a packed inputs dict has beyond input_ids[, token_type_ids] (and no attention_mask)."""


def is_packed(inputs: dict) -> bool:
    return "pack_segments" in inputs


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentence lengths -> (row, offset in the row) of each sentence. Longest first, each into the
    first row with room (ties in length keep the sentences' order), so the result is a pure
    function of the lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > capacity:
        raise ValueError(f"a sentence of {int(lengths.max())} tokens does not fit a row of {capacity}")
    free = np.full(len(lengths), capacity, dtype=np.int64)  # at most one row per sentence
    used = 0
    row = np.empty(len(lengths), dtype=np.int64)
    offset = np.empty(len(lengths), dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = lengths[i]
        r = int(np.argmax(free[:used] >= n)) if used else 0
        if not used or free[r] < n:
            r, used = used, used + 1
        row[i], offset[i] = r, capacity - free[r]
        free[r] -= n
    return row, offset


def pack(inputs: dict[str, torch.Tensor], capacity: int) -> dict[str, torch.Tensor]:
    """Padded {input_ids, attention_mask[, token_type_ids]} [b, k, L] (either padding side) ->
    {input_ids, position_ids[, token_type_ids], pack_segments} [R, W] with W <= capacity, plus
    pack_starts, pack_lengths [b, k]: sentence (i, j)'s tokens are the flat positions
    pack_starts[i, j] .. + pack_lengths[i, j] of the [R, W] rows. Padding tokens at a row's end
    form a segment of their own (segment n + row), so no query attends to nothing. Positions
    count from 0 in every sentence (the model adds its own offset, model/packing.py)."""
    ids = inputs["input_ids"].numpy()
    b, k, seq = ids.shape
    n = b * k
    mask = inputs["attention_mask"].numpy().reshape(n, seq).astype(bool)
    lengths = mask.sum(1)
    row, offset = first_fit_decreasing(lengths, capacity)
    rows = int(row.max()) + 1 if n else 0
    fill = np.zeros(rows, dtype=np.int64)
    np.maximum.at(fill, row, offset + lengths)
    width = int(fill.max()) if n else 0
    within = np.cumsum(mask, 1) - 1  # a real token's index within its sentence
    start = row * width + offset
    dest = (start[:, None] + within)[mask]
    segments = np.repeat(n + np.arange(rows), width)  # padding: one segment per row
    segments[dest] = np.repeat(np.arange(n), lengths)
    positions = np.zeros(rows * width, dtype=np.int64)
    positions[dest] = within[mask]
    out = {"input_ids": np.zeros(rows * width, dtype=np.int64)}
    out["input_ids"][dest] = ids.reshape(n, seq)[mask]
    if "token_type_ids" in inputs:
        out["token_type_ids"] = np.zeros(rows * width, dtype=np.int64)
        out["token_type_ids"][dest] = inputs["token_type_ids"].numpy().reshape(n, seq)[mask]
    out["position_ids"], out["pack_segments"] = positions, segments
    packed = {key: torch.from_numpy(v.reshape(rows, width)) for key, v in out.items()}
    packed["pack_starts"] = torch.from_numpy(start.reshape(b, k))
    packed["pack_lengths"] = torch.from_numpy(lengths.astype(np.int64).reshape(b, k))
    return packed


def unpack(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack`'s inverse up to padding: {input_ids, attention_mask[, token_type_ids]} [b, k, L],
    right-padded with id 0 to the longest sentence."""
    lengths = packed["pack_lengths"]
    b, k = lengths.shape
    seq = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(seq, device=lengths.device)
    mask = pos[None, :] < lengths.reshape(-1, 1)  # [n, L]
    src = (packed["pack_starts"].reshape(-1, 1) + pos[None, :])[mask]
    out = {}
    for key in ("input_ids", "token_type_ids"):
        if key in packed:
            t = torch.zeros(b * k, seq, dtype=packed[key].dtype, device=packed[key].device)
            t[mask] = packed[key].reshape(-1)[src]
            out[key] = t.view(b, k, seq)
    out["attention_mask"] = mask.long().view(b, k, seq)
    if "prompt_lengths" in packed:  # per sentence, not per token: it travels as it is
        out["prompt_lengths"] = packed["prompt_lengths"]
    return {key: out[key] for key in ("input_ids", "attention_mask", "token_type_ids", "prompt_lengths") if key in out}


def balanced_order(costs: np.ndarray, parts: int) -> np.ndarray:
    """A permutation of range(len(costs)) whose `parts` contiguous equal blocks carry about the
    same total cost: longest first, each row to the block with the least cost so far that has
    room (ties: the lower block); each block keeps its rows in their original order. A pure
    function of (costs, parts). len(costs) must be a multiple of parts."""
    costs = np.asarray(costs, dtype=np.int64)
    size, rest = divmod(len(costs), parts)
    if rest:
        raise ValueError(f"{len(costs)} rows do not split into {parts} equal blocks")
    load = np.zeros(parts, dtype=np.int64)
    count = np.zeros(parts, dtype=np.int64)
    block = np.empty(len(costs), dtype=np.int64)
    for i in np.argsort(-costs, kind="stable").tolist():
        open_ = np.flatnonzero(count < size)
        j = int(open_[np.argmin(load[open_])])
        block[i] = j
        load[j] += costs[i]
        count[j] += 1
    return np.argsort(block, kind="stable")


class RowTokens:
    """Global row indices of a source -> the tokens the encoder computes for each (every view;
    unsup's two dropout views are column 0 twice), read from the corpus's offsets. Picklable."""

    def __init__(self, corpora: Sequence[PreparedCorpus], objectives: Sequence[str]) -> None:
        self.corpora = list(corpora)
        self.columns = [
            [0, 0] if o == "unsup" else list(range(c.num_columns)) for c, o in zip(corpora, objectives, strict=True)
        ]

    def __call__(self, source: int, rows: Sequence[int]) -> np.ndarray:
        corpus = self.corpora[source]
        shard, local = corpus.locate(np.asarray(rows, dtype=np.int64))
        out = np.zeros(len(local), dtype=np.int64)
        for s in np.unique(shard).tolist():
            at = np.flatnonzero(shard == s)
            sh = corpus.shard(s)
            for c in self.columns[source]:
                off = sh.offsets[c]
                out[at] += off[local[at] + 1] - off[local[at]]
        return out
