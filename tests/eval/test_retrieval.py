"""Retrieval evaluation: the readers (bad files -> file:line, exit 2), exact chunked top-k against
a written-out full sort, the metrics against sentence-transformers' InformationRetrievalEvaluator
(the pretrained MiniLM, a set built from STS-B dev + Wikipedia distractors) and against
trec_eval for graded nDCG, and simcse-eval --retrieval on two ranks against sentence-transformers."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import zygote
from helpers import REPO, SHARED_DATA

from simcse_dist.cli.eval import main as eval_cli
from simcse_dist.data.readers import DataError
from simcse_dist.eval.retrieval import (
    View,
    build_sts_retrieval_set,
    evaluate_retrieval,
    load_retrieval,
    retrieval_metrics,
    top_k,
)
from simcse_dist.eval.sts import read_pair_file
from simcse_dist.model.encoder import quiet_transformers
from simcse_dist.model.export import export_model
from simcse_dist.model.load import load_encoder

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}
ST_KS = {"mrr_at_k": [10], "ndcg_at_k": [10], "precision_recall_at_k": [100], "map_at_k": [10], "accuracy_at_k": [1]}
ST_NAMES = {
    "ndcg@10": "cosine_ndcg@10",
    "mrr@10": "cosine_mrr@10",
    "recall@100": "cosine_recall@100",
    "map@10": "cosine_map@10",
}


def write_set(root: Path, queries: str, corpus: str, qrels: str) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        (root / f"{name}.tsv").write_text(text, encoding="utf-8")
        paths.append(str(root / f"{name}.tsv"))
    return paths


def harder_qrels(root: Path, seed: int = 0) -> None:
    """Add to a built set what STS pairs lack: a query with 12 relevant documents (MAP@10's
    min(10, R) and Recall@100 matter), queries with 3, judged-irrelevant rows (relevance 0),
    and a query judged only irrelevant (left out of the averages)."""
    qids = [line.split("\t")[0] for line in (root / "queries.tsv").read_text().splitlines()[1:]]
    docids = [line.split("\t")[0] for line in (root / "corpus.tsv").read_text().splitlines()[1:]]
    rows = (root / "qrels.tsv").read_text().splitlines()
    judged = {tuple(r.split("\t")[:2]) for r in rows[1:]}
    rng = random.Random(seed)
    extra = {qids[0]: 12, qids[1]: 3, qids[2]: 3}
    for qid, n in extra.items():
        for docid in rng.sample(docids, n):
            if (qid, docid) not in judged:
                judged.add((qid, docid))
                rows.append(f"{qid}\t{docid}\t1")
    for docid in rng.sample(docids, 5):
        if (qids[3], docid) not in judged:
            rows.append(f"{qids[3]}\t{docid}\t0")
    only_irrelevant = [r for r in rows[1:] if r.split("\t")[0] != qids[4]]
    rows = [rows[0], *only_irrelevant, f"{qids[4]}\t{docids[-1]}\t0"]
    (root / "qrels.tsv").write_text("\n".join(rows) + "\n")


def st_reference(model_dir: Path, paths: list[str], truncate_dim: int | None = None) -> dict[str, float]:
    """sentence-transformers' evaluator on the same files, read here independently."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    def table(path: str) -> list[list[str]]:
        return [line.split("\t") for line in Path(path).read_text(encoding="utf-8").splitlines()[1:] if line]

    queries = dict(table(paths[0]))
    corpus = dict(table(paths[1]))
    relevant: dict[str, set[str]] = {}
    for qid, docid, rel in table(paths[2]):
        if int(rel) > 0:
            relevant.setdefault(qid, set()).add(docid)
    model = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=truncate_dim)
    result = InformationRetrievalEvaluator(queries, corpus, relevant, batch_size=64, **ST_KS)(model)
    return {ours: result[theirs] for ours, theirs in ST_NAMES.items()}


# -- readers --------------------------------------------------------------------------------------


