"""Prepared corpus, build side: a training file -> sharded, memory-mapped token ids, built once.

`open_or_prepare` finds the entry for (file, reading, tokenizer, max_seq_len) or builds it by
streaming the file: one reader (`readers.TrainRows`) cuts the examples into chunks of SHARD_ROWS;
each chunk is tokenized, hashed and written as one shard, here (workers=1) or by a pool of
`workers` processes taking one chunk at a time (at most workers + 1 chunks in memory).
`corpus.py` reads it.
Entry `<root>/<file name>.<key[:20]>/`, key = sha256 of the resolved path, size, mtime, format,
columns kept, tokenizer fingerprint and max_seq_len: a hit never reads the file.

    manifest.json                       written last: what was read and how, shards, totals
    shards/shard-00000/ids_<c>.npy      uint16 (vocab <= 65536) or int32 flat token ids, column c
                       offsets_<c>.npy  int64 [rows + 1]: row i = ids[offsets[i]:offsets[i + 1]]
                       types_<c>.npy    int8 token type ids, only when some are nonzero
                       hashes.npy       int64 [rows, columns]: 63-bit blake2b of each text
                       shard.json       rows and tokens

A build writes `<entry>.partial/`, each shard as `shard-XXXXX.tmp-<pid>` renamed when complete (a
rerun after a kill reuses them). Root: `cache_dir`, else $SIMCSE_CACHE_DIR, else `.simcse_cache/`
beside the file if writable (by permission bits, even for root), else ~/.cache/simcse-dist.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simcse_dist import logs
from simcse_dist.data.readers import DataError, TrainRows, detect_format
from simcse_dist.fsutil import publish_dir, write_text_atomic

if TYPE_CHECKING:
    from simcse_dist.data.corpus import PreparedCorpus

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENV_CACHE_DIR = "SIMCSE_CACHE_DIR"
SHARD_ROWS = 1 << 15  # rows per shard: one unit of work (a few MB of text); balances the workers
_BATCH = 8192  # sentences per tokenizer call: bounds the Rust encodings alive at once
_SHARD = "shard-{:05d}"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the ids: the fast tokenizer's serialized pipeline with
    its (mutable, call-dependent) padding/truncation state removed, plus the sides transformers
    applies and the inputs it returns (`model_input_names`: with or without token_type_ids).
    Slow tokenizers fall back to the vocabulary and special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update(f"{tokenizer.truncation_side}|{tokenizer.padding_side}|{list(tokenizer.model_input_names)}".encode())
    return h.hexdigest()


def default_cache_root(data_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where entries for `data_path` live; see the module docstring for the order."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    parent = Path(data_path).expanduser().resolve().parent
    with contextlib.suppress(OSError):
        if parent.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(parent, os.W_OK):
            return parent / ".simcse_cache"
    return Path.home() / ".cache" / "simcse-dist"


def corpus_key(
    path: str, fmt: str | None, objective: str, tokenizer, max_seq_len: int, prompts: tuple[str, str] = ("", "")
) -> tuple[str, dict]:
    """(sha256 key, its ingredients): from the file's metadata, never its content."""
    if objective not in ("unsup", "sup"):
        raise ValueError(f"objective must be unsup or sup, got {objective!r}")
    resolved = Path(path).expanduser().resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    parts = {
        "format_version": FORMAT_VERSION,
        "path": str(resolved),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "format": fmt or detect_format(path),
        "columns": "first" if objective == "unsup" else "all",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
    }
    if any(prompts):  # absent otherwise: corpora prepared without prompts keep their keys
        parts["prompts"] = list(prompts)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def _spec(tokenizer, max_seq_len: int, prompts: list[str] | None = None) -> dict:
    """What a worker needs to tokenize exactly as `tokenizer(prompt + text, truncation=True,
    max_length=L)`; prompts: (query, document), for column 0 and the other columns."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    probe = tokenizer("x", truncation=True, max_length=max_seq_len)
    return {
        "backend": backend.to_str() if backend is not None else None,
        "max_seq_len": max_seq_len,
        "truncation_side": tokenizer.truncation_side,
        "want_types": "token_type_ids" in probe,
        "id_dtype": "uint16" if len(tokenizer) <= 65536 else "int32",
        "prompts": list(prompts or ("", "")),
    }


class _Encoder:
    """Texts -> flat ids, lengths, flat token types (or None). Fast tokenizers: a private copy of
    the Rust backend with truncation set as transformers sets it for `truncation=True,
    max_length=L` (longest_first, stride 0, the tokenizer's side), no padding, `encode_batch_fast`
    (no character offsets). Slow tokenizers go through `tokenizer(...)` (in-process only)."""

    def __init__(self, spec: dict, tokenizer=None) -> None:
        self.spec, self.tokenizer, self.fast = spec, tokenizer, None
        if spec["backend"] is not None:
            from tokenizers import Tokenizer

            self.fast = Tokenizer.from_str(spec["backend"])  # never mutate the caller's tokenizer
            self.fast.no_padding()
            self.fast.enable_truncation(
                spec["max_seq_len"], stride=0, strategy="longest_first", direction=spec["truncation_side"]
            )

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        want_types, dtype = self.spec["want_types"], np.dtype(self.spec["id_dtype"])
        lengths = np.empty(len(texts), dtype=np.int64)
        id_parts, type_parts = [], []
        for start in range(0, len(texts), _BATCH):
            chunk = texts[start : start + _BATCH]
            if self.fast is not None:
                encs = self.fast.encode_batch_fast(chunk, add_special_tokens=True)
                ids = [e.ids for e in encs]
                types = [e.type_ids for e in encs] if want_types else None
            else:
                enc = self.tokenizer(chunk, truncation=True, max_length=self.spec["max_seq_len"], padding=False)
                ids, types = enc["input_ids"], enc.get("token_type_ids") if want_types else None
            lengths[start : start + len(chunk)] = [len(x) for x in ids]
            total = int(lengths[start : start + len(chunk)].sum())
            id_parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total))
            if types is not None:
                type_parts.append(np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8, count=total))
        flat = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype)
        return flat, lengths, (np.concatenate(type_parts) if type_parts else None)


def _write_shard(shards: Path, index: int, columns: list[list[str]], encode: _Encoder) -> dict:
    """Tokenize and hash one chunk into `shard-XXXXX.tmp-<pid>/`, then rename it complete."""
    final = shards / _SHARD.format(index)
    tmp = shards / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tokens, hashes, blake = [], np.empty((len(columns[0]), len(columns)), dtype=np.int64), hashlib.blake2b
    prompts = encode.spec["prompts"]
    for c, texts in enumerate(columns):
        # tokenized with the prompt, as sentence-transformers tokenizes prompt + text; hashed without
        prompt = prompts[min(c, 1)]
        ids, lengths, types = encode([prompt + t for t in texts] if prompt else texts)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / f"ids_{c}.npy", ids)
        np.save(tmp / f"offsets_{c}.npy", offsets)
        if types is not None and types.any():  # all-zero types are implied, not stored
            np.save(tmp / f"types_{c}.npy", types)
        tokens.append(int(ids.size))
        hashes[:, c] = [int.from_bytes(blake(t.encode(), digest_size=8).digest(), "little") >> 1 for t in texts]
    np.save(tmp / "hashes.npy", hashes)
    summary = {"rows": len(columns[0]), "tokens": sum(tokens), "column_tokens": tokens}
    (tmp / "shard.json").write_text(json.dumps(summary) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another builder completed the same shard first: same content, keep it
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "shard.json").is_file():
            raise
    return summary


_ENCODER: _Encoder | None = None  # a pool worker's own tokenizer (set by _start_worker)


def _start_worker(spec_file: str) -> None:
    """A pool worker's initializer: its tokenizer, one core, and no life of its own: it dies with
    its parent (PR_SET_PDEATHSIG on Linux), and Ctrl-C is the parent's to handle."""
    import ctypes
    import signal

    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _ENCODER = _Encoder(json.loads(Path(spec_file).read_text()))


def _shard_in_worker(shards: str, index: int, columns: list[list[str]]) -> dict:
    return _write_shard(Path(shards), index, columns, _ENCODER)


@contextlib.contextmanager
def _pool(workers: int, spec: dict, spec_file: Path):
    """`workers` tokenizing processes (a spawn context: the parent's CUDA state and threads are
    not forked), or None for in-process tokenization. The tokenizer's spec (its serialized
    pipeline, ~1 MB) goes through a file: what a starting worker is sent stays smaller than a
    pipe's buffer, so a worker that dies while it starts cannot block its parent's write."""
    if workers <= 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    write_text_atomic(spec_file, json.dumps(spec))
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(str(spec_file),)
    )
    try:
        yield pool
    finally:  # on an error, the shards in flight finish (seconds) and nothing new starts
        pool.shutdown(wait=True, cancel_futures=True)


