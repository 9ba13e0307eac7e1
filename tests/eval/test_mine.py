"""simcse-mine against sentence-transformers' `util.mine_hard_negatives` (the reference), on one
and two ranks; random sampling; bad input. Model: a tiny random BERT exported with mean
pooling, so that SentenceTransformer(dir) and simcse-mine encode the same way; data: the
repo's 216 demo NLI triplets (distinct anchors and positives, no anchor among the positives,
so the extra "never the anchor's own text" rule of simcse-mine does not come into play)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_DATA, REPO

from simcse_dist.cli.mine import main as mine_main

pytest.importorskip("datasets")  # mine_hard_negatives needs it

NLI = DEMO_DATA / "nli-demo.tsv"


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path | list]:
    rows = _rows(NLI)[1:]
    anchors, positives = [r[0] for r in rows], [r[1] for r in rows]
    assert len(set(anchors)) == len(anchors) and not set(anchors) & set(positives)
    d = tmp_path_factory.mktemp("mine-data")
    (d / "pairs.tsv").write_text(
        "sent0\tsent1\n" + "".join(f"{a}\t{p}\n" for a, p in zip(anchors, positives, strict=True))
    )
    (d / "corpus.txt").write_text("".join(f"{r[2]}\n" for r in rows))  # the contradictions as extra candidates
    return {
        "pairs": d / "pairs.tsv",
        "corpus": d / "corpus.txt",
        "anchors": anchors,
        "positives": positives,
        "extra": [r[2] for r in rows],
    }


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> Path:
    from simcse_dist.model.encoder import quiet_transformers
    from simcse_dist.model.export import export_model

    with quiet_transformers():
        return export_model(tiny_bert, tmp_path_factory.mktemp("mine-model") / "avg", pooler="avg")


@pytest.fixture(scope="module")
def st_model(model_dir):
    from sentence_transformers import SentenceTransformer

    from simcse_dist.model.encoder import quiet_transformers

    with quiet_transformers():
        return SentenceTransformer(str(model_dir), device="cpu")


def reference(st_model, data, corpus: bool = False, **options) -> dict[tuple[str, str], list[str]]:
    """(anchor, positive) -> negatives in score order, as mine_hard_negatives picks them."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    dataset = Dataset.from_dict({"anchor": data["anchors"], "positive": data["positives"]})
    out = mine_hard_negatives(
        dataset,
        st_model,
        corpus=data["extra"] if corpus else None,
        output_format="triplet",
        batch_size=64,
        verbose=False,
        **options,
    )
    picked: dict[tuple[str, str], list[str]] = {}
    for row in out:
        picked.setdefault((row["anchor"], row["positive"]), []).append(row["negative"])
    return picked


def mined(path: Path) -> dict[tuple[str, str], list[str]]:
    """simcse-mine's TSV as the same mapping; rows short of K repeat their negatives, hence the dedup."""
    return {(r[0], r[1]): list(dict.fromkeys(r[2:])) for r in _rows(path)[1:]}


def run_mine(model_dir, data, out: Path, *options: str, corpus: bool = False) -> int:
    args = [
        "--model",
        str(model_dir),
        "--input",
        str(data["pairs"]),
        "--output",
        str(out),
        "--batch-size",
        "64",
        "--no-progress",
        *options,
    ]
    return mine_main(args + (["--corpus", str(data["corpus"])] if corpus else []))