def test_bad_files_name_file_and_line(tmp_path, capsys):
    q, c = "qid\ttext\nq1\tfirst query\nq2\tsecond query\n", "docid\ttext\nd1\tone\nd2\ttwo\n"
    cases = {
        "unknown-qid": (q, c, "qid\tdocid\trelevance\nq1\td1\t1\nq9\td2\t1\n", "qrels.tsv:3: qid 'q9' is not in"),
        "unknown-docid": (q, c, "qid\tdocid\trelevance\nq1\td7\t1\n", "qrels.tsv:2: docid 'd7' is not in"),
        "bad-header": (q, "doc\ttext\nd1\tone\n", "qid\tdocid\trelevance\n", "corpus.tsv:1: expected a header"),
        "qrels-header": (q, c, "query-id\tcorpus-id\tscore\nq1\td1\t1\n", "qrels.tsv:1: expected a header"),
        "fields": (q, c, "qid\tdocid\trelevance\nq1\td1\n", "qrels.tsv:2: expected 3 TAB-separated fields"),
        "relevance": (q, c, "qid\tdocid\trelevance\nq1\td1\thigh\n", "qrels.tsv:2: relevance must be an integer"),
        "duplicate": ("qid\ttext\nq1\ta\n\nq1\tb\n", c, "qid\tdocid\trelevance\n", "queries.tsv:4: duplicate qid 'q1'"),
        "no-relevant": (q, c, "qid\tdocid\trelevance\nq1\td1\t0\n", "no query has a relevant document"),
    }
    for name, (queries, corpus, qrels, message) in cases.items():
        paths = write_set(tmp_path / name, queries, corpus, qrels)
        with pytest.raises(DataError, match=message):
            load_retrieval(*paths)
        # simcse-eval checks the files before loading any model: exit 2, one line naming file:line
        assert eval_cli(["--model", str(tmp_path / "no-model"), "--retrieval", *paths]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message.split(":")[-1].strip() in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:  # STS is the only mode without --retrieval / --mteb
        eval_cli(["--model", "x"])
    assert info.value.code == 2
    assert "give --data-dir (the STS tasks), --sts-file, --retrieval or --mteb" in capsys.readouterr().err


# -- exact top-k ----------------------------------------------------------------------------------


def _full_sort(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> list[list[int]]:
    """Written out: every cosine, then (score descending, index ascending)."""
    out = []
    for q in queries.double():
        cos = [float(q @ c.double() / (q.norm() * c.double().norm())) for c in corpus]
        out.append(sorted(range(len(corpus)), key=lambda j: (-cos[j], j))[:k])
    return out


def test_chunked_top_k_equals_full_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    # Entries +-0.5 (norm exactly 1) and one-hot rows: every cosine is a multiple of 0.25, computed
    # exactly in any summation order, so exact ties are everywhere, inside and across chunks.
    signs = torch.randint(0, 2, (20, 4), generator=gen).float() - 0.5
    corpus = torch.cat([signs, torch.eye(4), -torch.eye(4)]).repeat(2, 1)  # [56, 4], every row twice
    queries = torch.cat([torch.randint(0, 2, (5, 4), generator=gen).float() - 0.5, torch.eye(4)[:2]])
    for k in (1, 10, 100):
        expected = _full_sort(queries, corpus, k)
        for chunk, block in ((56, 7), (8, 3), (1, 1), (13, 2), (5, 100)):
            _, index = top_k(queries, corpus.split(chunk), k, query_block=block)[View()]
            assert index.tolist() == expected, (k, chunk, block)
    # continuous random embeddings: no ties, the plain order
    queries, corpus = torch.randn(9, 16, generator=gen), torch.randn(300, 16, generator=gen)
    expected = _full_sort(queries, corpus, 100)
    scores, index = top_k(queries, corpus.split(37), 100, query_block=4)[View()]
    assert index.tolist() == expected
    cos = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    assert torch.allclose(scores, cos.gather(1, index), atol=1e-6)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_graded_ndcg_and_recall_match_trec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(1)
    docs = [f"d{i:03d}" for i in range(150)]
    qrels, ranking, run = {}, {}, {}
    for q in range(6):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([0, 1, 2, 3]) for d in rng.sample(docs, 4 + 3 * q)}
        qrels[qid][docs[q]] = 2  # at least one relevant document
        ranking[qid] = rng.sample(docs, 120)
        run[qid] = {d: float(120 - r) for r, d in enumerate(ranking[qid])}  # distinct scores, same order
    ours = retrieval_metrics(ranking, qrels)
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert ours["ndcg@10"] == pytest.approx(sum(v["ndcg_cut_10"] for v in trec.values()) / 6, abs=1e-9)
    assert ours["recall@100"] == pytest.approx(sum(v["recall_100"] for v in trec.values()) / 6, abs=1e-9)


# -- against sentence-transformers ------------------------------------------------------------------


@needs_data
def test_minilm_metrics_match_sentence_transformers(tmp_path):
    root = tmp_path / "set"
    counts = build_sts_retrieval_set(
        SHARED_DATA / "stsb" / "dev.tsv",
        root,
        max_pairs=150,
        distractors=SHARED_DATA / "wiki1m-sample.txt",
        n_distractors=80,
    )
    assert counts["queries"] >= 25 and counts["corpus"] >= 200
    harder_qrels(root)
    paths = [str(root / f"{n}.tsv") for n in ("queries", "corpus", "qrels")]
    model_dir = tmp_path / "minilm"
    with quiet_transformers():
        export_model("bundled:all-MiniLM-L6-v2", model_dir)
        encoder, tokenizer, _ = load_encoder(model_dir)
    data = load_retrieval(*paths)
    assert len(data.judged_queries) == counts["queries"] - 1  # the query judged only irrelevant is left out
    ours = evaluate_retrieval(encoder, tokenizer, data, torch.device("cpu"), batch_size=64, corpus_chunk_size=97)[
        View()
    ]  # several chunks, merged
    reference = st_reference(model_dir, paths)
    for name in ours:
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), (name, ours, reference)
    assert 0.5 < ours["ndcg@10"] < 1 and ours["map@10"] < ours["mrr@10"]  # a real model, a non-trivial set


