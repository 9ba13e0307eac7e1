"""Tests for data/readers.py."""

import gzip
import hashlib
import sys
from pathlib import Path

import pytest
from helpers import SHARED_DATA

from simcse_dist.data.readers import (
    FORMATS,
    DataError,
    ReadStats,
    TrainRows,
    detect_format,
    read_train_examples,
    resolve_path,
)
from simcse_dist.eval.sts import read_pair_file

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def error(func, *args) -> str:
    with pytest.raises(DataError) as info:
        func(*args)
    return str(info.value)


# --- txt ---------------------------------------------------------------------------------


def test_txt_strips_skips_and_counts_blank_lines(tmp_path):
    p = write(tmp_path, "wiki.txt", "  first sentence \n\nsecond\tone\n   \n中文句子，不要拆分。 \n")
    examples, stats = read_train_examples(p)
    assert examples == [("first sentence",), ("second\tone",), ("中文句子，不要拆分。",)]
    assert stats == ReadStats(path=p, rows=3, blank_lines=2)


def test_txt_bom_crlf_and_no_trailing_newline(tmp_path):
    p = write(tmp_path, "a.text", b"\xef\xbb\xbfone, two\r\nthree")
    assert read_train_examples(p)[0] == [("one, two",), ("three",)]


def test_txt_blank_only_and_bad_utf8(tmp_path):
    p = write(tmp_path, "blank.txt", "\n  \n")
    assert error(read_train_examples, p) == f"{p}: no examples"
    p = write(tmp_path, "bad.txt", b"ok\n\xff\xfe\n")
    assert error(read_train_examples, p).startswith(f"{p}:2: not valid UTF-8")


# --- csv / tsv ---------------------------------------------------------------------------


def test_csv_quoted_commas_and_quotes(tmp_path):
    text = 'sent0,sent1,hard_neg\n"Hello, world","He said ""hi""",plain\n\n a , b ,c\n'
    p = write(tmp_path, "nli.csv", text)
    examples, stats = read_train_examples(p)
    assert examples == [("Hello, world", 'He said "hi"', "plain"), ("a", "b", "c")]
    assert stats == ReadStats(path=p, rows=2, blank_lines=1)


def test_csv_multiline_record_keeps_line_numbers(tmp_path):
    p = write(tmp_path, "m.csv", 'sent0\n"a\nb"\nc,d\n')
    assert error(read_train_examples, p) == f"{p}:4: expected 1 fields (sent0), got 2"


def test_tsv_quotes_are_literal(tmp_path):
    # With default CSV quoting the opening quote would swallow the next line.
    p = write(tmp_path, "pairs.tsv", 'sent0\tsent1\n"quoted start\tb\nc"\td "e"\n')
    examples, stats = read_train_examples(p)
    assert examples == [('"quoted start', "b"), ('c"', 'd "e"')]
    assert stats.rows == 2 and stats.blank_lines == 0


@pytest.mark.parametrize(
    ("header", "row", "expected"),
    [
        ("sent0", "a", ("a",)),
        ("text", "a", ("a",)),
        ("sentence", "a", ("a",)),
        ("sent0\tsent1", "a\tb", ("a", "b")),
        ("sent0\tsent1\thard_neg", "a\tb\tc", ("a", "b", "c")),
        ("anchor\tentailment\tcontradiction", "a\tb\tc", ("a", "b", "c")),
        ("Hard_Neg\tsent0\tsent1", "c\ta\tb", ("a", "b", "c")),
    ],
)
def test_table_layouts(tmp_path, header, row, expected):
    p = write(tmp_path, "d.tsv", f"{header}\n{row}\n")
    assert read_train_examples(p) == ([expected], ReadStats(path=p, rows=1, blank_lines=0))
    p = write(tmp_path, "d.csv", f"{header}\n{row}\n".replace("\t", ","))
    assert read_train_examples(p)[0] == [expected]


def test_table_bad_row_names_file_and_line(tmp_path):
    p = write(tmp_path, "x.tsv", "sent0\tsent1\thard_neg\na\tb\tc\n\na\tb\n")
    assert error(read_train_examples, p) == f"{p}:4: expected 3 fields (sent0, sent1, hard_neg), got 2"


def test_table_empty_field(tmp_path):
    p = write(tmp_path, "x.csv", "sent0,sent1\na,b\nc,  \n")
    assert error(read_train_examples, p) == f"{p}:3: empty field 'sent1'"
    p = write(tmp_path, "x.tsv", "anchor\tentailment\tcontradiction\n\tb\tc\n")
    assert error(read_train_examples, p) == f"{p}:2: empty field 'anchor'"


