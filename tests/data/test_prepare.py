"""data/prepare.py and corpus.py: prepared ids equal on-the-fly tokenization, batches equal
data.Collator's, hashes equal blake2b, the build is deterministic across workers, keyed without
reading the file, resumable after SIGKILL, streaming (bounded memory) and exact about errors.
Every reference is independent: the tokenizer itself, data.Collator, readers.read_train_examples."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

from simcse_dist.cli import prepare as prepare_cli
from simcse_dist.config import resolve_model_path
from simcse_dist.data import prepare
from simcse_dist.data.collate import Collator, CorpusCollator
from simcse_dist.data.corpus import PreparedCorpus
from simcse_dist.data.inputs import resolve_inputs
from simcse_dist.data.prepare import corpus_key, default_cache_root, open_or_prepare
from simcse_dist.data.readers import DataError, read_train_examples

MAX_LEN = 16
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up and leaves.",
    "Zoë's café served crème brûlée — naïvely priced at €3.50!",
    "北京是中国的首都。",
    "x",
    "Numbers like 3.14159 and 2,718 and URLs like https://example.org/a?b=c are split oddly.",
    "   leading and trailing spaces   ",
    "CamelCaseWordsAndALLCAPS get lower-cased by uncased vocabularies.",
    "Emoji 🙂 and\u00a0non-breaking\u2003spaces.",
    "Short one.",
]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"), use_fast=True)


def blake63(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tsv(path: Path, rows, header=("sent0", "sent1", "hard_neg")) -> Path:
    return write_lines(path, ["\t".join(r) for r in [header, *rows]])


def nli_rows(n: int = 30) -> list[tuple[str, str, str]]:
    return [(SENTENCES[i % 10], SENTENCES[(i + 3) % 10].strip() + f" {i}", SENTENCES[(i + 7) % 10]) for i in range(n)]


def prep(path, objective, tok, tmp_path, max_len=MAX_LEN, fmt=None, cache="c", **kw) -> PreparedCorpus:
    return open_or_prepare(str(path), fmt, objective, tok, max_len, cache_dir=tmp_path / cache, **kw)


def assert_ids_equal(corpus: PreparedCorpus, examples, tok, max_len: int) -> None:
    assert corpus.num_rows == len(examples)
    for c in range(corpus.num_columns):
        texts = [ex[c] for ex in examples]
        ref = tok(texts, truncation=True, max_length=max_len)
        for i in range(len(texts)):
            assert corpus.ids(c, i).tolist() == ref["input_ids"][i], (c, i, texts[i])
            if "token_type_ids" in ref:
                assert corpus.token_type_ids(c, i).tolist() == ref["token_type_ids"][i]
            else:
                assert corpus.token_type_ids(c, i) is None


def assert_batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of an entry but build.json (its timing)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "build.json"
    }


def test_real_wiki_ids_and_batches_across_shards(tmp_path, minilm, tiny_bert, shared_data):
    from transformers import AutoTokenizer

    path = write_lines(
        tmp_path / "wiki.txt", (shared_data / "wiki1m-sample.txt").read_text("utf-8").splitlines()[:2000]
    )
    examples, _ = read_train_examples(str(path))
    for tok in (minilm, AutoTokenizer.from_pretrained(tiny_bert, use_fast=True)):
        corpus = prep(path, "unsup", tok, tmp_path, max_len=32, shard_rows=700)
        assert [s["rows"] for s in corpus.manifest["shards"]] == [700, 700, 600]
        assert corpus.manifest["id_dtype"] == "uint16" and corpus.shard(2).ids[0].dtype == np.uint16
        assert_ids_equal(corpus, examples, tok, 32)
        ref, fast = Collator(tok, 32, "unsup"), CorpusCollator(corpus, tok.pad_token_id, "unsup")
        rng = random.Random(0)
        for size in (1, 7, 64):
            indices = rng.sample(range(len(examples)), size)
            assert_batches_equal(ref([examples[i] for i in indices]), fast(indices))
        assert_batches_equal(ref([examples[i] for i in range(690, 710)]), fast(list(range(690, 710))))
    assert not list((tmp_path / "c").glob("*.partial"))  # nothing left over


def test_real_nli_sup_and_unsup(tmp_path, minilm, shared_data):
    path = shared_data / "nli-sample.tsv"
    triplets, _ = read_train_examples(str(path))
    sup = prep(path, "sup", minilm, tmp_path, shard_rows=2000)
    assert sup.num_columns == 3 and len(sup.manifest["shards"]) == 3
    assert_ids_equal(sup, triplets, minilm, MAX_LEN)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(triplets), 300)
    assert sup.hashes(rows).tolist() == [[blake63(t) for t in triplets[r]] for r in rows.tolist()]
    everything = rng.permutation(len(triplets))  # > 1024 rows: grouped by shard
    assert sup.hashes(everything).tolist() == [[blake63(t) for t in triplets[r]] for r in everything.tolist()]
    ref, fast = Collator(minilm, MAX_LEN, "sup"), CorpusCollator(sup, minilm.pad_token_id, "sup")
    for size in (1, 5, 64):
        indices = rng.integers(0, len(triplets), size).tolist()
        assert_batches_equal(ref([triplets[i] for i in indices]), fast(indices))
    unsup = prep(path, "unsup", minilm, tmp_path)  # the first column, its own entry
    assert unsup.num_columns == 1 and unsup.directory != sup.directory
    assert unsup.hashes(np.arange(3)).tolist() == [[blake63(t[0])] for t in triplets[:3]]
    assert_ids_equal(unsup, [(t[0],) for t in triplets], minilm, MAX_LEN)


@pytest.mark.parametrize("variant", ["plain", "no-types", "left-padding", "nonzero-types", "pairs"])
def test_batches_equal_collator_for_tokenizer_settings(tmp_path, minilm, variant):
    from tokenizers import processors
    from transformers import AutoTokenizer

    name = resolve_model_path("bundled:all-MiniLM-L6-v2")
    tok = {
        "plain": lambda: minilm,
        "no-types": lambda: AutoTokenizer.from_pretrained(name, model_input_names=["input_ids", "attention_mask"]),
        "left-padding": lambda: AutoTokenizer.from_pretrained(name, padding_side="left"),
        "nonzero-types": lambda: AutoTokenizer.from_pretrained(name),
        "pairs": lambda: minilm,
    }[variant]()
    if variant == "nonzero-types":  # stored types files (BERT's single-sentence types are all 0)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS]:1 $A:1 [SEP]:1", special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)]
        )
    rows = nli_rows()
    if variant == "pairs":
        rows = [r[:2] for r in rows]
    path = write_tsv(tmp_path / "d.tsv", rows, ("sent0", "sent1", "hard_neg")[: len(rows[0])])
    examples, _ = read_train_examples(str(path))
    for objective in ("unsup", "sup"):
        corpus = prep(path, objective, tok, tmp_path, shard_rows=8)
        if variant == "nonzero-types":
            assert (corpus.directory / "shards" / "shard-000000-00001" / "types_0.npy").is_file()
        exs = examples if objective == "sup" else [(e[0],) for e in examples]
        ref, fast = Collator(tok, MAX_LEN, objective), CorpusCollator(corpus, tok.pad_token_id, objective)
        for indices in ([3], [0, 7, 7, 29], list(range(30)), [29, 8, 16, 0, 15]):
            assert_batches_equal(ref([exs[i] for i in indices]), fast(indices))


def test_collator_pickles_without_copying_the_maps(tmp_path, minilm):
    import pickle

    corpus = prep(write_lines(tmp_path / "s.txt", SENTENCES), "unsup", minilm, tmp_path, shard_rows=3)
    collate = CorpusCollator(corpus, minilm.pad_token_id, "unsup")
    collate([1, 5, 9])
    blob = pickle.dumps(collate)
    assert len(blob) < 2000
    assert_batches_equal(pickle.loads(blob)([4, 0, 9]), collate([4, 0, 9]))


def test_two_workers_write_identical_bytes(tmp_path, minilm, shared_data, caplog):
    path = write_lines(
        tmp_path / "wiki.txt", (shared_data / "wiki1m-sample.txt").read_text("utf-8").splitlines()[:3000]
    )
    one = prep(path, "unsup", minilm, tmp_path, max_len=32, cache="one", shard_rows=500)
    with caplog.at_level(logging.INFO, logger="simcse_dist"):
        two = prep(path, "unsup", minilm, tmp_path, max_len=32, cache="two", shard_rows=500, workers=2)
    said = caplog.messages
    assert "2 worker(s)" in said[0] and said[-1].startswith("preparing wiki.txt: 3,000 rows, 6 shard(s)")
    assert tree_bytes(one.directory) == tree_bytes(two.directory)
    assert len(tree_bytes(one.directory)) == 1 + 6 * 4  # manifest; ids, offsets, hashes, shard.json
    assert one.build_seconds > 0 and json.loads((two.directory / "build.json").read_text())["workers"] == 2


def test_key_from_metadata_and_hits_do_not_read(tmp_path, minilm, monkeypatch):
    from transformers import AutoTokenizer

    path = write_lines(tmp_path / "s.txt", SENTENCES)
    base = prep(path, "unsup", minilm, tmp_path)
    assert base.built and base.fingerprint == {
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert prep(path, "unsup", minilm, tmp_path, max_len=17).directory != base.directory
    left = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"), padding_side="left")
    assert prep(path, "unsup", left, tmp_path).directory != base.directory

    # A hit neither reads nor hashes the file: same size and mtime, other bytes -> the old entry.
    st = path.stat()
    path.write_text(path.read_text("utf-8").replace("Short one.", "Short two."), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(prepare, "UnitReader", None)  # any read would fail
    hit = prep(path, "unsup", minilm, tmp_path)
    assert not hit.built and hit.directory == base.directory
    monkeypatch.undo()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime: a new key
    changed = prep(path, "unsup", minilm, tmp_path)
    assert changed.built and changed.directory != base.directory
    assert changed.ids(0, 9).tolist() == minilm("Short two.", truncation=True, max_length=MAX_LEN)["input_ids"]
    with path.open("a") as f:
        f.write("one more\n")
    assert corpus_key(resolve_inputs(str(path)), "unsup", minilm, MAX_LEN)[0] != changed.manifest["key"]


def test_gzip_and_parquet(tmp_path, minilm):
    rows = nli_rows(25)
    plain = write_tsv(tmp_path / "d.tsv", rows)
    gz = tmp_path / "d.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = prep(plain, "sup", minilm, tmp_path, shard_rows=10), prep(gz, "sup", minilm, tmp_path, shard_rows=10)
    assert b.fingerprint["sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()  # the bytes as stored
    assert {k: v for k, v in tree_bytes(a.directory).items() if k != "manifest.json"} == {
        k: v for k, v in tree_bytes(b.directory).items() if k != "manifest.json"
    }
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"hard_neg": [r[2] for r in rows], "sent0": [r[0] for r in rows], "sent1": [r[1] for r in rows]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    c = prep(tmp_path / "d.parquet", "sup", minilm, tmp_path, shard_rows=10)
    # parquet is hashed per row group: the bytes from each group's first page to the next group's
    data, meta = (tmp_path / "d.parquet").read_bytes(), pq.read_metadata(tmp_path / "d.parquet")
    starts = [
        min(min(col.data_page_offset, col.dictionary_page_offset or col.data_page_offset) for col in cols)
        for cols in ([meta.row_group(g).column(i) for i in range(3)] for g in range(1, meta.num_row_groups))
    ]
    bounds = [0, *starts, len(data)]
    parts = [hashlib.sha256(data[a:b]).hexdigest() for a, b in zip(bounds, bounds[1:], strict=False)]
    assert len(parts) == 4 and c.fingerprint["sha256"] == hashlib.sha256("\n".join(parts).encode()).hexdigest()
    assert {k: v for k, v in tree_bytes(a.directory).items() if k != "manifest.json"} == {
        k: v for k, v in tree_bytes(c.directory).items() if k != "manifest.json"
    }
    pq.write_table(pa.table({"sent0": ["a"] * 12 + [None], "sent1": ["b"] * 13}), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        prep(tmp_path / "bad.parquet", "sup", minilm, tmp_path, shard_rows=5)
    assert str(e.value) == f"{tmp_path / 'bad.parquet'}:13: 'sent0' must be a non-empty string, got None"


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_malformed_row_in_a_later_shard_names_file_and_line(tmp_path, minilm, fmt):
    if fmt == "jsonl":
        lines = [json.dumps({"sent0": f"a {i}", "sent1": f"b {i}"}) for i in range(40)]
        lines[33] = '{"sent0": "a", "sent1": "b",}'
    else:
        lines = ["sent0\tsent1"] + [f"a {i}\tb {i}" for i in range(40)]
        lines[33] = "a\tb\tc"
    lines.insert(3, "")  # a blank line before: numbers are lines, not rows
    path = write_lines(tmp_path / f"bad.{fmt}", lines)
    with pytest.raises(DataError) as ref:
        read_train_examples(str(path))
    with pytest.raises(DataError) as got:
        prep(path, "sup", minilm, tmp_path, shard_rows=10)
    assert str(got.value) == str(ref.value) and str(got.value).startswith(f"{path}:35: ")
    assert not [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]  # no half entry kept


def test_sup_on_one_column_and_empty_input(tmp_path, minilm):
    path = write_lines(tmp_path / "s.txt", SENTENCES)
    with pytest.raises(DataError) as e:
        prep(path, "sup", minilm, tmp_path)
    assert (
        str(e.value) == f"{path}: train.objective=sup needs sent0,sent1[,hard_neg] columns, but the file has one column"
    )
    empty = write_lines(tmp_path / "e.txt", ["", "  "])
    with pytest.raises(DataError) as e:
        prep(empty, "unsup", minilm, tmp_path)
    assert str(e.value) == f"{empty}: no examples"


def test_builders_of_one_entry_take_turns(tmp_path, minilm, monkeypatch):
    """Three preparations of the same file at once: one builds, the others wait for its lock and
    open what it built."""
    import threading

    path = write_lines(tmp_path / "s.txt", SENTENCES)
    builds, start, results, errors = [], threading.Barrier(3, timeout=60), {}, []
    real = prepare._work
    monkeypatch.setattr(prepare, "_work", lambda *a, **k: builds.append(1) or time.sleep(0.5) or real(*a, **k))

    def rank(r: int) -> None:
        try:
            start.wait()
            results[r] = prep(path, "unsup", minilm, tmp_path)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and builds == [1]
    assert sorted(results[r].built for r in range(3)) == [False, False, True]
    assert len({res.directory for res in results.values()}) == 1


KILLED_BUILD = """
import sys
from transformers import AutoTokenizer
from simcse_dist.config import resolve_model_path
from simcse_dist.data.prepare import open_or_prepare
tok = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"))
print("go", flush=True)
open_or_prepare(sys.argv[1], None, "unsup", tok, 32, cache_dir=sys.argv[2], workers=2, shard_rows=1000)
"""


def test_sigkill_mid_build_then_rerun_equals_a_clean_build(tmp_path, minilm, shared_data, caplog):
    psutil = pytest.importorskip("psutil")
    wiki = (shared_data / "wiki1m-sample.txt").read_text("utf-8").splitlines()
    path = write_lines(tmp_path / "w.txt", [f"{i} {wiki[i % len(wiki)]}" for i in range(40_000)])
    cache = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(path), str(cache)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "go\n"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*.partial/shards/shard-000000-0000?"))) < 3:
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children()  # the 2 pool workers and multiprocessing's resource tracker
    workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2 and psutil.wait_procs(children, timeout=10)[1] == []  # they died with it
    partial = next(cache.glob("*.partial"))
    complete = {p.name for p in (partial / "shards").glob("shard-000000-?????")}
    assert 3 <= len(complete) < 40 and not list(cache.glob("*/manifest.json"))
    junk = partial / "shards" / "shard-000000-00039.tmp-99999"  # a half-written shard of another build
    junk.mkdir()
    (junk / "ids_0.npy").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="simcse_dist"):
        rerun = prep(path, "unsup", minilm, tmp_path, max_len=32, cache="killed", shard_rows=1000)
    assert f"0 unit(s) and {len(complete)} more shard(s) reused" in caplog.messages[0]
    clean = prep(path, "unsup", minilm, tmp_path, max_len=32, cache="clean", shard_rows=1000)
    assert tree_bytes(rerun.directory) == tree_bytes(clean.directory)
    assert not list(cache.glob("*.partial")) and rerun.num_rows == 40_000


def test_simcse_prepare_cli(tmp_path, tiny_bert, capsys):
    data = write_tsv(tmp_path / "nli.tsv", nli_rows(12))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model:\n  name_or_path: {tiny_bert}\ndata:\n  train_file: nli.tsv\n  cache_dir: cache\n"
        "train:\n  objective: sup\n"
    )
    assert prepare_cli.main(["--config", str(cfg), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "preparing nli.tsv" in out and "12 rows, 1 shard(s)" in out and "prepared in" in out
    assert prepare_cli.main(["--config", str(cfg), "data.max_seq_len=8"]) == 0
    assert prepare_cli.main(["--config", str(cfg), "data.max_seq_len=8"]) == 0
    assert capsys.readouterr().out.count("already prepared") == 1
    assert len(list((tmp_path / "cache").glob("nli.tsv.*[!k]"))) == 2
    data.write_text("sent0\tsent1\na\n")
    assert prepare_cli.main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err == f"error: {data}:2: expected 2 fields (sent0, sent1), got 1\n"
    assert prepare_cli.main(["--config", str(cfg), "train.objective=nope"]) == 2


def test_cache_root_order(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = write_lines(data_dir / "s.txt", SENTENCES)
    monkeypatch.delenv("SIMCSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root(path) == data_dir.resolve() / ".simcse_cache"
    data_dir.chmod(0o555)
    try:
        assert default_cache_root(path) == tmp_path / "home" / ".cache" / "simcse-dist"
        monkeypatch.setenv("SIMCSE_CACHE_DIR", str(tmp_path / "env-cache"))
        assert default_cache_root(path) == tmp_path / "env-cache"
        assert default_cache_root(path, tmp_path / "explicit") == tmp_path / "explicit"
    finally:
        data_dir.chmod(0o755)


BIG_BUILD = """
import sys, threading, time
import numpy as np
import psutil
from transformers import AutoTokenizer
from simcse_dist.config import resolve_model_path
from simcse_dist.data.prepare import open_or_prepare
tok = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"))
tok("warm up", truncation=True, max_length=32)
me, peak, done = psutil.Process(), {"self": 0, "workers": 0}, threading.Event()
base = me.memory_info().rss

