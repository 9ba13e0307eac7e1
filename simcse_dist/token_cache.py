"""Tokenize a training file once, keep the token ids on disk as memory-mapped arrays.

Why: the trainer tokenizes every micro-batch on the fly (`data.Collator`). That is cheap per
step (a few ms for 64 sentences), but it is repeated on every rank, every epoch and every run,
and it keeps the tokenizer on the critical path of a GPU step. The cache does the work once,
on one rank, and every rank of every later run reads slices of the same files (the OS page
cache shares them between the ranks of a node).

Layout of one cache entry (a directory, written to `<key>.tmp-*` and renamed, so readers see
either nothing or a complete entry):

    meta.json            what was tokenized and how (the key's ingredients), shapes, timing
    ids_<c>.npy          int32 [total tokens of column c]   token ids with special tokens
    offsets_<c>.npy      int64 [num_examples + 1]           example i = ids[offsets[i]:offsets[i+1]]
    types_<c>.npy        int8  [total tokens of column c]   token_type_ids, only when not all 0

The key is sha256 over: the data file's sha256, the tokenizer's name_or_path, a hash of its
full pipeline (normalizer, pre-tokenizer, vocab, merges, post-processor, padding/truncation
sides, the inputs it returns), max_seq_len and `variant` (which column selection). The file
hash covers all bytes: sha256 runs at ~1.9 GB/s here (SHA extensions; bench/RESULTS.md), i.e.
~0.06 s for the ~110 MB wiki1m, so a size+mtime shortcut would save nothing worth the risk of
missing an in-place edit or a copy that preserves mtimes.

Where: `cache_dir` if given, else `$SIMCSE_CACHE_DIR`, else `.simcse_cache/` next to the data
file when that directory is writable, else `~/.cache/simcse-dist`. A directory whose
permission bits grant nobody write access counts as read-only even for root (who bypasses
them): someone marked it so on purpose, e.g. a shared dataset directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .fsutil import publish_dir, staging_dir

FORMAT_VERSION = 1
ENV_CACHE_DIR = "SIMCSE_CACHE_DIR"
_CHUNK = 16384  # sentences per tokenizer call: bounds the Python objects alive at once

Columns = Sequence[Sequence[str]]


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 of the file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the ids: the fast tokenizer's serialized pipeline with
    its (mutable, call-dependent) padding/truncation state removed, plus the sides transformers
    applies and the inputs it returns (`model_input_names`: with or without token_type_ids). Slow tokenizers fall back to the vocabulary and special tokens."""
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


def _writable(directory: Path) -> bool:
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(directory, os.W_OK)


