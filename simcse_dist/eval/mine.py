"""simcse-mine: hard negatives for (anchor, positive) pairs, with the options and meanings of
sentence-transformers' `util.mine_hard_negatives`, encoding sharded over ranks.

Candidates are the distinct positives (plus `--corpus` texts). For each distinct anchor:
1. retrieve its `range_max + m + 1` nearest candidates by cosine (exact, in chunks of anchors;
   m = the most rows any anchor has), as sentence-transformers does, so that removing the
   positives and the anchor's own text still leaves `range_max` of them;
2. remove its own positives (every positive paired with an equal anchor text, which also covers
   any text equal to one) and any text equal to the anchor itself;
3. remove candidates failing absolute_margin (score + margin > positive score), relative_margin
   (score > pos - |pos| * margin, pos being the anchor's lowest positive score), max_score, min_score;
4. keep the survivors in score order, limited to the first `range_max`, and skip the first
   `range_min`; `top` takes the first K of that window, `random` K of it at random (seeded).
Steps 1-4 follow sentence-transformers 6.3's code, so `--sampling top` picks what it picks
(tests/eval/test_mine.py compares the two). Run under torchrun or the deepspeed launcher, every rank
encodes and searches a share; rank 0 selects and writes a TSV that `train.objective=sup` reads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from simcse_dist import distributed as du
from simcse_dist.data.readers import DataError, read_train_examples
from simcse_dist.eval.encode import encode
from simcse_dist.fsutil import WriteFailure, atomic_file, explain
from simcse_dist.model.encoder import quiet_transformers
from simcse_dist.model.load import load_encoder
from simcse_dist.model.packing import unsupported

log = logging.getLogger(__name__)

_SCORE_BUDGET = 1 << 26  # floats in one chunk's score matrix (256 MiB in fp32): bounds memory


@dataclass(frozen=True, slots=True)
class MineOptions:
    num_negatives: int = 1
    range_min: int = 0
    range_max: int | None = None  # None: derived as sentence-transformers does (see resolved_range_max)
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 42

    def resolved_range_max(self, max_rows_per_anchor: int) -> int:
        """sentence-transformers' default: room for 10 x K when a filter may discard candidates."""
        if self.range_max is not None:
            return self.range_max
        filtered = (self.absolute_margin, self.relative_margin, self.max_score)
        per = 10 if any(v is not None for v in filtered) else 1
        return self.range_min + per * self.num_negatives + max_rows_per_anchor


@dataclass(slots=True)
class Pool:
    """Distinct anchors, the candidate texts and which candidates each anchor may not get."""

    anchors: list[str]  # distinct, first-occurrence order
    candidates: list[str]  # distinct: --corpus texts first, then the positives (ST's order)
    row_anchor: list[int]  # input row -> anchor index
    row_positive: list[int]  # input row -> candidate index of its positive
    excluded: list[set[int]]  # anchor -> candidate indices it may not get
    max_rows: int  # the most input rows of one anchor (sentence-transformers' max_positives)
    extra: int  # retrieved beyond range_max: room for the excluded ones (see module docstring)


def build_pool(pairs: list[tuple[str, str]], corpus: list[str]) -> Pool:
    candidates = list(dict.fromkeys([*corpus, *(p for _, p in pairs)]))
    cand_index = {t: i for i, t in enumerate(candidates)}
    anchor_index: dict[str, int] = {}
    row_anchor = [anchor_index.setdefault(a, len(anchor_index)) for a, _ in pairs]
    anchors = list(anchor_index)
    excluded: list[set[int]] = [set() for _ in anchors]
    rows = [0] * len(anchors)
    for q, (_, p) in zip(row_anchor, pairs, strict=True):
        excluded[q].add(cand_index[p])
        rows[q] += 1
    for q, a in enumerate(anchors):
        if a in cand_index:
            excluded[q].add(cand_index[a])
    # sentence-transformers retrieves range_max + (most rows of one anchor) + 1 (the anchor's own text)
    return Pool(anchors, candidates, row_anchor, [cand_index[p] for _, p in pairs], excluded, max(rows), max(rows) + 1)


