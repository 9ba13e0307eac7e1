"""data/inputs.py: what an input names (directories, globs, lists, fsspec URLs), the work units
(any unit size gives the rows of the whole-file reader, in order, with its line numbers), the
fingerprint from what was read (a written-out sha256), and preparation from fsspec's memory
filesystem, a file:// URL and `hf://` (offline, through the Hub's cache as the paper configs
read it) giving the shards of the same local files. References: readers.read_train_examples
(one stream per file), hashlib, the tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from simcse_dist.config import resolve_model_path
from simcse_dist.data.inputs import UnitReader, plan_units, resolve_inputs
from simcse_dist.data.prepare import open_or_prepare
from simcse_dist.data.readers import DataError, read_train_examples

LINES = [f"{i} {'word ' * (i % 23)}end" for i in range(900)]  # lines of 6 to 120 bytes


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"), use_fast=True)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    """The shards of an entry (the manifest names the files it read: it differs by where)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted((directory / "shards").rglob("*")) if p.is_file()
    }


def write_folder(root: Path) -> Path:
    root.mkdir()
    (root / "b.txt").write_text("\n".join(LINES[:300]) + "\n")
    (root / "a.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": s}) + "\n" for s in LINES[300:500]).encode())
    )
    (root / "sub").mkdir()
    (root / "sub" / "c.tsv").write_text("sent0\n" + "\n".join(LINES[500:]) + "\n")
    (root / "_SUCCESS").write_text("")
    (root / ".hidden.txt").write_text("never read\n")
    (root / "notes.md").write_text("not a training file\n")
    return root


def test_directories_globs_and_lists(tmp_path):
    root = write_folder(tmp_path / "d")
    names = [Path(f.url).relative_to(root).as_posix() for f in resolve_inputs(str(root))]
    assert names == ["a.jsonl.gz", "b.txt", "sub/c.tsv"]  # sorted, hidden and unknown skipped
    assert [Path(f.url).name for f in resolve_inputs(str(root / "**" / "*.t?v"))] == ["c.tsv"]
    listed = resolve_inputs([str(root / "sub" / "c.tsv"), str(root / "b.txt")])  # a list keeps its order
    assert [Path(f.url).name for f in listed] == ["c.tsv", "b.txt"]
    assert [f.format for f in listed] == ["tsv", "txt"] and listed[1].size == (root / "b.txt").stat().st_size
    for spec, said in (
        (str(tmp_path / "none.txt"), "file not found"),
        (str(root / "*.parquet"), "no file matches"),
        (str(tmp_path), "no training files in this directory"),
    ):
        if spec == str(tmp_path):
            (tmp_path / "empty").mkdir()
            spec = str(tmp_path / "empty")
        with pytest.raises(DataError) as e:
            resolve_inputs(spec)
        assert str(e.value).startswith(f"{spec}: {said}"), str(e.value)


@pytest.mark.parametrize("fmt", ["txt", "tsv", "jsonl"])
def test_units_of_any_size_read_what_one_stream_reads(tmp_path, fmt):
    """Byte ranges cut inside lines, at line ends and inside a header: the rows, their order
    and a bad row's line number are those of the whole-file reader."""
    body = {
        "txt": ["", *LINES],
        "tsv": ["sent0\tsent1", *(f"{s}\t{s[::-1]}" for s in LINES)],
        "jsonl": [json.dumps({"sent0": s}) for s in LINES],
    }[fmt]
    path = tmp_path / f"f.{fmt}"
    path.write_text("\n".join(body) + "\n")
    (f,) = resolve_inputs(str(path))
    whole = [ex for ex in read_train_examples(str(path))[0]]
    for unit_bytes in (61, 4096, 1 << 20):
        units = plan_units([f], unit_bytes)
        assert units[0].cuts[0] == 0 and units[-1].cuts[-1] == f.size
        assert all(a.cuts[-1] == b.cuts[0] for a, b in zip(units, units[1:], strict=False))
        rows = [fields for u in units for _, fields in UnitReader(f, u)]
        assert rows == whole, unit_bytes
    bad = body[:]
    bad[700] = {"txt": "\ufffd", "tsv": "a\tb\tc\td", "jsonl": '{"sent0": 1}'}[fmt]
    path.write_text("\n".join(bad) + "\n")
    if fmt == "txt":
        path.write_bytes(path.read_bytes().replace("\ufffd".encode(), b"\xff"))
    with pytest.raises(DataError) as ref:
        read_train_examples(str(path))
    (f,) = resolve_inputs(str(path))
    with pytest.raises(DataError) as got:
        for u in plan_units([f], 1024):
            list(UnitReader(f, u))
    assert str(got.value) == str(ref.value) and str(ref.value).startswith(f"{path}:701: ")