def default_cache_root(data_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where entries for `data_path` live; see the module docstring for the order."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    parent = Path(data_path).expanduser().resolve().parent
    if _writable(parent):
        return parent / ".simcse_cache"
    return Path.home() / ".cache" / "simcse-dist"


def _tokenize_column(tokenizer, texts: Sequence[str], max_seq_len: int, want_types: bool,
                     progress: Callable[[int], object] = lambda n: None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flat int32 ids, int64 offsets and (if wanted) int8 token types of one column.

    Fast tokenizers: a private copy of the Rust backend with truncation set exactly as
    transformers sets it for `truncation=True, max_length=max_seq_len` (longest_first, stride 0,
    the tokenizer's truncation side) and no padding, then `encode_batch_fast` (no character
    offsets), converted straight to numpy: no BatchEncoding of Python lists per sentence.
    The Rust side uses all cores unless TOKENIZERS_PARALLELISM=false. Slow tokenizers go
    through `tokenizer(...)`.
    """
    n = len(texts)
    lengths = np.empty(n, dtype=np.int64)
    id_parts: list[np.ndarray] = []
    type_parts: list[np.ndarray] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())  # never mutate the caller's tokenizer
        fast.no_padding()
        fast.enable_truncation(max_seq_len, stride=0, strategy="longest_first",
                               direction=tokenizer.truncation_side)
    for start in range(0, n, _CHUNK):
        chunk = list(texts[start : start + _CHUNK])
        if backend is not None:
            encs = fast.encode_batch_fast(chunk, add_special_tokens=True)
            ids = [e.ids for e in encs]
            types = [e.type_ids for e in encs] if want_types else None
        else:
            enc = tokenizer(chunk, truncation=True, max_length=max_seq_len, padding=False)
            ids = enc["input_ids"]
            types = enc.get("token_type_ids") if want_types else None
        lengths[start : start + len(chunk)] = [len(x) for x in ids]
        progress(len(chunk))
        id_parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
        if types is not None:
            type_parts.append(np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
    flat_types = (np.concatenate(type_parts) if type_parts else np.zeros(0, np.int8)) if want_types else None
    return flat, offsets, flat_types


class TokenCache:
    """Read-only view of one cache entry: `ids(column, index)` slices a memory map (no copy)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.num_examples: int = self.meta["num_examples"]
        self.num_columns: int = self.meta["num_columns"]
        self.has_token_type_ids: bool = self.meta["token_type_ids"]
        self.padding_side: str = self.meta["padding_side"]
        self.pad_token_type_id: int = self.meta["pad_token_type_id"]
        self.tokenized = False  # set by build_or_load when this call did the tokenizing
        self._ids = [np.load(self.directory / f"ids_{c}.npy", mmap_mode="r") for c in range(self.num_columns)]
        self._offsets = [np.load(self.directory / f"offsets_{c}.npy") for c in range(self.num_columns)]
        self._types: list[np.ndarray | None] = [
            np.load(self.directory / f"types_{c}.npy", mmap_mode="r") if (self.directory / f"types_{c}.npy").exists()
            else None for c in range(self.num_columns)
        ]

    # -- reading -------------------------------------------------------------------------------
    def _span(self, column: int, index: int) -> tuple[int, int]:
        off = self._offsets[column]
        return int(off[index]), int(off[index + 1])

    def ids(self, column: int, index: int) -> np.ndarray:
        """Token ids of example `index`, column `column`, with special tokens, truncated to
        max_seq_len exactly as `tokenizer(text, truncation=True, max_length=max_seq_len)`."""
        a, b = self._span(column, index)
        return self._ids[column][a:b]

    def token_type_ids(self, column: int, index: int) -> np.ndarray | None:
        """Token types of the example, or None when the tokenizer has none (zeros are implied
        when `has_token_type_ids` is true but no types file was stored)."""
        if not self.has_token_type_ids:
            return None
        a, b = self._span(column, index)
        types = self._types[column]
        return np.zeros(b - a, dtype=np.int8) if types is None else types[a:b]

    def lengths(self, column: int) -> np.ndarray:
        return np.diff(self._offsets[column])

    # -- building ------------------------------------------------------------------------------
    @staticmethod
    def cache_key(file_hash: str, tokenizer, max_seq_len: int, variant: str) -> str:
        parts = {"v": FORMAT_VERSION, "file": file_hash, "tok": str(tokenizer.name_or_path),
                 "tok_hash": tokenizer_fingerprint(tokenizer), "max_seq_len": max_seq_len, "variant": variant}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @classmethod
    def build_or_load(
        cls,
        path: str | os.PathLike,
        columns: Columns | Callable[[], Columns],
        tokenizer,
        max_seq_len: int,
        cache_dir: str | os.PathLike | None = None,
        is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
        variant: str = "",
        progress: bool = False,
    ) -> TokenCache:
        """Load the entry for (file, tokenizer, max_seq_len, columns); build it first if missing.

        `columns` holds the texts of each example column ([sent0s] or [sent0s, sent1s, hard_negs]),
        or is a callable returning them, which is called only when a build is needed (so a
        cache hit does not even parse the file). The column selection is not part of the key (a
        callable's is unknown until it runs): read one file with different selections (unsup =
        sent0 only, sup = all columns) under different `variant`s, e.g. the objective. A list
        of columns whose shape does not match the entry found raises ValueError.

        collective: every rank calls this; `barrier` must be a collective over the same ranks.
        The main rank builds while the others wait in `barrier`; a rank that still finds no
        entry afterwards (a cache dir that is not shared with the main rank, e.g. node-local
        disks with a global is_main) builds its own copy instead of failing. `progress` shows a
        tqdm bar of the sentences tokenized while building.
        """
        key = cls.cache_key(file_sha256(path), tokenizer, max_seq_len, variant)
        root = default_cache_root(path, cache_dir)
        entry = root / f"{Path(path).name}.{key[:20]}"
        tokenized = False
        if is_main and not (entry / "meta.json").exists():
            cls._build(entry, path, columns, tokenizer, max_seq_len, key, progress)
            tokenized = True
        barrier()
        if not (entry / "meta.json").exists():
            cls._build(entry, path, columns, tokenizer, max_seq_len, key, progress)
            tokenized = True
        cache = cls(entry)
        cache.tokenized = tokenized
        if not callable(columns) and (cache.num_columns, cache.num_examples) != (len(columns), len(columns[0])):
            raise ValueError(
                f"{entry}: cached {cache.num_columns} column(s) x {cache.num_examples} examples, asked for "
                f"{len(columns)} x {len(columns[0])}: pass a different `variant` for each column selection of a file")
        return cache

    @staticmethod
    def _build(entry: Path, path, columns, tokenizer, max_seq_len: int, key: str, progress: bool = False) -> None:
        """Tokenize every column into `<entry>.tmp-<pid>/`, then rename it to `entry` (atomic on
        POSIX; if another process won the race, its complete entry is kept and ours dropped)."""
        t0 = time.perf_counter()
        cols = columns() if callable(columns) else columns
        if not cols or any(len(c) != len(cols[0]) for c in cols):
            raise ValueError(f"{path}: token cache needs >= 1 column, all of the same length")
        probe = tokenizer(cols[0][0] if len(cols[0]) else "x", truncation=True, max_length=max_seq_len)
        want_types = "token_type_ids" in probe
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(entry, f".tmp-{os.getpid()}")
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(c) for c in cols), desc=f"tokenizing {Path(path).name}", unit=" sent",
                   disable=not progress, dynamic_ncols=True)
        try:
            total_tokens = 0
            for c, texts in enumerate(cols):
                ids, offsets, types = _tokenize_column(tokenizer, texts, max_seq_len, want_types, bar.update)
                total_tokens += int(ids.size)
                np.save(tmp / f"ids_{c}.npy", ids)
                np.save(tmp / f"offsets_{c}.npy", offsets)
                if types is not None and types.any():  # all-zero types are implied, not stored
                    np.save(tmp / f"types_{c}.npy", types)
            meta = {
                "format_version": FORMAT_VERSION, "key": key, "source": str(Path(path).resolve()),
                "tokenizer": str(tokenizer.name_or_path), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "max_seq_len": max_seq_len, "num_examples": len(cols[0]), "num_columns": len(cols),
                "token_type_ids": want_types, "padding_side": tokenizer.padding_side,
                "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                "total_tokens": total_tokens, "build_seconds": round(time.perf_counter() - t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks complete
            publish_dir(tmp, entry, replace=False)  # a complete entry another process wrote wins
        finally:
            bar.close()
            shutil.rmtree(tmp, ignore_errors=True)


class CachedCollator:
    """Indices -> the same {input_ids, attention_mask[, token_type_ids]} [b, k, L] tensors as
    `data.Collator` returns for those examples, from cached ids instead of the tokenizer.

    Dynamic padding to the longest sequence of the micro-batch, on the tokenizer's padding side;
    unsup repeats column 0 twice (the two dropout views), sup stacks all columns (k = 2 or 3).
    """

    def __init__(self, cache: TokenCache, pad_token_id: int, objective: str) -> None:
        if objective not in ("unsup", "sup"):
            raise ValueError(f"objective must be unsup or sup, got {objective!r}")
        if objective == "sup" and cache.num_columns < 2:
            raise ValueError("sup needs a cache with >= 2 columns (sent0, sent1[, hard_neg])")
        self.cache, self.pad_token_id, self.objective = cache, pad_token_id, objective
        self.k = 2 if objective == "unsup" else cache.num_columns
        self.columns = [0] if objective == "unsup" else list(range(cache.num_columns))

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        cache, b = self.cache, len(indices)
        # Rows in the Collator's order: example-major, then column (the tokenizer's text order).
        spans = [(c, i) for i in indices for c in self.columns]
        rows = [cache.ids(c, i) for c, i in spans]
        lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max()) if len(rows) else 0
        pos = np.arange(width)
        if cache.padding_side == "left":
            mask = pos[None, :] >= (width - lengths)[:, None]
        else:
            mask = pos[None, :] < lengths[:, None]
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.concatenate(rows) if rows else []  # row-major fill = per-row order
        out = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if cache.has_token_type_ids:
            types = np.full((len(rows), width), cache.pad_token_type_id, dtype=np.int64)
            types[mask] = np.concatenate([cache.token_type_ids(c, i) for c, i in spans])
            out["token_type_ids"] = types
        batch = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):  # Collator's key order
            if key not in out:
                continue
            t = torch.from_numpy(out[key])
            if self.objective == "unsup":
                batch[key] = t.unsqueeze(1).expand(b, 2, width).contiguous()  # [b, 2, L]
            else:
                batch[key] = t.view(b, self.k, width)  # [b, k, L]
        return batch
