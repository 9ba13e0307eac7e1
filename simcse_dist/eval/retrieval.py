"""Retrieval evaluation: rank a corpus for every query by cosine similarity, exactly, and score
the ranking with nDCG@10, MRR@10, Recall@100 and MAP@10; also for truncated (Matryoshka) and
quantized embeddings (`View`).

Files (UTF-8, TAB-separated, one header line, no quoting, columns in any order; blank lines
are skipped; every malformed row raises `DataError` naming file:line):
    queries  `qid  text`        corpus  `docid  text`        qrels  `qid  docid  relevance`

The metrics are those of sentence-transformers' InformationRetrievalEvaluator (the tests
compare against it to 1e-6):
- a document is relevant to a query when its qrels relevance is > 0; queries without a relevant
  document are left out of the averages (as sentence-transformers and trec_eval do);
- documents are ranked by cosine similarity, highest first; equal scores are ordered by docid
  (string order), the evaluator's rule, so nothing depends on chunk sizes or on the world size;
- nDCG@10: gain = relevance (trec_eval's linear gain), discount log2(rank + 1), divided by the
  DCG of the judged relevances sorted; with 0/1 labels this is sentence-transformers' nDCG;
- MRR@10: 1 / rank of the first relevant document in the top 10, 0 if none;
- Recall@100: relevant documents in the top 100 / relevant documents of the query;
- MAP@10: the sum of precision@rank over the relevant hits in the top 10, divided by
  min(10, relevant documents of the query): sentence-transformers' normalisation (trec_eval's
  map_cut_10 divides by all relevant documents; the two differ only above 10 of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simcse_dist.data.readers import DataError, read_lines
from simcse_dist.eval.encode import EncodeFn, encode
from simcse_dist.eval.sts import read_pair_file

METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@10")
TITLES = ("nDCG@10", "MRR@10", "Recall@100", "MAP@10")
DEPTH = 100  # the deepest cut-off any metric reads


@dataclass(frozen=True, slots=True)
class RetrievalData:
    queries: dict[str, str]  # qid -> text, in file order
    corpus: dict[str, str]  # docid -> text
    qrels: dict[str, dict[str, int]]  # qid -> docid -> relevance
    source: str  # the three files, for messages

    @property
    def judged_queries(self) -> list[str]:
        """The qids with at least one relevant document (relevance > 0): the ones scored."""
        return [q for q in self.queries if any(r > 0 for r in self.qrels.get(q, {}).values())]


def _rows(path: str | Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: field}) per data row of a header TSV with exactly `columns`."""
    index = None
    for n, line in read_lines(str(path)):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if index is None:
            if sorted(fields) != sorted(columns):
                raise DataError(
                    f"{path}:{n}: expected a header with the TAB-separated columns "
                    f"{' '.join(columns)} (any order), got {line[:200]!r}"
                )
            index = {name: fields.index(name) for name in columns}
            continue
        if len(fields) != len(columns):
            raise DataError(
                f"{path}:{n}: expected {len(columns)} TAB-separated fields ({', '.join(columns)}), got {len(fields)}"
            )
        row = {name: fields[i] for name, i in index.items()}
        for name in columns:
            if not row[name].strip():
                raise DataError(f"{path}:{n}: empty {name}")
        yield n, row
    if index is None:
        raise DataError(f"{path}: empty file (expected a header: {' '.join(columns)})")


def read_texts(path: str | Path, id_column: str) -> dict[str, str]:
    """{id: text} of a queries (`qid text`) or corpus (`docid text`) file; ids must be unique."""
    texts, first_line = {}, {}
    for n, row in _rows(path, (id_column, "text")):
        key = row[id_column]
        if key in texts:
            raise DataError(f"{path}:{n}: duplicate {id_column} {key!r} (first on line {first_line[key]})")
        texts[key], first_line[key] = row["text"], n
    return texts


