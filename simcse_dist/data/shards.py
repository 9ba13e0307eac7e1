"""Prepared corpus, tokenizing side: a tokenizer's fingerprint and spec, one shard's files, and
the writer that makes shards here or in a pool of processes (`prepare.py` decides which).

A shard (`<name>/`): ids_<c>.npy (uint16 when the vocabulary fits, else int32: the flat token
ids of column c), offsets_<c>.npy (int64 [rows + 1]), types_<c>.npy (int8 token types, only
when some are nonzero), hashes.npy (int64 [rows, columns]: 63-bit blake2b of each text) and
shard.json (rows and tokens). It is written as `<name>.tmp-<pid>/` and renamed when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from simcse_dist.fsutil import write_text_atomic

_BATCH = 8192  # sentences per tokenizer call: bounds the Rust encodings alive at once


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


def tokenizer_spec(tokenizer, max_seq_len: int, prompts: list[str] | None = None) -> dict:
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


class TextEncoder:
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


def write_shard(shards: Path, name: str, columns: list[list[str]], encode: TextEncoder) -> dict:
    """Tokenize and hash one chunk into `<name>.tmp-<pid>/`, then rename it `<name>` complete."""
    final = shards / name
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


_ENCODER: TextEncoder | None = None  # a pool worker's own tokenizer (set by _start_worker)


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
    _ENCODER = TextEncoder(json.loads(Path(spec_file).read_text()))


def _shard_in_worker(shards: str, name: str, columns: list[list[str]]) -> dict:
    return write_shard(Path(shards), name, columns, _ENCODER)


class ShardWriter:
    """Writes shards into `shards`: here (workers <= 1, or a slow tokenizer, which cannot travel)
    or in a pool of `workers` spawned processes (the parent's CUDA state and threads are not
    forked). The tokenizer's spec (its serialized pipeline, ~1 MB) reaches the workers through
    `spec_file`: what a starting worker is sent stays smaller than a pipe's buffer, so a worker
    that dies while it starts cannot block its parent's write. A context manager: leaving it
    lets the shards in flight finish (seconds) and starts nothing new."""

    def __init__(self, shards: Path, tokenizer, max_seq_len: int, workers: int, spec_file: Path, prompts=None) -> None:
        self.shards, self.spec = shards, tokenizer_spec(tokenizer, max_seq_len, prompts)
        self.workers = workers if self.spec["backend"] is not None else 1
        self._encode = TextEncoder(self.spec, tokenizer) if self.workers <= 1 else None
        self._pool = None
        if self.workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            write_text_atomic(spec_file, json.dumps(self.spec))
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(str(spec_file),),
            )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, name: str, columns: list[list[str]]) -> Future:
        """Shard `name` of `columns`; its summary (rows, tokens) is the future's result."""
        if self._pool is not None:
            return self._pool.submit(_shard_in_worker, str(self.shards), name, columns)
        done: Future = Future()
        done.set_result(write_shard(self.shards, name, columns, self._encode))
        return done

    @staticmethod
    def result(future: Future, name: str) -> dict:
        try:
            return future.result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"a simcse-prepare worker died on {name} (a script that prepares needs "
                "`if __name__ == '__main__':` around it)"
            ) from None