@pytest.mark.slow
@needs_data
def test_eval_cli_retrieval_on_two_ranks_matches_sentence_transformers(tmp_path, tiny_bert):
    root = tmp_path / "set"
    build_sts_retrieval_set(
        SHARED_DATA / "stsb" / "dev.tsv",
        root,
        max_pairs=120,
        distractors=SHARED_DATA / "wiki1m-sample.txt",
        n_distractors=60,
    )
    harder_qrels(root, seed=2)
    paths = [str(root / f"{n}.tsv") for n in ("queries", "corpus", "qrels")]
    model_dir = tmp_path / "tiny"
    with quiet_transformers():  # avg_first_last: the layer pooler, WeightedLayerPooling on the ST side
        export_model(tiny_bert, model_dir, pooler="avg_first_last")
    out = tmp_path / "two-ranks.json"
    args = [
        "--model",
        str(model_dir),
        "--retrieval",
        *paths,
        "--corpus-chunk-size",
        "50",
        "--batch-size",
        "16",
        "--output-json",
        str(out),
        "--no-progress",
    ]
    proc = zygote.run(["-m", "simcse_dist.cli.eval", *args], ranks=2, env=ENV, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("nDCG@10 |") == 1  # rank 0 prints once
    got = json.loads(out.read_text())
    assert set(got) == {"retrieval/ndcg@10", "retrieval/mrr@10", "retrieval/recall@100", "retrieval/map@10"}
    reference = st_reference(model_dir, paths)
    for name, value in reference.items():
        assert got[f"retrieval/{name}"] / 100 == pytest.approx(value, abs=1e-6), (name, got, reference)


def _written_out_ranking(q: np.ndarray, c: np.ndarray, precision: str, k: int = 100) -> list[list[int]]:
    """Rank by the score of each format, written out: int8 codes' inner product; binary: fewest
    differing bits (Hamming); float: cosine. Equal scores: the lower corpus index first."""
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize

    if precision == "float32":
        qn, cn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, c))
        scores = qn.astype(np.float64) @ cn.astype(np.float64).T
    elif precision == "int8":
        qc, cc = (st_quantize(x, "int8", calibration_embeddings=c).astype(np.int64) for x in (q, c))
        scores = (qc @ cc.T).astype(np.float64)
    else:
        qb, cb = (np.unpackbits(st_quantize(x, "ubinary"), axis=1) for x in (q, c))
        scores = -(qb[:, None, :] != cb[None, :, :]).sum(-1).astype(np.float64)
    return [sorted(range(len(c)), key=lambda j, row=row: (-row[j], j))[:k] for row in scores]