def search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk: int, progress: bool = False, use_faiss: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine of L2-normalised rows: scores [n, k] (descending) and indices [n, k]."""
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus.cpu().numpy())
    chunks = range(0, len(queries), chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="search", unit="chunk")
    scores, indices = [], []
    for start in chunks:
        q = queries[start : start + chunk]
        if use_faiss:
            s, i = index.search(q.cpu().numpy(), k)
            s, i = torch.from_numpy(s), torch.from_numpy(i)
        else:
            s, i = torch.topk(q @ corpus.T, k=k, dim=1)  # [chunk, n_corpus] at most, then [chunk, k]
        scores.append(s.cpu())
        indices.append(i.cpu())
    return torch.cat(scores), torch.cat(indices)


def select(
    scores: torch.Tensor,
    indices: torch.Tensor,
    excluded: list[set[int]],
    positive_scores: torch.Tensor,
    n_candidates: int,
    opts: MineOptions,
    range_max: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Negatives [n, K] (candidate index, -1 where none) and their scores, from the retrieved
    scores/indices [n, k] and each anchor's lowest positive score [n]; plus candidates skipped per filter."""
    n = scores.shape[0]
    scores = scores.clone().float()
    scores[indices < 0] = -math.inf  # faiss pads with -1
    # An excluded (anchor, candidate) pair as one int64 code, so one isin masks them all.
    codes = torch.arange(n).unsqueeze(1) * n_candidates + indices
    codes[indices < 0] = -1
    banned = torch.tensor([q * n_candidates + c for q, cs in enumerate(excluded) for c in cs], dtype=torch.long)
    scores[torch.isin(codes, banned)] = -math.inf
    skipped: dict[str, int] = {}

    def drop(name: str, mask: torch.Tensor) -> None:
        mask &= torch.isfinite(scores)
        skipped[name] = int(mask.sum())
        scores[mask] = -math.inf

    pos = positive_scores.float().unsqueeze(1)
    if opts.absolute_margin is not None:
        drop("absolute_margin", scores + opts.absolute_margin > pos)
    if opts.relative_margin is not None:
        drop("relative_margin", scores > pos - pos.abs() * opts.relative_margin)
    if opts.max_score is not None:
        drop("max_score", scores > opts.max_score)
    if opts.min_score is not None:
        drop("min_score", scores < opts.min_score)
    if scores.shape[1] < range_max:  # fewer candidates than the window: pad as sentence-transformers does
        pad = range_max - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((n, pad), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((n, pad), -1)], dim=1)
    window, order = torch.topk(scores, k=range_max, dim=1)  # survivors first, in score order
    window, order = window[:, opts.range_min :], order[:, opts.range_min :]
    K = opts.num_negatives
    if opts.sampling == "top":
        pick = torch.arange(K).expand(n, K)
    else:  # K of the surviving candidates of the window, uniformly, reproducible from the seed
        keys = torch.rand(window.shape, generator=torch.Generator().manual_seed(opts.seed))
        keys[~torch.isfinite(window)] = 2.0  # after every survivor
        pick = torch.topk(keys, k=K, dim=1, largest=False).indices
    chosen = window.gather(1, pick)
    chosen, resort = chosen.sort(dim=1, descending=True)
    neg = indices.gather(1, order.gather(1, pick.gather(1, resort)))
    neg[~torch.isfinite(chosen)] = -1
    return neg, chosen, skipped


def _read_texts(path: str) -> list[str]:
    """--corpus: one text per line (txt), or every field of a csv/tsv/jsonl the trainer reads."""
    examples, _ = read_train_examples(path)
    return [t for row in examples for t in row]


def _check_tsv_safe(texts: list[str], path: str) -> None:
    for t in texts:
        if any(c in t for c in "\t\r\n"):
            raise DataError(f"{path}: a text holds a TAB or line break, which the TSV output cannot hold: {t[:60]!r}")


