"""Prepared corpus, read side: token ids of a training file as memory maps, and the collator.

`PreparedCorpus(directory)` opens an entry written by `prepare.open_or_prepare` (its layout is
described there): the manifest, then each shard's arrays as read-only memory maps on first
use, so opening is O(shards) and no per-row array or Python object is ever held in RAM (the
OS page cache shares the files between the ranks of a node). `CorpusCollator` turns example
indices into the tensors `data.Collator` would produce by tokenizing the same texts.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

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
        self.types = [_map(directory / f"types_{c}.npy") if (directory / f"types_{c}.npy").exists() else None
                      for c in range(num_columns)]
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
        """{"path", "size", "sha256"} of the input file as it was prepared."""
        source = self.manifest["input"]
        return {"path": source["path"], "size": source["size"], "sha256": source["sha256"]}

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


class CorpusCollator:
    """Indices -> the same {input_ids, attention_mask[, token_type_ids]} [b, k, L] tensors as
    `data.Collator` returns for those examples, from prepared ids instead of the tokenizer.

    Dynamic padding to the longest sequence of the micro-batch, on the tokenizer's padding side;
    unsup repeats column 0 twice (the two dropout views), sup stacks all columns (k = 2 or 3).
    Picklable (DataLoader workers): the corpus travels as its directory.
    """

    def __init__(self, corpus: PreparedCorpus, pad_token_id: int, objective: str) -> None:
        if objective not in ("unsup", "sup"):
            raise ValueError(f"objective must be unsup or sup, got {objective!r}")
        if objective == "sup" and corpus.num_columns < 2:
            raise ValueError("sup needs a corpus with >= 2 columns (sent0, sent1[, hard_neg])")
        self.corpus, self.pad_token_id, self.objective = corpus, pad_token_id, objective
        self.k = 2 if objective == "unsup" else corpus.num_columns
        self.columns = [0] if objective == "unsup" else list(range(corpus.num_columns))

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        corpus, b, columns = self.corpus, len(indices), self.columns
        shard, local = corpus.locate(np.asarray(indices, dtype=np.int64))
        # Rows in the Collator's order: example-major, then column (the tokenizer's text order).
        rows, types, want_types = [], [], corpus.has_token_type_ids
        for s, i in zip(shard.tolist(), local.tolist(), strict=True):
            sh = corpus.shard(s)
            for c in columns:
                a, e = sh.offsets[c][i:i + 2].tolist()
                rows.append(sh.ids[c][a:e])
                if want_types:
                    t = sh.types[c]
                    types.append(np.zeros(e - a, dtype=np.int8) if t is None else t[a:e])
        lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max()) if len(rows) else 0
        pos = np.arange(width)
        if corpus.padding_side == "left":
            mask = pos[None, :] >= (width - lengths)[:, None]
        else:
            mask = pos[None, :] < lengths[:, None]
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.concatenate(rows) if rows else []  # row-major fill = per-row order
        out = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if want_types:
            token_types = np.full((len(rows), width), corpus.pad_token_type_id, dtype=np.int64)
            token_types[mask] = np.concatenate(types) if types else []
            out["token_type_ids"] = token_types
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
