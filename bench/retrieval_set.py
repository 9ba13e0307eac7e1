"""A small retrieval set built from STS pairs, for docs/evaluation.md. Nothing is copied into
the repo: the set is rebuilt from the shared data whenever needed
(simcse_dist.eval.retrieval.build_sts_retrieval_set says how).

    python -m bench.retrieval_set OUT_DIR                  # STS-B test pairs >= 4 + 2000 wiki distractors
    python -m bench.retrieval_set OUT_DIR --pairs ../shared/data/stsb/dev.tsv --max-pairs 300 --n-distractors 200
    simcse-eval --model MODEL --retrieval OUT_DIR/queries.tsv OUT_DIR/corpus.tsv OUT_DIR/qrels.tsv
"""

from __future__ import annotations

import argparse

from bench.common import REPO
from simcse_dist.eval.retrieval import build_sts_retrieval_set

SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument(
        "--pairs", default=str(SHARED / "stsb" / "test.tsv"), help="an STS pair file (sentence1 sentence2 score)"
    )
    p.add_argument(
        "--min-score", type=float, default=4.0, help="pairs scored at least this are query + relevant document"
    )
    p.add_argument("--max-pairs", type=int, default=None, help="read only the first N pairs")
    p.add_argument("--distractors", default=str(SHARED / "wiki1m-sample.txt"), help="one sentence per line")
    p.add_argument("--n-distractors", type=int, default=2000)
    args = p.parse_args()
    counts = build_sts_retrieval_set(
        args.pairs,
        args.out_dir,
        min_score=args.min_score,
        max_pairs=args.max_pairs,
        distractors=args.distractors,
        n_distractors=args.n_distractors,
    )
    print(f"{args.out_dir}: {counts['queries']} queries, {counts['corpus']} documents, {counts['qrels']} qrels")


if __name__ == "__main__":
    main()
