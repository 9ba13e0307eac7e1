"""Prepared corpus, read side: token ids of a training file as memory maps.

`PreparedCorpus(directory)` opens an entry written by `prepare.open_or_prepare` (its layout is
described there): the manifest, then each shard's arrays as read-only memory maps on first
use, so opening is O(shards) and no per-row array or Python object is ever held in RAM (the
OS page cache shares the files between the ranks of a node). `collate.CorpusCollator` turns
rows into tensors.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

MAX_OPEN_SHARDS = 1024


def _map(path: Path) -> np.ndarray:
    """A read-only memory map as a plain ndarray view (slicing it costs no Python subclass hook)."""
    try:
        return np.asarray(np.load(path, mmap_mode="r"))
    except ValueError:  # a zero-length array cannot be mapped
        return np.load(path)


class _Shard:
    def __init__(self, directory: Path, num_columns: int) -> None:
        self.ids = [_map(directory / f"ids_{c}.npy") for c in range(num_columns)]
        self.offsets = [_map(directory / f"offsets_{c}.npy") for c in range(num_columns)]
        self.types = [
            _map(directory / f"types_{c}.npy") if (directory / f"types_{c}.npy").exists() else None
            for c in range(num_columns)
        ]
        self.hashes = _map(directory / "hashes.npy")


class PreparedCorpus:
    """Read-only view of one prepared entry; rows are global (0 .. num_rows - 1, file order)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest: dict = json.loads((self.directory / "manifest.json").read_text())
        m = self.manifest
        self.num_rows: int = m["rows"]
        self.num_columns: int = m["num_columns"]
        self.has_token_type_ids: bool = m["token_type_ids"]
        self.padding_side: str = m["padding_side"]
        self.pad_token_type_id: int = m["pad_token_type_id"]
        self.blank_lines: int = m["blank_lines"]
        self.built = False  # set by prepare.open_or_prepare when that call built the entry
        self._names = [s["name"] for s in m["shards"]]
        self._starts = np.zeros(len(self._names) + 1, dtype=np.int64)
        np.cumsum([s["rows"] for s in m["shards"]], out=self._starts[1:])
        self._shards: OrderedDict[int, _Shard] = OrderedDict()  # open shards, least recently used first

    @property
    def fingerprint(self) -> dict:
        """{"path", "size", "sha256"} of the input as it was read when prepared (one file: its
        path; sha256 as data/inputs.py combines the parts), plus "files" (each one's path, size
        and sha256) when the input had several."""
        source = self.manifest["input"]
        out = {"path": source["path"], "size": source["size"], "sha256": source["sha256"]}
        if len(source.get("files", ())) > 1:
            out["files"] = [{k: f[k] for k in ("path", "size", "sha256")} for f in source["files"]]
        return out

    @property
    def build_seconds(self) -> float | None:
        """How long preparing it took (build.json: timing stays out of the manifest)."""
        try:
            return json.loads((self.directory / "build.json").read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            return None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict:  # DataLoader workers reopen the maps instead of copying them
        return {"directory": str(self.directory), "built": self.built}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])
        self.built = state["built"]

    def shard(self, index: int) -> _Shard:
        """Shard `index`'s memory maps. At most MAX_OPEN_SHARDS stay open: a 10^9-row corpus has
        ~30k shards of 3-10 files each, and Linux allows 65,530 maps per process by default."""
        sh = self._shards.get(index)
        if sh is None:
            sh = self._shards[index] = _Shard(self.directory / "shards" / self._names[index], self.num_columns)
            if len(self._shards) > MAX_OPEN_SHARDS:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(index)
        return sh

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (shard index, row within the shard)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows out of range 0..{self.num_rows - 1}")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        return shard, rows - self._starts[shard]

    def _span(self, column: int, row: int) -> tuple[_Shard, int, int]:
        shard, local = self.locate(np.array([row]))
        sh = self.shard(int(shard[0]))
        off = sh.offsets[column]
        return sh, int(off[local[0]]), int(off[local[0] + 1])

    def ids(self, column: int, row: int) -> np.ndarray:
        """Token ids of `row`, column `column`, with special tokens, truncated to max_seq_len exactly
        as `tokenizer(text, truncation=True, max_length=max_seq_len)` (a memory-map slice)."""
        sh, a, b = self._span(column, row)
        return sh.ids[column][a:b]

    def token_type_ids(self, column: int, row: int) -> np.ndarray | None:
        """Token types of the row, or None when the tokenizer returns none."""
        if not self.has_token_type_ids:
            return None
        sh, a, b = self._span(column, row)
        types = sh.types[column]
        return np.zeros(b - a, dtype=np.int8) if types is None else types[a:b]

    def hashes(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), num_columns] int64: the 63-bit blake2b id of each text of each row."""
        shard, local = self.locate(rows)
        out = np.empty((shard.size, self.num_columns), dtype=np.int64)
        if shard.size <= 1024:  # a micro-batch: row by row beats grouping by shard
            for j, (s, i) in enumerate(zip(shard.tolist(), local.tolist(), strict=True)):
                out[j] = self.shard(s).hashes[i]
            return out
        for s in np.unique(shard).tolist():
            sel = shard == s
            out[sel] = self.shard(s).hashes[local[sel]]
        return out