def read_qrels(
    path: str | Path,
    queries: dict[str, str],
    corpus: dict[str, str],
    queries_path: str | Path = "queries",
    corpus_path: str | Path = "corpus",
) -> dict[str, dict[str, int]]:
    """{qid: {docid: relevance}}; every id must name a query / document, relevance an integer."""
    qrels: dict[str, dict[str, int]] = {}
    for n, row in _rows(path, ("qid", "docid", "relevance")):
        qid, docid = row["qid"], row["docid"]
        if qid not in queries:
            raise DataError(f"{path}:{n}: qid {qid!r} is not in {queries_path}")
        if docid not in corpus:
            raise DataError(f"{path}:{n}: docid {docid!r} is not in {corpus_path}")
        try:
            relevance = int(row["relevance"])
        except ValueError:
            raise DataError(f"{path}:{n}: relevance must be an integer, got {row['relevance']!r}") from None
        if docid in qrels.setdefault(qid, {}):
            raise DataError(f"{path}:{n}: pair ({qid!r}, {docid!r}) is listed twice")
        qrels[qid][docid] = relevance
    return qrels


def load_retrieval(queries: str | Path, corpus: str | Path, qrels: str | Path) -> RetrievalData:
    q_texts, c_texts = read_texts(queries, "qid"), read_texts(corpus, "docid")
    judgements = read_qrels(qrels, q_texts, c_texts, queries, corpus)
    data = RetrievalData(q_texts, c_texts, judgements, f"{queries}, {corpus}, {qrels}")
    if not data.judged_queries:
        raise DataError(f"{qrels}: no query has a relevant document (relevance > 0)")
    return data


# -- exact top-k ----------------------------------------------------------------------------------