@dataclass(frozen=True, slots=True)
class MineJob:
    """What to mine and how to encode: the files and the encoding settings of simcse-mine."""

    model: str
    input: str
    output: str
    pooler: str | None = None
    corpus: str | None = None
    batch_size: int = 128
    max_length: int | None = None  # None: the model's max_seq_length
    chunk_size: int | None = None  # anchors scored at once; None: a 256 MiB score matrix
    use_faiss: bool = False
    progress: bool = True
    pack_tokens: int | None = None  # pack each batch into rows of this many tokens (no padding computed)


def read_inputs(job: MineJob, opts: MineOptions) -> tuple[list[tuple[str, str]], Pool, str]:
    """(pairs, candidate pool, a note to print or ""), read and checked before any model loads."""
    examples, _ = read_train_examples(job.input)
    if len(examples[0]) < 2:
        raise DataError(
            f"{job.input}: mining needs (anchor, positive) pairs, a header sent0,sent1; this file has one column"
        )
    note = f"{job.input}: its hard_neg column is ignored (replaced by mined negatives)" if len(examples[0]) == 3 else ""
    pairs = [(e[0], e[1]) for e in examples]
    corpus = _read_texts(job.corpus) if job.corpus else []
    _check_tsv_safe([t for pair in pairs for t in pair], job.input)
    _check_tsv_safe(corpus, job.corpus or "")
    pool = build_pool(pairs, corpus)
    if opts.num_negatives >= len(pool.candidates):
        raise ValueError(
            f"--num-negatives {opts.num_negatives}: only {len(pool.candidates)} distinct candidate texts "
            f"(positives of {job.input}{' + --corpus' if corpus else ''}), so an anchor has at most "
            f"{len(pool.candidates) - 1} negatives"
        )
    return pairs, pool, note


def _max_length(encoder, meta: dict, requested: int | None) -> int:
    import json

    limit = getattr(encoder.backbone.config, "max_position_embeddings", 512)
    st_config = Path(meta["path"]) / "sentence_bert_config.json"
    if requested is None and st_config.is_file():  # what SentenceTransformer(dir) truncates at
        requested = json.loads(st_config.read_text()).get("max_seq_length")
    return min(requested or 512, limit)


def _summary(stats: dict, chosen: torch.Tensor) -> str:
    finite = chosen[torch.isfinite(chosen)].double()
    lines = [
        f"mined {stats['rows']} pairs ({stats['anchors']} distinct anchors) against {stats['candidates']} candidates "
        f"on {stats['world']} rank(s) in {stats['seconds']:.1f} s ({stats['rows'] / stats['seconds']:.1f} anchors/s; "
        f"encode {stats['encode_s']:.1f} s, search {stats['search_s']:.1f} s)",
        f"wrote {stats['output']}: {stats['written']} rows; dropped {stats['dropped']} rows whose anchor got no negative"
        + (
            f"; {stats['short']} rows have fewer than {stats['K']} negatives (their found negatives repeat to fill "
            f"the row)"
            if stats["K"] > 1
            else ""
        ),
    ]
    if stats["skipped"]:
        lines.append("skipped candidates: " + ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()))
    if finite.numel():
        q = torch.quantile(finite, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.double)).tolist()
        lines.append(
            f"chosen negatives' cosine: n {finite.numel()}, min {q[0]:.4f}, q25 {q[1]:.4f}, median {q[2]:.4f}, "
            f"mean {finite.mean():.4f}, q75 {q[3]:.4f}, max {q[4]:.4f}; positives' mean {stats['pos_mean']:.4f}"
        )
    return "\n".join(lines)


def _write(path: str, pairs: list[tuple[str, str]], pool: Pool, neg: torch.Tensor) -> tuple[int, int, int]:
    """Rows with at least one negative, as TSV (atomic rename); (written, dropped, short)."""
    K = neg.shape[1]
    header = ["sent0", "sent1", *(["hard_neg"] if K == 1 else [f"hard_neg_{j}" for j in range(1, K + 1)])]
    written = dropped = short = 0
    found = [[pool.candidates[c] for c in row if c >= 0] for row in neg.tolist()]
    with atomic_file(Path(path)) as f:
        f.write("\t".join(header) + "\n")
        for (a, p), q in zip(pairs, pool.row_anchor, strict=True):
            negs = found[q]
            if not negs:
                dropped += 1
                continue
            short += len(negs) < K
            f.write("\t".join([a, p, *(negs[j % len(negs)] for j in range(K))]) + "\n")
            written += 1
    return written, dropped, short