def test_fingerprint_is_the_sha256_of_what_was_read(tmp_path, minilm):
    """A file under one 4 MiB block: its own sha256; over it, the sha256 of its 4 MiB blocks' hex
    digests joined by newlines; several files: that of the files' digests. The same for units of
    one block and of the default 32 MiB (units below a block, in tests only, hash smaller pieces)."""
    small = tmp_path / "small.txt"
    small.write_text("\n".join(LINES) + "\n")
    big = tmp_path / "big.txt"
    big.write_text("\n".join(LINES * 100) + "\n")  # 5.5 MB: 2 blocks
    data = big.read_bytes()
    blocks = [hashlib.sha256(data[i : i + (1 << 22)]).hexdigest() for i in range(0, len(data), 1 << 22)]
    big_sha = hashlib.sha256("\n".join(blocks).encode()).hexdigest()
    small_sha = hashlib.sha256(small.read_bytes()).hexdigest()
    assert len(blocks) == 2
    for unit in (1 << 22, 1 << 25):
        both = open_or_prepare(
            [str(small), str(big)], None, "unsup", minilm, 16, cache_dir=tmp_path / f"{unit}", unit_bytes=unit
        )
        assert both.manifest["units"] == (3 if unit == 1 << 22 else 2)
        assert both.fingerprint["files"] == [
            {"path": str(small), "size": small.stat().st_size, "sha256": small_sha},
            {"path": str(big), "size": len(data), "sha256": big_sha},
        ]
        assert both.fingerprint["sha256"] == hashlib.sha256(f"{small_sha}\n{big_sha}".encode()).hexdigest()
        assert both.num_rows == len(LINES) * 101
    one = open_or_prepare(str(small), None, "unsup", minilm, 16, cache_dir=tmp_path / "one")
    assert one.fingerprint == {"path": str(small.resolve()), "size": small.stat().st_size, "sha256": small_sha}


def test_memory_file_url_and_hf_give_the_shards_of_the_local_files(tmp_path, minilm, monkeypatch):
    import fsspec
    from huggingface_hub import constants

    root = write_folder(tmp_path / "d")
    local = open_or_prepare(str(root), None, "unsup", minilm, 16, cache_dir=tmp_path / "local", unit_bytes=1 << 12)
    texts = [ex[0] for name in ("a.jsonl.gz", "b.txt", "sub/c.tsv") for ex in read_train_examples(str(root / name))[0]]
    ref = minilm(texts, truncation=True, max_length=16)["input_ids"]
    assert local.num_rows == 900 and all(local.ids(0, i).tolist() == ref[i] for i in range(900))

    memory = fsspec.filesystem("memory")
    for p in root.rglob("*"):
        if p.is_file():
            memory.pipe(f"/corpus/{p.relative_to(root).as_posix()}", p.read_bytes())
    try:
        mem = open_or_prepare(
            "memory://corpus", None, "unsup", minilm, 16, cache_dir=tmp_path / "m", unit_bytes=1 << 12
        )
    finally:
        memory.rm("/corpus", recursive=True)
    assert mem.directory.name.startswith("corpus.") and shard_bytes(mem.directory) == shard_bytes(local.directory)
    assert [f["path"] for f in mem.manifest["input"]["files"]][0] == "memory:///corpus/a.jsonl.gz"
    url = open_or_prepare(f"file://{root}", None, "unsup", minilm, 16, cache_dir=tmp_path / "u", unit_bytes=1 << 12)
    assert shard_bytes(url.directory) == shard_bytes(local.directory)

    # hf:// offline: the file comes from the Hub's cache (its documented layout), messages name the URL
    hub = tmp_path / "hub"
    snap = hub / "datasets--someone--wiki" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "b.txt").write_bytes((root / "b.txt").read_bytes())
    (hub / "datasets--someone--wiki" / "refs").mkdir()
    (hub / "datasets--someone--wiki" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # try_to_load_from_cache reads it per call
    hf = open_or_prepare("hf://someone/wiki/b.txt", None, "unsup", minilm, 16, cache_dir=tmp_path / "h")
    one = open_or_prepare(str(root / "b.txt"), None, "unsup", minilm, 16, cache_dir=tmp_path / "l1")
    assert shard_bytes(hf.directory) == shard_bytes(one.directory) and hf.num_rows == 300
    assert hf.manifest["input"]["files"][0]["path"] == "hf://someone/wiki/b.txt"
    with pytest.raises(DataError) as e:
        open_or_prepare("hf://someone/wiki/missing.txt", None, "unsup", minilm, 16, cache_dir=tmp_path / "h")
    assert str(e.value).startswith("hf://someone/wiki/missing.txt: HF_HUB_OFFLINE is set and the file is not in")
