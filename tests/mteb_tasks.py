"""Small versions of bench/mteb_local_tasks.py (MTEB tasks over rows of ../shared/data, loaded in
memory, nothing downloaded), so the adapter tests stay short. Imported only by tests that have
already checked that mteb is installed."""

from __future__ import annotations

import importlib.util

from helpers import REPO, SHARED_DATA

_spec = importlib.util.spec_from_file_location("mteb_local_tasks", REPO / "bench" / "mteb_local_tasks.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


class LocalSTSB(local.STSBenchmarkLocal):
    """The first 100 pairs of STS-B test."""

    max_pairs = 100


class LocalSTSRetrieval(local.STSRetrievalLocal):
    """Queries: sentence1 of the first 150 STS-B dev pairs scored >= 4; relevant: their sentence2;
    corpus: every sentence2 of those pairs and 60 Wikipedia sentences."""

    pairs_file = SHARED_DATA / "stsb" / "dev.tsv"
    max_pairs = 150
    n_distractors = 60