def _sort_desc(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered by score descending; `index` ascending within equal scores (rows must
    arrive ascending in `index` where scores tie: a stable sort keeps that order)."""
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, index.gather(1, order)


def _block_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a [q, m] block, ties by lower column; (scores, columns) [q, min(k, m)]."""
    k = min(k, scores.shape[1])
    values, columns = scores.topk(k, dim=1)
    # topk picks arbitrarily among equal scores: where a score equal to the k-th one was left
    # out, select that row again with a stable full sort (rare with real embeddings).
    tied = ((scores >= values[:, -1:]).sum(dim=1) > k).nonzero().flatten().tolist()
    for r in tied:
        order = scores[r].sort(descending=True, stable=True).indices[:k]
        values[r], columns[r] = scores[r, order], order
    columns, order = columns.sort(dim=1)  # ascending column, then a stable sort by score
    return _sort_desc(values.gather(1, order), columns)


@dataclass(frozen=True, slots=True)
class View:
    """One way of serving the embeddings: their first `dim` coordinates (None: all of them),
    stored at `precision`: float32 (ranked by cosine) or one of sentence-transformers'
    quantized formats, which its quantized search ranks by inner product of the int8/uint8
    codes and by Hamming distance of the binary/ubinary bits."""

    dim: int | None = None
    precision: str = "float32"

    @property
    def prefix(self) -> str:
        """'' for the full float32 embeddings, else e.g. 'dim64', 'int8', 'dim64/binary'."""
        parts = [f"dim{self.dim}"] if self.dim else []
        return "/".join(parts + ([self.precision] if self.precision != "float32" else []))


QUANTIZED = ("int8", "uint8", "binary", "ubinary")


def quantize_embeddings(emb: torch.Tensor, precision: str, calibration: torch.Tensor | None = None):
    """sentence-transformers' quantize_embeddings (an optional dependency: imported here)."""
    try:
        from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    except ImportError:
        raise RuntimeError(
            f"embedding precision {precision} uses sentence-transformers' quantize_embeddings: "
            "pip install 'simcse-dist[st]'"
        ) from None
    ranges = None
    if calibration is not None:
        low, high = calibration.min(dim=0).values, calibration.max(dim=0).values
        high = torch.where(high > low, high, low + 1e-6)  # a constant coordinate: one code, not 0/0
        ranges = torch.stack([low, high]).numpy()
    return st_quantize(emb.numpy(), precision, ranges=ranges)


class _Scorer:
    """The vectors one view ranks with, and their score: cosine (float32), the inner product of
    the codes (int8, uint8; exact in float64) or, for bits, the inner product of +-1 vectors,
    which is dim - 2 * Hamming distance and so ranks as Hamming does. int8/uint8 ranges come from
    `calibration` (the first corpus chunk), the same for queries and documents."""

    def __init__(self, view: View, calibration: torch.Tensor):
        self.view = view
        self.calibration = calibration[:, : view.dim] if view.precision in ("int8", "uint8") else None

    def vectors(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb[:, : self.view.dim].float()
        precision = self.view.precision
        if precision == "float32":
            return F.normalize(emb, dim=-1)
        codes = quantize_embeddings(emb, precision, self.calibration)
        if precision in ("int8", "uint8"):
            return torch.from_numpy(codes.astype("float64"))
        packed = codes.view("uint8") ^ 0x80 if precision == "binary" else codes  # binary: packed bits - 128
        bits = torch.from_numpy(np.unpackbits(packed, axis=1)[:, : emb.shape[1]].astype("float32"))
        return 2 * bits - 1


def top_k(
    queries: torch.Tensor,
    corpus_chunks: Iterable[torch.Tensor],
    k: int,
    views: Sequence[View] = (View(),),
    query_block: int = 1024,
) -> dict[View, tuple[torch.Tensor, torch.Tensor]]:
    """Exact top-k corpus rows for every query under each view: {view: (scores, corpus indices)}
    [n_q, min(k, n_c)], best first, equal scores by lower corpus index. The corpus arrives in
    chunks (each may be encoded just in time), so memory is one [query_block, chunk] score block
    plus the running top-k lists, never the whole [n_q, n_c] matrix."""
    blocks = range(0, len(queries), query_block)
    rows = [min(query_block, len(queries) - start) for start in blocks]
    best = {v: [(torch.empty(n, 0), torch.empty(n, 0, dtype=torch.long)) for n in rows] for v in views}
    scorers: dict[View, tuple[_Scorer, torch.Tensor]] = {}
    offset = 0
    for chunk in corpus_chunks:
        if not scorers:  # the first chunk calibrates the int8 ranges
            for v in views:
                scorer = _Scorer(v, chunk.float())
                scorers[v] = (scorer, scorer.vectors(queries))
        for v, (scorer, q) in scorers.items():
            c = scorer.vectors(chunk)
            for b, start in enumerate(blocks):
                values, columns = _block_top_k(q[start : start + query_block] @ c.T, k)  # [qb, <=k]
                # earlier chunks hold lower indices, so concatenating before a stable sort keeps the
                # (score desc, index asc) order
                scores = torch.cat([best[v][b][0], values.to(best[v][b][0].dtype)], dim=1)
                index = torch.cat([best[v][b][1], columns + offset], dim=1)
                scores, index = _sort_desc(scores, index)
                best[v][b] = (scores[:, :k], index[:, :k])
        offset += len(chunk)
    out = {}
    for v in views:
        parts = best[v]
        out[v] = (
            (torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts]))
            if parts
            else (torch.empty(0, 0), torch.empty(0, 0, dtype=torch.long))
        )
    return out


# -- metrics --------------------------------------------------------------------------------------


def _dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