def mine(job: MineJob, opts: MineOptions, pairs: list[tuple[str, str]], pool: Pool, env: du.DistEnv) -> None:
    """Encode (a share per rank), search (a block of anchors per rank), then rank 0 selects and
    writes the TSV. collective: every rank calls this; a failure of rank 0's write ends every
    rank at once (distributed.agreed)."""
    with quiet_transformers():
        encoder, tokenizer, meta = load_encoder(job.model, job.pooler)
    device = du.device_for(env)
    encoder.to(device)
    max_length = _max_length(encoder, meta, job.max_length)
    progress = env.is_main and job.progress
    log.info(
        f"model {meta['path']}: pooler {meta['pooler']}, max length {max_length}, {env.world_size} rank(s), "
        f"device {device}; {len(pairs)} pairs, {len(pool.anchors)} distinct anchors, {len(pool.candidates)} "
        "candidates"
    )
    t0 = time.perf_counter()
    texts = list(dict.fromkeys([*pool.anchors, *pool.candidates]))
    row = {t: i for i, t in enumerate(texts)}
    # collective: every rank encodes a share; every rank gets all embeddings back
    pack_tokens = job.pack_tokens
    if pack_tokens and (reason := unsupported(encoder.backbone, encoder.pooler)):
        log.info(f"--pack-tokens: {reason}; encoding padded")
        pack_tokens = None
    emb = encode(encoder, tokenizer, texts, device, job.batch_size, max_length, progress, pack_tokens)
    emb = F.normalize(emb, dim=-1)
    queries, cands = emb[[row[a] for a in pool.anchors]], emb[[row[c] for c in pool.candidates]]
    t1 = time.perf_counter()
    range_max = opts.resolved_range_max(pool.max_rows)
    k = min(range_max + pool.extra, len(pool.candidates))
    # each rank searches an equal contiguous block of anchors (the last padded), gathered rank-major
    per = math.ceil(len(queries) / env.world_size)
    mine = queries[env.rank * per : (env.rank + 1) * per]
    mine = torch.cat([mine, mine.new_zeros(per - len(mine), mine.shape[1])])
    chunk = job.chunk_size or max(1, min(8192, _SCORE_BUDGET // len(pool.candidates)))
    scores, indices = search(mine.to(device), cands.to(device), k, chunk, progress, job.use_faiss)
    # collective (x2); on the device, since nccl gathers only CUDA tensors
    scores = du.gather_no_grad(scores.to(device)).cpu()[: len(queries)]
    indices = du.gather_no_grad(indices.long().to(device)).cpu()[: len(queries)]
    t2 = time.perf_counter()

    def select_and_write() -> None:
        if not env.is_main:
            return
        pos = (queries[pool.row_anchor] * cands[pool.row_positive]).sum(-1)
        lowest = torch.full((len(queries),), math.inf).scatter_reduce(0, torch.tensor(pool.row_anchor), pos, "amin")
        neg, chosen, skipped = select(scores, indices, pool.excluded, lowest, len(pool.candidates), opts, range_max)
        written, dropped, short = _write(job.output, pairs, pool, neg)
        seconds = time.perf_counter() - t0
        log.info(
            _summary(
                dict(
                    rows=len(pairs),
                    anchors=len(pool.anchors),
                    candidates=len(pool.candidates),
                    world=env.world_size,
                    seconds=seconds,
                    encode_s=t1 - t0,
                    search_s=t2 - t1,
                    output=job.output,
                    written=written,
                    dropped=dropped,
                    short=short,
                    K=opts.num_negatives,
                    skipped={name: n for name, n in skipped.items() if n},
                    pos_mean=float(pos.mean()),
                ),
                chosen[pool.row_anchor],
            )
        )

    # collective: no rank reports success before the file exists, and none waits on a failed rank 0
    du.agreed(
        select_and_write,
        lambda e: WriteFailure(f"cannot write {explain(Path(job.output), e)}") if isinstance(e, OSError) else e,
    )