def sample():  # ru_maxrss of a child counts the parent's pages it was forked with: sample instead
    while not done.is_set():
        rss = [c.memory_info().rss for c in me.children(recursive=True) if c.is_running()]
        peak["self"], peak["workers"] = max(peak["self"], me.memory_info().rss), max(peak["workers"], sum(rss))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
corpus = open_or_prepare(sys.argv[1], None, "unsup", tok, 32, cache_dir=sys.argv[2], workers=2)
done.set()
print(corpus.num_rows, len(corpus.manifest["shards"]), peak["self"] - base, peak["workers"],
      corpus.hashes(np.array([corpus.num_rows - 1]))[0, 0], corpus.build_seconds)
"""


@pytest.mark.slow
def test_two_million_lines_in_bounded_memory(tmp_path, shared_data):
    pytest.importorskip("psutil")
    wiki = (shared_data / "wiki1m-sample.txt").read_text("utf-8").splitlines()
    short = [" ".join(line.split()[:6]) for line in wiki]  # short lines: the row count is what is tested
    path = tmp_path / "big.txt"
    n = 2_000_000
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            f.write("".join(f"{i} {short[i % len(short)]}\n" for i in range(start, start + 100_000)))
    out = subprocess.run(
        [sys.executable, "-c", BIG_BUILD, str(path), str(tmp_path / "cache")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows, shards, grew, workers, last_hash, seconds = out.stdout.split()
    assert (int(rows), int(shards)) == (n, -(-n // prepare.SHARD_ROWS))
    assert int(last_hash) == blake63(f"{n - 1} {short[(n - 1) % len(short)]}")
    assert int(grew) + int(workers) < 1 << 30, (grew, workers)  # the whole build: < 1 GiB
    print(
        f"2M lines in {float(seconds):.1f} s: main process grew {int(grew) / 2**20:.0f} MiB, "
        f"workers {int(workers) / 2**20:.0f} MiB together at their peak"
    )


def test_open_shards_are_bounded_and_reading_stays_exact(tmp_path, minilm, monkeypatch):
    """A 10^9-row corpus has ~30k shards: at most MAX_OPEN_SHARDS stay mapped (Linux allows 65,530
    maps per process), and rows of closed shards read back the same after reopening."""
    from simcse_dist.data import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "MAX_OPEN_SHARDS", 2)
    lines = [f"{i} {s}" for i, s in enumerate(SENTENCES * 3)]
    corpus = prep(write_lines(tmp_path / "s.txt", lines), "unsup", minilm, tmp_path, shard_rows=4)
    assert len(corpus.manifest["shards"]) == 8
    for _ in range(2):
        for row in range(len(lines)):
            expected = minilm(lines[row].strip(), truncation=True, max_length=MAX_LEN)["input_ids"]
            assert corpus.ids(0, row).tolist() == expected
            assert corpus.hashes(np.array([row]))[0, 0] == blake63(lines[row].strip())
            assert len(corpus._shards) <= 2


UNGUARDED = """
from transformers import AutoTokenizer
from simcse_dist.config import resolve_model_path
from simcse_dist.data.prepare import open_or_prepare
import sys
tok = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"))
open_or_prepare(sys.argv[1], None, "unsup", tok, 32, cache_dir=sys.argv[2], workers=2, shard_rows=4)
"""


def test_a_script_without_a_main_guard_fails_instead_of_hanging(tmp_path):
    """The pool's workers are spawned, which imports the parent's __main__ again: an unguarded
    script would start a second preparation there, waiting for its parent's lock for ever."""
    script = tmp_path / "prepare_it.py"
    script.write_text(UNGUARDED)
    path = write_lines(tmp_path / "s.txt", SENTENCES)
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "cache")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "if __name__ == '__main__':" in proc.stderr, proc.stderr[-3000:]