def test_table_unknown_header_and_header_only(tmp_path):
    p = write(tmp_path, "x.csv", "\nquestion,answer\na,b\n")
    msg = error(read_train_examples, p)
    assert msg.startswith(f"{p}:2: unrecognised header 'question,answer'; accepted layouts: ")
    assert "sent0,sent1,hard_neg" in msg and "anchor,entailment,contradiction" in msg
    p = write(tmp_path, "h.tsv", "sent0\tsent1\n\n")
    assert error(read_train_examples, p) == f"{p}: no examples"


# --- jsonl -------------------------------------------------------------------------------


def test_jsonl_cnsd_layout_with_chinese(tmp_path):
    lines = [
        '{"origin": "一个女人在弹吉他。", "entailment": "有人在弹奏乐器。", "contradiction": "一个男人在睡觉。"}',
        "",
        '{"contradiction": "c", "origin": "a", "entailment": "b"}',
    ]
    p = write(tmp_path, "cnsd.jsonl", "\n".join(lines) + "\n")
    examples, stats = read_train_examples(p)
    assert examples == [("一个女人在弹吉他。", "有人在弹奏乐器。", "一个男人在睡觉。"), ("a", "b", "c")]
    assert stats == ReadStats(path=p, rows=2, blank_lines=1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"sent0": "a", "sent1": "b", "hard_neg": "c"}', ("a", "b", "c")),
        ('{"sent1": "b", "sent0": "a"}', ("a", "b")),
        ('{"sent0": "a"}', ("a",)),
        ('{"text": " a "}', ("a",)),
        ('{"origin": "a"}', ("a",)),
    ],
)
def test_jsonl_layouts(tmp_path, line, expected):
    p = write(tmp_path, "d.json", line + "\n")
    assert read_train_examples(p)[0] == [expected]