def _build(
    entry: Path,
    path: str,
    parts: dict,
    key: str,
    objective: str,
    tokenizer,
    workers: int,
    progress: bool,
    shard_rows: int,
    tick: Callable[[], object],
) -> None:
    t0, name, partial = time.perf_counter(), Path(path).name, entry.with_name(entry.name + ".partial")
    shards, state = partial / "shards", json.dumps({"key": key, "shard_rows": shard_rows}) + "\n"
    with contextlib.suppress(OSError):
        if (partial / "build.json").read_text() != state:  # another shard size: start over
            shutil.rmtree(partial)
    shards.mkdir(parents=True, exist_ok=True)
    write_text_atomic(partial / "build.json", state)
    for leftover in shards.glob("*.tmp-*"):  # a killed build's half-written shards
        shutil.rmtree(leftover, ignore_errors=True)
    done = {
        p.name: json.loads((p / "shard.json").read_text())
        for p in shards.glob("shard-?????")
        if (p / "shard.json").is_file()
    }
    spec = _spec(tokenizer, parts["max_seq_len"], parts.get("prompts"))
    workers = workers if spec["backend"] is not None else 1  # a slow tokenizer cannot travel
    cols = "first column" if parts["columns"] == "first" else "all columns"
    log.info(
        f"preparing {name}: {parts['format']}, {objective} ({cols}), max_seq_len {parts['max_seq_len']}, "
        f"{workers} worker(s){f', {len(done)} shard(s) reused' if done else ''} -> {entry}"
    )
    bar = logs.progress(progress, desc=f"preparing {name}", unit=" rows")
    results: dict[int, dict] = {}

    def finished(index: int, summary: dict) -> None:
        results[index] = summary
        if bar is not None:
            bar.update(summary["rows"])

    hasher = hashlib.sha256()
    reader = TrainRows(path, parts["format"], hasher)
    try:
        with _pool(workers, spec, partial / "tokenizer-spec.json") as pool:
            encode = None if pool else _Encoder(spec, tokenizer)
            pending: dict = {}  # future -> shard index; at most `workers` chunks in flight

            def collect(until: int) -> None:
                while len(pending) > until:
                    tick()
                    ready, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in ready:
                        index = pending.pop(future)
                        try:
                            finished(index, future.result())
                        except BrokenProcessPool:
                            raise RuntimeError(
                                f"a simcse-prepare worker died on shard {index} (a script that "
                                "prepares needs `if __name__ == '__main__':` around it)"
                            ) from None

            for index, columns, n in reader.chunks(shard_rows, objective, lambda i: _SHARD.format(i) in done):
                tick()
                if columns is None:
                    if done[_SHARD.format(index)]["rows"] != n:
                        raise DataError(f"{path}: changed while being prepared; run again")
                    finished(index, done[_SHARD.format(index)])
                elif pool is not None:
                    collect(workers - 1)
                    pending[pool.submit(_shard_in_worker, str(shards), index, columns)] = index
                else:
                    finished(index, _write_shard(shards, index, columns, encode))
                del columns
            collect(0)
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) != (parts["size"], parts["mtime_ns"]):
            raise DataError(f"{path}: changed while being prepared; run again")
    except DataError:  # the same file would fail the same way: keep nothing
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    names = [_SHARD.format(i) for i in range(len(results))]
    for extra in {p.name for p in shards.iterdir()} - set(names):
        shutil.rmtree(shards / extra, ignore_errors=True)
    rows, seconds = sum(s["rows"] for s in results.values()), time.perf_counter() - t0
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "input": {**{k: parts[k] for k in ("path", "size", "mtime_ns")}, "sha256": hasher.hexdigest()},
        "format": parts["format"],
        "objective": objective,
        "columns": parts["columns"],
        "layout": reader.layout,
        "tokenizer": str(tokenizer.name_or_path),
        "tokenizer_fingerprint": parts["tokenizer_fingerprint"],
        "max_seq_len": parts["max_seq_len"],
        "num_columns": len(results[0]["column_tokens"]),
        "token_type_ids": spec["want_types"],
        "padding_side": tokenizer.padding_side,
        "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "id_dtype": spec["id_dtype"],
        "shard_rows": shard_rows,
        "shards": [
            {"name": n, "rows": results[i]["rows"], "tokens": results[i]["tokens"]} for i, n in enumerate(names)
        ],
        "rows": rows,
        "blank_lines": reader.blank_lines,
        "total_tokens": sum(s["tokens"] for s in results.values()),
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (partial / "build.json").unlink()
    (partial / "tokenizer-spec.json").unlink(missing_ok=True)
    write_text_atomic(partial / "manifest.json", json.dumps(manifest, indent=1) + "\n")  # last: complete
    publish_dir(partial, entry, replace=False)
    log.info(
        f"preparing {name}: {rows:,} rows, {len(names)} shard(s), {manifest['total_tokens']:,} tokens in "
        f"{seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)"
    )