@needs_data
def test_eval_dims_and_quantized_match_references(tmp_path):
    """simcse-eval --dims 384,64 --precision fp32,int8,binary: STS and retrieval at 64 dims equal
    sentence-transformers' evaluators with truncate_dim=64; int8 and binary retrieval equal a
    written-out ranking of sentence-transformers' own embeddings and quantize_embeddings codes."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    root = tmp_path / "set"
    build_sts_retrieval_set(
        SHARED_DATA / "stsb" / "dev.tsv",
        root,
        max_pairs=150,
        distractors=SHARED_DATA / "wiki1m-sample.txt",
        n_distractors=80,
    )
    paths = [str(root / f"{n}.tsv") for n in ("queries", "corpus", "qrels")]
    sts = tmp_path / "sts.tsv"
    sts.write_text("\n".join((SHARED_DATA / "stsb" / "dev.tsv").read_text().splitlines()[:151]) + "\n")
    model_dir = tmp_path / "minilm"
    with quiet_transformers():
        export_model("bundled:all-MiniLM-L6-v2", model_dir)
    out = tmp_path / "scores.json"
    args = ["--model", str(model_dir), "--sts-file", str(sts), "--retrieval", *paths, "--dims", "384,64"]
    args += ["--precision", "fp32,int8,binary", "--corpus-chunk-size", "100000", "--output-json", str(out)]
    assert eval_cli([*args, "--no-progress", "--batch-size", "64"]) == 0
    got = json.loads(out.read_text())

    data = load_retrieval(*paths)
    qids, docids = data.judged_queries, sorted(data.corpus)
    model = SentenceTransformer(str(model_dir), device="cpu")
    q = model.encode([data.queries[i] for i in qids], batch_size=64)
    c = model.encode([data.corpus[d] for d in docids], batch_size=64)
    for dim in (384, 64):
        prefix = "" if dim == 384 else f"dim{dim}/"
        truncated = SentenceTransformer(str(model_dir), device="cpu", truncate_dim=dim)
        pairs = read_pair_file(sts)
        st_sts = EmbeddingSimilarityEvaluator(pairs.sentences1, pairs.sentences2, pairs.scores, batch_size=64)(
            truncated
        )
        assert got[f"{prefix}sts.tsv"] == pytest.approx(100 * st_sts["spearman_cosine"], abs=1e-6), dim
        st_ir = st_reference(model_dir, paths, truncate_dim=dim)
        for name, value in st_ir.items():
            assert got[f"retrieval/{prefix}{name}"] / 100 == pytest.approx(value, abs=1e-6), (dim, name)
        for precision in ("int8", "binary"):
            rows = _written_out_ranking(q[:, :dim], c[:, :dim], precision)
            ranking = {qid: [docids[j] for j in row] for qid, row in zip(qids, rows, strict=True)}
            reference = retrieval_metrics(ranking, data.qrels)
            for name, value in reference.items():
                key = f"retrieval/{prefix}{precision}/{name}"
                assert got[key] / 100 == pytest.approx(value, abs=1e-6), (key, got[key], value)
    assert got["retrieval/dim64/binary/ndcg@10"] < got["retrieval/dim64/ndcg@10"]  # 64 bits lose to 64 floats