CASES = {  # simcse-mine options, the same for mine_hard_negatives; scaled to the tiny model's cosines (0.85-0.99)
    "top1-relative-margin": (
        ["--relative-margin", "0.05", "--range-max", "100"],
        dict(num_negatives=1, relative_margin=0.05, range_max=100),
        False,
    ),
    "top3-range-max-score": (
        # 0.9705: no score of the set lies within 5e-6 of it (at 0.97 one lay 6e-8 away, inside the
        # 2e-7 by which any two batchings' embeddings differ, and a batching decided the picks)
        ["--num-negatives", "3", "--range-min", "5", "--range-max", "40", "--max-score", "0.9705"],
        dict(num_negatives=3, range_min=5, range_max=40, max_score=0.9705),
        False,
    ),
    "top2-corpus-abs-margin-min-score": (
        ["--num-negatives", "2", "--absolute-margin", "0.02", "--min-score", "0.9"],
        dict(num_negatives=2, absolute_margin=0.02, min_score=0.9),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_top_equals_sentence_transformers(case, model_dir, st_model, data, tmp_path, capsys):
    options, st_options, corpus = CASES[case]
    expected = reference(st_model, data, corpus=corpus, sampling_strategy="top", **st_options)
    assert 0 < len(expected) < len(data["anchors"])  # the filters bite, and leave something
    assert run_mine(model_dir, data, tmp_path / "out.tsv", *options, corpus=corpus) == 0
    assert mined(tmp_path / "out.tsv") == expected
    K = st_options["num_negatives"]
    header = _rows(tmp_path / "out.tsv")[0]
    assert header == ["sent0", "sent1", *(["hard_neg"] if K == 1 else [f"hard_neg_{j}" for j in range(1, K + 1)])]
    out = capsys.readouterr().out
    assert f"dropped {len(data['anchors']) - len(expected)} rows" in out
    short = sum(len(v) < K for v in expected.values())
    assert (f"{short} rows have fewer than {K} negatives" in out) == (K > 1)


def test_packed_encoding_picks_what_sentence_transformers_picks(
    model_dir, st_model, data, tmp_path, capsys, monkeypatch
):
    """--pack-tokens: the batches are packed (no padding computed) and the picks stay the peer's."""
    import simcse_dist.eval.encode as encode_module

    packed_batches = []
    real_pack = encode_module.pack
    monkeypatch.setattr(encode_module, "pack", lambda *a: packed_batches.append(1) or real_pack(*a))
    options, st_options, corpus = CASES["top3-range-max-score"]
    expected = reference(st_model, data, corpus=corpus, sampling_strategy="top", **st_options)
    assert run_mine(model_dir, data, tmp_path / "out.tsv", *options, "--pack-tokens", "64") == 0
    assert packed_batches and "--pack-tokens" not in capsys.readouterr().out  # packed, not the padded fallback
    assert mined(tmp_path / "out.tsv") == expected


def test_faiss_search_equals_sentence_transformers_with_faiss(model_dir, st_model, data, tmp_path):
    pytest.importorskip("faiss")
    expected = reference(
        st_model, data, sampling_strategy="top", num_negatives=2, range_max=30, max_score=0.98, use_faiss=True
    )
    assert (
        run_mine(
            model_dir,
            data,
            tmp_path / "out.tsv",
            "--faiss",
            "--num-negatives",
            "2",
            "--range-max",
            "30",
            "--max-score",
            "0.98",
        )
        == 0
    )
    assert mined(tmp_path / "out.tsv") == expected


def test_output_trains_as_sup(model_dir, data, tmp_path):
    """K = 1 reads as (sent0, sent1, hard_neg); K > 1 as the same triplets with hard_neg_1, the best."""
    from simcse_dist.data.readers import read_train_examples

    for K in (1, 3):
        out = tmp_path / f"k{K}.tsv"
        assert run_mine(model_dir, data, out, "--num-negatives", str(K), "--range-max", "20") == 0
        examples, _ = read_train_examples(str(out))
        assert examples == [tuple(row[:3]) for row in _rows(out)[1:]]
        assert len(examples) == len(data["anchors"])


def test_random_sampling_is_seeded_and_within_the_window(model_dir, st_model, data, tmp_path):
    window = reference(
        st_model, data, sampling_strategy="top", num_negatives=10, range_min=3, range_max=13, max_score=0.98
    )
    assert any(len(w) < 10 for w in window.values())  # max_score thins some windows
    options = [
        "--sampling",
        "random",
        "--num-negatives",
        "2",
        "--range-min",
        "3",
        "--range-max",
        "13",
        "--max-score",
        "0.98",
    ]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert run_mine(model_dir, data, tmp_path / f"{name}.tsv", *options, "--seed", seed) == 0
    a, b, c = (mined(tmp_path / f"{n}.tsv") for n in "abc")
    assert a == b and a != c
    for picks in (a, c):
        assert picks.keys() == window.keys()
        for key, negatives in picks.items():
            assert set(negatives) <= set(window[key]) and len(negatives) == min(2, len(window[key]))


def mine_on_two_ranks(model_dir, data, out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "simcse_dist.cli.mine",
        "--model",
        str(model_dir),
        "--input",
        str(data["pairs"]),
        "--output",
        str(out),
        "--batch-size",
        "64",
        "--no-progress",
        *options,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_two_ranks_write_what_one_rank_writes(model_dir, data, tmp_path):
    options = [
        "--sampling",
        "random",
        "--num-negatives",
        "2",
        "--range-min",
        "2",
        "--range-max",
        "30",
        "--max-score",
        "0.98",
        "--seed",
        "7",
    ]
    assert run_mine(model_dir, data, tmp_path / "one.tsv", *options) == 0
    proc = mine_on_two_ranks(model_dir, data, tmp_path / "two.tsv", *options)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 rank(s)" in proc.stdout
    assert (tmp_path / "two.tsv").read_bytes() == (tmp_path / "one.tsv").read_bytes()


def test_a_failed_write_on_rank_0_ends_both_ranks_with_one_line(model_dir, data, tmp_path):
    """Rank 0 writes the TSV alone; when that fails, rank 1 learns it from the agreement that
    follows (no barrier waiting for a rank that failed), and the error is one line, exit 4."""
    out = Path("/proc/simcse-no-such-dir/out.tsv")  # nothing can be created under /proc
    proc = mine_on_two_ranks(model_dir, data, out)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: cannot write {out}") == 1, proc.stderr[-4000:]
    assert "exitcode  : 4" in proc.stderr and "[rank0]: Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "[rank1]" not in proc.stderr, proc.stderr[-4000:]  # rank 1 left cleanly


def test_bad_input_is_one_clear_error(model_dir, data, tmp_path, capsys):
    one_column = tmp_path / "one-column.tsv"
    one_column.write_text("sent0\na sentence\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        (["--input", str(one_column)], f"{one_column}: mining needs (anchor, positive) pairs"),
        (["--corpus", str(empty)], f"{empty}: no examples"),
        (["--num-negatives", "500"], "--num-negatives 500: only 216 distinct candidate texts"),
        (["--num-negatives", "5", "--range-min", "8", "--range-max", "10"], "--range-max 10 leaves 2 candidates"),
        (["--output", str(tmp_path / "out.csv")], "must end in .tsv"),
    ]
    for options, message in cases:
        base = {"--input": str(data["pairs"]), "--output": str(tmp_path / "out.tsv")}
        base.update(dict(zip(options[::2], options[1::2], strict=True)))
        rc = mine_main(["--model", str(model_dir), *(x for kv in base.items() for x in kv)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out.tsv").exists()