def test_jsonl_mixed_layout(tmp_path):
    p = write(tmp_path, "m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"sent0": "c"}\n')
    assert error(read_train_examples, p) == f"{p}:3: keys ['sent0'] differ from the first line's ['text']"


def test_jsonl_invalid_json_and_bad_values(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": "b",}\n')
    assert error(read_train_examples, p).startswith(f"{p}:2: invalid JSON: ")
    p = write(tmp_path, "num.jsonl", '{"sent0": "a", "sent1": 3}\n')
    assert error(read_train_examples, p) == f"{p}:1: 'sent1' must be a non-empty string, got 3"
    p = write(tmp_path, "empty.jsonl", '{"text": "a"}\n{"text": "  "}\n')
    assert error(read_train_examples, p) == f"{p}:2: 'text' must be a non-empty string, got '  '"
    p = write(tmp_path, "list.jsonl", '["a", "b"]\n')
    assert error(read_train_examples, p) == f"{p}:1: expected a JSON object, got list"
    p = write(tmp_path, "keys.jsonl", '{"origin": "a", "entailment": "b"}\n')
    assert error(read_train_examples, p).startswith(f"{p}:1: unrecognised keys ['entailment', 'origin']")


# --- formats and paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.txt", "txt"),
        ("a.TEXT", "txt"),
        ("dir.v2/a.csv", "csv"),
        ("a.TSV", "tsv"),
        ("a.jsonl", "jsonl"),
        ("a.json", "jsonl"),
        ("hf://datasets/o/r/x.tsv", "tsv"),
        ("a.parquet", "parquet"),
        ("wiki.txt.gz", "txt"),
        ("d/nli.TSV.GZ", "tsv"),
        ("x.jsonl.gz", "jsonl"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


def test_detect_format_unknown():
    msg = error(detect_format, "data/train.xml")
    assert msg.startswith("data/train.xml: cannot tell the data format from the extension '.xml'")
    assert all(f in msg for f in FORMATS) and "data.format" in msg
    assert "'(none)'" in error(detect_format, "data/train")


def test_explicit_format_and_missing_file(tmp_path):
    p = write(tmp_path, "sentences.dat", "a\nb\n")
    assert read_train_examples(p, fmt="txt")[0] == [("a",), ("b",)]
    assert (
        error(read_train_examples, p, "xml")
        == f"{p}: unknown data format 'xml'; expected one of txt, csv, tsv, jsonl, parquet"
    )
    missing = str(tmp_path / "nope.tsv")
    assert error(read_train_examples, missing) == f"{missing}: file not found"
    assert error(read_sts_pairs, missing) == f"{missing}: file not found"


def test_resolve_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("data/x.tsv") == "data/x.tsv"
    assert resolve_path("~/x.tsv") == f"{tmp_path}/x.tsv"


def test_resolve_hf_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = "hf://datasets/nobody-xyz/no-such-repo/train.tsv"
    msg = error(resolve_path, ref)
    assert msg.startswith(f"{ref}: the file could not be fetched from the Hugging Face Hub (")
    assert msg.endswith("download it and pass a local path instead")


def test_resolve_hf_parses_reference(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return "/cache/file"

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_path("hf://datasets/owner/repo/data/nli.csv") == "/cache/file"
    assert resolve_path("hf://owner/repo/wiki.txt") == "/cache/file"
    assert calls == [
        {"repo_id": "owner/repo", "filename": "data/nli.csv", "repo_type": "dataset", "local_files_only": False},
        {"repo_id": "owner/repo", "filename": "wiki.txt", "repo_type": "dataset", "local_files_only": False},
    ]
    assert (
        error(resolve_path, "hf://owner/repo") == "hf://owner/repo: expected hf://datasets/<owner>/<repo>/<file path>"
    )


# --- STS pairs (sts.read_pair_file, what training and simcse-eval read) -------------------


def read_sts_pairs(path):
    data = read_pair_file(path)
    return data.sentences1, data.sentences2, data.scores


def test_sts_header_tsv(tmp_path):
    text = 'subset\tscore\tsentence1\tsentence2\nheadlines\t2.500\tA "quoted\tB\n\nforums\t3\tC\tD "x"\n'
    p = write(tmp_path, "sts.tsv", text)
    assert read_sts_pairs(p) == (['A "quoted', "C"], ["B", 'D "x"'], [2.5, 3.0])


def test_sts_original_stsb(tmp_path):
    rows = [
        "main-captions\tMSRvid\t2012test\t0000\t5.000\tA man with a hard hat is dancing.\tA man wearing one.",
        "main-news\theadlines\t2015\t0001\t0.8\tFirst.\tSecond.\tsource-a\tsource-b",
    ]
    p = write(tmp_path, "sts-dev.csv", "\n".join(rows) + "\n")
    assert read_sts_pairs(p) == (
        ["A man with a hard hat is dancing.", "First."],
        ["A man wearing one.", "Second."],
        [5.0, 0.8],
    )
    p = write(tmp_path, "short.csv", rows[0] + "\nmain\tx\t2012\t1\t2.0\tonly one\n")
    assert error(read_sts_pairs, p).startswith(f"{p}:2: expected at least 7 '\\t'-separated fields")


def test_sts_chinese_pipes(tmp_path):
    p = write(tmp_path, "cnsd.txt", "0||一个女人在切洋葱。||一个男人在切洋葱，很快。||2\n1||a||b||4.5\n")
    assert read_sts_pairs(p) == (["一个女人在切洋葱。", "a"], ["一个男人在切洋葱，很快。", "b"], [2.0, 4.5])
    p = write(tmp_path, "bad.txt", "0||a||b||2\n1||a||b\n")
    assert (
        error(read_sts_pairs, p) == f"{p}:2: expected 4 '||'-separated fields (id||sentence1||sentence2||score), got 3"
    )


def test_sts_bad_score_and_empty(tmp_path):
    p = write(tmp_path, "s.tsv", "sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\thigh\n")
    assert error(read_sts_pairs, p) == f"{p}:3: score 'high' is not a number"
    p = write(tmp_path, "n.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n")
    assert error(read_sts_pairs, p) == f"{p}:2: score 'nan' is not a number"
    p = write(tmp_path, "e.tsv", "sentence1\tsentence2\tscore\n\n")
    assert error(read_sts_pairs, p) == f"{p}: no sentence pairs"


# --- the shared data set -----------------------------------------------------------------


@needs_data
def test_real_stsb_dev():
    s1, s2, scores = read_sts_pairs(str(DATA / "stsb" / "dev.tsv"))
    assert len(s1) == len(s2) == len(scores) == 1500
    assert (s1[0], s2[0], scores[0]) == (
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
        5.0,
    )
    assert all(0.0 <= s <= 5.0 for s in scores)


@needs_data
def test_real_cnsd_stsb_dev():
    s1, s2, scores = read_sts_pairs(str(DATA / "cnsd-stsb" / "dev.tsv"))
    assert len(s1) == len(s2) == len(scores) == 1458
    assert (s1[1], s2[1], scores[1]) == ("一个小孩在骑马。", "孩子在骑马。", 4.0)


@needs_data
def test_real_nli_sample():
    path = str(DATA / "nli-sample.tsv")
    examples, stats = read_train_examples(path)
    assert stats == ReadStats(path=path, rows=5883, blank_lines=0)
    assert all(len(e) == 3 for e in examples)
    assert examples[0] == (
        "Two women are embracing while holding to go packages .",
        "Two woman are holding packages .",
        "The men are fighting outside a deli .",
    )


@needs_data
def test_real_wiki1m_sample():
    path = str(DATA / "wiki1m-sample.txt")
    examples, stats = read_train_examples(path)
    assert stats == ReadStats(path=path, rows=11914, blank_lines=0)
    assert all(len(e) == 1 for e in examples)
    assert examples[0] == ("YMCA in South Australia",)


def test_mined_k_negatives_read_as_triplets_with_the_best_negative(tmp_path):
    """simcse-mine's K > 1 output (hard_neg_1 is the highest-scoring negative)."""
    p = write(tmp_path, "mined.tsv", "sent0\tsent1\thard_neg_1\thard_neg_2\thard_neg_3\na\tb\tc1\tc2\tc3\n")
    assert read_train_examples(p)[0] == [("a", "b", "c1")]
    p = write(tmp_path, "gap.tsv", "sent0\tsent1\thard_neg_1\thard_neg_3\na\tb\tc1\tc3\n")
    assert "unrecognised header" in error(read_train_examples, p)


# --- streaming (TrainRows): what data/prepare.py reads ----------------------------------


def test_train_rows_stream_before_a_late_error(tmp_path):
    p = write(tmp_path, "late.tsv", "sent0\tsent1\n" + "".join(f"a{i}\tb{i}\n" for i in range(5)) + "\nbad\n")
    rows = TrainRows(p)
    it = iter(rows)
    assert next(it) == (2, ("a0", "b0")) and rows.layout == ("sent0", "sent1")
    assert [next(it)[0] for _ in range(4)] == [3, 4, 5, 6]
    with pytest.raises(DataError) as e:
        next(it)
    assert str(e.value) == f"{p}:8: expected 2 fields (sent0, sent1), got 1" and rows.blank_lines == 1


@pytest.mark.parametrize("name", ["w.txt", "w.txt.gz", "n.csv", "n.jsonl.gz"])
def test_train_rows_hash_the_bytes_as_stored(tmp_path, name):
    text = {"w": "one\n\n two \nthree", "n": 'sent0,sent1\n"x, y",z\n'}[name[0]]
    if ".jsonl" in name:
        text = '{"sent0": "x, y", "sent1": "z"}\n'
    data = text.encode() * 3000  # several read buffers
    if name.endswith(".gz"):
        data = gzip.compress(data)
    p = tmp_path / name
    p.write_bytes(data)
    h = hashlib.sha256()
    rows = [fields for _, fields in TrainRows(str(p), hasher=h)]
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    if name != "n.csv":
        assert rows == read_train_examples(str(p))[0]


def test_train_rows_chunks(tmp_path):
    p = write(tmp_path, "t.tsv", "sent0\tsent1\thard_neg\n" + "".join(f"a{i}\tb{i}\tc{i}\n" for i in range(7)))
    sup = list(TrainRows(p).chunks(3, "sup"))
    assert [(i, n) for i, _, n in sup] == [(0, 3), (1, 3), (2, 1)]
    assert sup[1][1] == [["a3", "a4", "a5"], ["b3", "b4", "b5"], ["c3", "c4", "c5"]]
    unsup = list(TrainRows(p).chunks(7, "unsup", skip=lambda i: i == 0))
    assert unsup == [(0, None, 7)]  # exactly one full chunk: no empty one after it
    assert [c for _, c, _ in TrainRows(p).chunks(4, "unsup")] == [[["a0", "a1", "a2", "a3"]], [["a4", "a5", "a6"]]]
    one = write(tmp_path, "one.txt", "x\ny\n")
    with pytest.raises(DataError, match=r"one.txt: train.objective=sup needs sent0,sent1\[,hard_neg\] columns"):
        next(TrainRows(one).chunks(1, "sup"))
    with pytest.raises(DataError, match="no examples"):
        next(TrainRows(write(tmp_path, "e.txt", "\n")).chunks(1, "unsup"))


def test_parquet_layouts_and_errors(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"entailment": ["b", " b2 "], "origin": ["a", "a2"], "contradiction": ["c", "c2"]}), p)
    assert read_train_examples(p) == ([("a", "b", "c"), ("a2", "b2", "c2")], ReadStats(path=p, rows=2, blank_lines=0))
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), p)
    assert error(read_train_examples, p).startswith(f"{p}: unrecognised columns ['answer', 'question']; accepted: ")
    pq.write_table(pa.table({"text": ["a", "", "c"]}), p)
    assert error(read_train_examples, p) == f"{p}:2: 'text' must be a non-empty string, got ''"
    bad = write(tmp_path, "bad.parquet", "not parquet")
    assert error(read_train_examples, bad).startswith(f"{bad}: cannot read as parquet: ")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert error(read_train_examples, p) == f"{p}: reading parquet needs pyarrow (pip install pyarrow)"
