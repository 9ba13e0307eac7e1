"""MTEB tasks over local files, for machines without Hub access: the example behind
`simcse-eval --mteb bench/mteb_local_tasks.py:STSBenchmarkLocal` in docs/evaluation.md.

A task with local data is defined as mteb defines its own mock tasks (mteb/mocks/mock_tasks):
a subclass of an mteb task type with a TaskMetadata, whose load_data() fills self.dataset in
memory, so nothing is downloaded. Copy and adapt for your own data.

- STSBenchmarkLocal: STS-B test from ../shared/data/stsb/test.tsv (the pairs of MTEB's
  STSBenchmark; main score cosine Spearman, the number `simcse-eval --tasks stsb` gives / 100);
- STSRetrievalLocal: the retrieval set of `python -m bench.retrieval_set` (STS-B test pairs
  scored >= 4 + 2000 Wikipedia distractors; main score nDCG@10, as `simcse-eval --retrieval`
  on that set).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset, DatasetDict
from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

# Only simcse_dist and mteb are imported (no bench module): `simcse-eval --mteb FILE:Class`
# loads this file by path, from wherever it is run.
from simcse_dist.eval.retrieval import build_sts_retrieval_set, load_retrieval
from simcse_dist.eval.sts import read_pair_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
_COMMON = {
    "dataset": {"path": "local/simcse-dist", "revision": "1"},  # never downloaded: load_data is overridden
    "description": "Local rows of shared/data, evaluated offline.",
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "modalities": ["text"],
}


class STSBenchmarkLocal(AbsTaskSTS):
    metadata = TaskMetadata(name="STSBenchmarkLocal", type="STS", main_score="cosine_spearman", **_COMMON)
    min_score, max_score = 0, 5
    pairs_file: Path = SHARED / "stsb" / "test.tsv"
    max_pairs: int | None = None

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        pairs = read_pair_file(self.pairs_file)
        n = self.max_pairs
        self.dataset = DatasetDict(
            {
                "test": Dataset.from_dict(
                    {"sentence1": pairs.sentences1[:n], "sentence2": pairs.sentences2[:n], "score": pairs.scores[:n]}
                )
            }
        )
        self.data_loaded = True


class STSRetrievalLocal(AbsTaskRetrieval):
    metadata = TaskMetadata(name="STSRetrievalLocal", type="Retrieval", main_score="ndcg_at_10", **_COMMON)
    pairs_file: Path = SHARED / "stsb" / "test.tsv"
    max_pairs: int | None = None
    n_distractors: int = 2000

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            build_sts_retrieval_set(
                self.pairs_file,
                tmp,
                max_pairs=self.max_pairs,
                n_distractors=self.n_distractors,
                distractors=SHARED / "wiki1m-sample.txt",
            )
            data = load_retrieval(*(Path(tmp) / f"{name}.tsv" for name in ("queries", "corpus", "qrels")))
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": q, "text": t} for q, t in data.queries.items()]),
            corpus=Dataset.from_list([{"id": d, "text": t} for d, t in data.corpus.items()]),
            relevant_docs=data.qrels,
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True