def retrieval_metrics(ranking: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """The four metrics (fractions in [0, 1]) averaged over the queries of `ranking` (docids best
    first, at least the top 100 where the corpus has them); see the module docstring."""
    totals = dict.fromkeys(METRICS, 0.0)
    for qid, docs in ranking.items():
        judged = qrels.get(qid, {})
        relevant = {d for d, r in judged.items() if r > 0}
        hits = [d in relevant for d in docs]
        ideal = _dcg(sorted((r for r in judged.values() if r > 0), reverse=True)[:10])
        totals["ndcg@10"] += _dcg([max(judged.get(d, 0), 0) for d in docs[:10]]) / ideal
        totals["mrr@10"] += next((1 / (rank + 1) for rank, hit in enumerate(hits[:10]) if hit), 0.0)
        totals["recall@100"] += sum(hits[:100]) / len(relevant)
        precisions = [sum(hits[: rank + 1]) / (rank + 1) for rank, hit in enumerate(hits[:10]) if hit]
        totals["map@10"] += sum(precisions) / min(10, len(relevant))
    return {name: total / len(ranking) for name, total in totals.items()}


def evaluate_retrieval(
    forward: EncodeFn,
    tokenizer,
    data: RetrievalData,
    device: torch.device,
    batch_size: int = 128,
    max_length: int = 512,
    corpus_chunk_size: int = 50_000,
    show_progress: bool = False,
    views: Sequence[View] = (View(),),
    query_prompt: str = "",
    corpus_prompt: str = "",
) -> dict[View, dict[str, float]]:
    """The four metrics (fractions) of `forward` on `data` under each view, the prompts
    prepended to the queries and to the documents. The queries, then the
    corpus one chunk at a time, are encoded once (eval/encode.py: each rank encodes a share, the
    shares are gathered); every rank then ranks all queries against the chunk under every view,
    so all ranks hold the same result. collective: every rank calls this with the same data."""
    qids = data.judged_queries
    query_emb = encode(
        forward, tokenizer, [data.queries[q] for q in qids], device, batch_size, max_length, show_progress, query_prompt
    )
    docids = sorted(data.corpus)  # string order: equal scores then rank by docid, as sentence-transformers

    def chunks() -> Iterator[torch.Tensor]:
        for start in range(0, len(docids), corpus_chunk_size):
            texts = [data.corpus[d] for d in docids[start : start + corpus_chunk_size]]
            yield encode(forward, tokenizer, texts, device, batch_size, max_length, show_progress, corpus_prompt)

    results = {}
    for view, (_, index) in top_k(query_emb, chunks(), DEPTH, views).items():
        ranking = {q: [docids[j] for j in row] for q, row in zip(qids, index.tolist(), strict=True)}
        results[view] = retrieval_metrics(ranking, data.qrels)
    return results


# -- a small retrieval set from STS pairs ------------------------------------------------------------


def build_sts_retrieval_set(
    pairs: str | Path,
    out_dir: str | Path,
    *,
    min_score: float = 4.0,
    max_pairs: int | None = None,
    distractors: str | Path | None = None,
    n_distractors: int = 0,
) -> dict[str, int]:
    """Write queries.tsv, corpus.tsv and qrels.tsv to out_dir from an STS pair file; returns the
    counts. Queries: sentence1 of the pairs scored >= min_score (a sentence1 of several such pairs
    is one query); relevant document: their sentence2 (relevance 1). Corpus: every distinct
    sentence2 of the pairs read, the low-scoring ones included (same domain, often the same topic:
    hard distractors), then the first n_distractors new lines of `distractors`. Ids q0001...,
    d00001... in order of first appearance; each text is one document."""
    data = read_pair_file(pairs)
    rows = list(zip(data.sentences1, data.sentences2, data.scores, strict=True))[:max_pairs]
    docs: dict[str, str] = {}  # text -> docid
    queries: dict[str, str] = {}  # text -> qid
    qrels: dict[tuple[str, str], None] = {}  # ordered set of (qid, docid)
    for s1, s2, score in rows:
        docid = docs.setdefault(s2, f"d{len(docs) + 1:05d}")
        if score >= min_score:
            qrels[(queries.setdefault(s1, f"q{len(queries) + 1:04d}"), docid)] = None
    if distractors is not None and n_distractors > 0:
        wanted = len(docs) + n_distractors
        with open(distractors, encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if text and "\t" not in text:  # a TAB would break the TSV
                    docs.setdefault(text, f"d{len(docs) + 1:05d}")
                if len(docs) == wanted:
                    break
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "queries.tsv").write_text("qid\ttext\n" + "".join(f"{q}\t{t}\n" for t, q in queries.items()))
    (out / "corpus.tsv").write_text("docid\ttext\n" + "".join(f"{d}\t{t}\n" for t, d in docs.items()))
    (out / "qrels.tsv").write_text("qid\tdocid\trelevance\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return {"queries": len(queries), "corpus": len(docs), "qrels": len(qrels)}