@contextlib.contextmanager
def _locked(entry: Path):
    """One builder per entry on this file system (flock; a no-op where unsupported)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a+b") as f:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def open_or_prepare(
    path: str,
    fmt: str | None,
    objective: str,
    tokenizer,
    max_seq_len: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = False,
    shard_rows: int = SHARD_ROWS,
    tick: Callable[[], object] = lambda: None,
    prompts: tuple[str, str] = ("", ""),
) -> PreparedCorpus:
    """The prepared corpus of a local file `path` for `objective` (unsup: the first column of any
    layout; sup: all columns, DataError on a one-column file), built first if missing.

    `workers` > 1 tokenizes in that many processes; `progress` shows a bar of rows (logs.progress);
    a build logs a line at its start and its end; `prompts` (query, document) are prepended to
    column 0 and to the other columns before tokenizing; `tick` is called at least once per shard
    (distributed.main_first's keep-alive). Processes that build the same entry at once take
    turns (a file lock): the second finds it built. The result's `built` tells whether this
    call built it.
    """
    from simcse_dist.data.corpus import PreparedCorpus

    key, parts = corpus_key(path, fmt, objective, tokenizer, max_seq_len, prompts)
    entry = default_cache_root(path, cache_dir) / f"{Path(path).name}.{key[:20]}"
    manifest, built = entry / "manifest.json", False
    if not manifest.is_file():
        if workers > 1 and sys.modules.get("__mp_main__") is not sys.modules.get("__main__"):
            # a spawned process re-running a script's top level (spawn runs the parent's __main__
            # again as __mp_main__; elsewhere multiprocessing makes the two one module): it would
            # wait for the lock its parent holds, and the parent for it. tests/data/test_prepare.py
            # pins this
            raise RuntimeError(
                f"{path}: preparation started inside a worker process: the script that prepares "
                "(or trains) must do so under `if __name__ == '__main__':`"
            )
        with _locked(entry):
            if not manifest.is_file():  # else another process finished it while we waited
                _build(entry, path, parts, key, objective, tokenizer, max(1, workers), progress, shard_rows, tick)
                built = True
    corpus = PreparedCorpus(entry)
    corpus.built = built
    return corpus
