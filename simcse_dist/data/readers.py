"""Readers of training files, and the line reader every text file of the project goes through.

Pure Python (no torch; pyarrow for parquet). Every problem with the input is raised as a
`DataError` whose message names the file and, where it applies, the 1-based line number.
`TrainRows` streams a training file with bounded memory (what `prepare.py` reads);
`read_train_examples` is the same reading, collected into a list; `read_lines` is what the
STS and retrieval readers (eval/) read their files with.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, ...]


class DataError(ValueError):
    """Bad input data. The message names the file and (when relevant) the 1-based line,
    e.g. 'data/x.tsv:17: expected 3 fields (sent0, sent1, hard_neg), got 2'."""


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What a reader saw in one file."""

    path: str
    rows: int  # examples returned
    blank_lines: int  # blank lines skipped (counted, not an error)


FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet")

_EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Accepted column / key layouts, each in output order (sent0, sent1, hard_neg): those of every
# format, then those of csv/tsv headers, then those of JSON lines and parquet columns.
_LAYOUTS = (("sent0",), ("text",), ("sent0", "sent1"), ("sent0", "sent1", "hard_neg"))
_TABLE_LAYOUTS = (*_LAYOUTS, ("sentence",), ("anchor", "entailment", "contradiction"))
_JSON_LAYOUTS = (*_LAYOUTS, ("origin",), ("origin", "entailment", "contradiction"))
_STS_B_FIELDS = "genre, file, year, id, score, sentence1, sentence2"


def detect_format(path: str) -> str:
    """Return the format in FORMATS implied by the file extension (case-insensitive; a
    trailing .gz is looked through: wiki.txt.gz is txt, read through gzip)."""
    name = Path(path)
    if name.suffix.lower() == ".gz" and name.stem:
        name = Path(name.stem)
    ext = name.suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot tell the data format from the extension {ext or '(none)'!r}; "
            f"expected one of {', '.join(FORMATS)} (set data.format to choose one)"
        )
    return _EXTENSIONS[ext]


def resolve_path(path: str) -> str:
    """Return a local path for `path`, downloading 'hf://[datasets/]<owner>/<repo>/<file>'
    from the Hugging Face Hub (dataset repo) into its cache; local paths get expanduser."""
    if not path.startswith("hf://"):
        return os.path.expanduser(path)
    ref = path.removeprefix("hf://").removeprefix("datasets/")
    parts = ref.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise DataError(f"{path}: expected hf://datasets/<owner>/<repo>/<file path>")
    # The Hub library reads HF_HUB_OFFLINE only at import time; honour it on every call.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            repo_id=f"{parts[0]}/{parts[1]}",
            filename=parts[2],
            repo_type="dataset",
            local_files_only=offline,
        )
    except Exception as e:  # offline, missing repo/file, no huggingface_hub, ...
        raise DataError(
            f"{path}: the file could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); download it and pass a local path instead"
        ) from e


class _HashingRaw(io.RawIOBase):
    """A raw binary file that feeds every byte it reads into `hasher` (sha256 while streaming)."""

    def __init__(self, f, hasher) -> None:
        self._f, self._hasher = f, hasher

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self._hasher.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        """Hash what the reader above did not read (a gzip trailer)."""
        while chunk := self._f.read(1 << 20):
            self._hasher.update(chunk)


def read_lines(path: str, hasher=None, opened=None) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line incl. newline) of a UTF-8 file (BOM tolerated; .gz read
    through gzip). With `hasher`, the file's bytes as stored (compressed for .gz) are fed to it.
    `opened`: a binary file object already open on `path` (e.g. an fsspec stream; closed here),
    else `path` is opened as a local file."""
    try:
        with opened if opened is not None else open(path, "rb") as raw:
            hashing = _HashingRaw(raw, hasher) if hasher is not None else None
            f = io.BufferedReader(hashing, 1 << 20) if hashing is not None else raw
            if str(path).endswith(".gz"):
                f = gzip.GzipFile(fileobj=f, mode="rb")
            for n, line in enumerate(f, 1):
                try:
                    yield n, line.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid UTF-8 ({e})") from None
            if hashing is not None:
                f.read()
                hashing.drain()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read: {e}") from None


def _match_layout(names: tuple[str, ...], layouts: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """The layout with exactly the given names (in any order), or None."""
    for layout in layouts:
        if len(names) == len(layout) and set(names) == set(layout):
            return layout
    return None


def _mined_layout(names: tuple[str, ...]) -> tuple[str, ...] | None:
    """simcse-mine's K > 1 output, sent0, sent1, hard_neg_1 .. hard_neg_K: read as a triplet
    with hard_neg_1, the highest-scoring negative (the loss takes one hard negative per row)."""
    k = len(names) - 2
    if k >= 1 and set(names) == {"sent0", "sent1", *(f"hard_neg_{i}" for i in range(1, k + 1))}:
        return ("sent0", "sent1", "hard_neg_1")
    return None


def _describe(layouts: tuple[tuple[str, ...], ...]) -> str:
    return " | ".join(",".join(layout) for layout in layouts)


def _csv_rows(lines: Iterator[tuple[int, str]], where: Callable[[int], str]) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) per CSV record; quoted fields may span lines."""
    reader = csv.reader(line for _, line in lines)
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{where(start)}: {e}") from None


def _tsv_rows(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) per line, split on TAB with no quoting."""
    for n, line in lines:
        yield n, line.rstrip("\r\n").split("\t")


def chunk_columns(
    rows: Iterator[tuple[int, tuple[str, ...]]],
    size: int,
    objective: str,
    name: str,
    skip: Callable[[int], bool] = lambda i: False,
) -> Iterator[tuple[int, list[list[str]] | None, int]]:
    """(index, columns, rows) per chunk of `size` examples of `rows`, columns = [texts of column
    c]: the first column for unsup, all for sup (DataError naming `name` at the first row of a
    one-column input); columns is None for a chunk where `skip(index)` (read past, not kept).
    Nothing for no rows."""
    first = next(rows, None)
    if first is None:
        return
    if objective == "sup" and len(first[1]) < 2:
        raise DataError(
            f"{name}: train.objective=sup needs sent0,sent1[,hard_neg] columns, but the file has one column"
        )
    rows = itertools.chain([first], rows)
    for index in itertools.count():
        part = itertools.islice(rows, size)
        if skip(index):
            columns, n = None, sum(1 for _ in part)
        elif objective == "unsup":
            columns = [[fields[0] for _, fields in part]]
            n = len(columns[0])
        else:
            columns = [list(c) for c in zip(*(fields for _, fields in part), strict=True)]
            n = len(columns[0]) if columns else 0
        if n:
            yield index, columns, n
        if n < size:
            return


class TrainRows:
    """A training file's examples, streamed with bounded memory: iterating yields
    (line number, fields) per example, fields stripped and in layout order: (sent0,),
    (sent0, sent1) or (sent0, sent1, hard_neg), all of one arity. For parquet the number is the
    1-based row. Malformed input raises DataError(file:line) when the reader gets there.

    While and after iterating: `layout` (the column names kept, known from the header or the
    first row on), `blank_lines` (skipped so far). `hasher` (e.g. hashlib.sha256()) is fed the
    file's bytes as stored (compressed for .gz) and has seen all of them once iteration ended.
    The format (`fmt`, one of FORMATS, else from the extension) is checked on construction.
    `parse` and `parquet_rows` read part of a file the same way (data/inputs.py's work units).
    """

    def __init__(self, path: str, fmt: str | None = None, hasher=None) -> None:
        self.path, self.hasher = path, hasher
        self.format = fmt or detect_format(path)
        if self.format not in FORMATS:
            raise DataError(f"{path}: unknown data format {self.format!r}; expected one of {', '.join(FORMATS)}")
        self.layout: tuple[str, ...] | None = None
        self.blank_lines = 0

    def __iter__(self) -> Iterator[tuple[int, tuple[str, ...]]]:
        if self.format == "parquet":
            return self._parquet()
        return self.parse(read_lines(self.path, self.hasher), lambda n: f"{self.path}:{n}")

    def parse(
        self,
        lines: Iterator[tuple[int, str]],
        where: Callable[[int], str],
        head: tuple[str, str] | None = None,
    ) -> Iterator[tuple[int, tuple[str, ...]]]:
        """The examples of `lines` ((number, text) pairs of a text format); `where(n)` names line n
        in an error. `head`: (its name, its text) of the file's first non-blank line (the header
        of csv/tsv, the line that fixes jsonl's keys) when `lines` begin after it."""
        self.blank_lines = 0
        if self.format == "txt":
            return self._txt(lines)
        if self.format == "jsonl":
            return self._jsonl(lines, where, head)
        split = (lambda ls: _csv_rows(ls, where)) if self.format == "csv" else _tsv_rows
        if head is not None:
            head = (head[0], next(split(iter([(1, head[1])])))[1])
        return self._table(split(lines), where, head)

    def chunks(
        self,
        size: int,
        objective: str,
        skip: Callable[[int], bool] = lambda i: False,
    ) -> Iterator[tuple[int, list[list[str]] | None, int]]:
        """`chunk_columns` over the whole file; DataError when it has no examples."""
        rows = iter(self)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{self.path}: no examples")
        return chunk_columns(itertools.chain([first], rows), size, objective, self.path, skip)

    def _txt(self, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, tuple[str, ...]]]:
        self.layout = ("text",)
        for n, line in lines:
            if sentence := line.strip():
                yield n, (sentence,)
            else:
                self.blank_lines += 1

    def _header(self, where: str, fields: list[str]) -> tuple[tuple[str, ...], list[int]]:
        header = tuple(f.strip().lower() for f in fields)
        layout = _match_layout(header, _TABLE_LAYOUTS) or _mined_layout(header)
        if layout is None:
            raise DataError(
                f"{where}: unrecognised header {','.join(header)!r}; "
                f"accepted layouts: {_describe(_TABLE_LAYOUTS)} | sent0,sent1,hard_neg_1..hard_neg_K"
            )
        self.layout = layout
        return header, [header.index(name) for name in layout]

    def _table(self, rows, where, head) -> Iterator[tuple[int, tuple[str, ...]]]:
        header, order = self._header(*head) if head is not None else (None, [])
        layout = self.layout
        for n, fields in rows:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                self.blank_lines += 1
                continue
            if header is None:
                header, order = self._header(where(n), fields)
                layout = self.layout
                continue
            if len(fields) != len(header):
                raise DataError(f"{where(n)}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}")
            example = tuple(fields[i].strip() for i in order)
            for name, value in zip(layout, example, strict=True):
                if not value:
                    raise DataError(f"{where(n)}: empty field {name!r}")
            yield n, example

    def _json(self, where: str, line: str) -> dict:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return obj

    def _json_layout(self, where: str, obj: dict) -> tuple[str, ...]:
        layout = self.layout = _match_layout(tuple(obj), _JSON_LAYOUTS)
        if layout is None:
            raise DataError(f"{where}: unrecognised keys {sorted(obj)}; accepted: {_describe(_JSON_LAYOUTS)}")
        return layout

    def _jsonl(self, lines, where, head) -> Iterator[tuple[int, tuple[str, ...]]]:
        layout = self._json_layout(head[0], self._json(*head)) if head is not None else None
        for n, line in lines:
            if not line.strip():
                self.blank_lines += 1
                continue
            obj = self._json(where(n), line)
            if layout is None:
                layout = self._json_layout(where(n), obj)
            elif set(obj) != set(layout):
                raise DataError(f"{where(n)}: keys {sorted(obj)} differ from the first line's {sorted(layout)}")
            yield n, _checked(where, n, layout, [obj[key] for key in layout])

    def _parquet(self) -> Iterator[tuple[int, tuple[str, ...]]]:
        path = self.path
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            if self.hasher is not None:  # parquet is read by seeking: hash the bytes in one pass first
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        self.hasher.update(chunk)
            pf = pq.ParquetFile(path)
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as e:  # OSError, pyarrow.ArrowInvalid (not a parquet file), ...
            raise DataError(f"{path}: cannot read as parquet: {e}") from None
        return self.parquet_rows(pf)

    def parquet_rows(self, pf, groups: tuple[int, int] | None = None, first_row: int = 1):
        """The examples of a `pyarrow.parquet.ParquetFile`, or of its row groups [a, b) whose
        first row is the file's row `first_row` (1-based; what errors name)."""
        path = self.path
        names = tuple(pf.schema_arrow.names)
        layout = self.layout = _match_layout(names, _JSON_LAYOUTS)
        if layout is None:
            raise DataError(f"{path}: unrecognised columns {sorted(names)}; accepted: {_describe(_JSON_LAYOUTS)}")
        self.blank_lines = 0
        return self._parquet_values(pf, layout, groups, first_row)

    def _parquet_values(self, pf, layout, groups, first_row) -> Iterator[tuple[int, tuple[str, ...]]]:
        import pyarrow as pa

        where = lambda n: f"{self.path}:{n}"  # noqa: E731
        n = first_row - 1
        kwargs = {} if groups is None else {"row_groups": list(range(*groups))}
        batches = pf.iter_batches(batch_size=8192, columns=list(layout), **kwargs)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:  # a corrupt or truncated file
                raise DataError(f"{self.path}: cannot read as parquet: {e}") from None
            if batch is None:
                return
            for values in zip(*(batch.column(i).to_pylist() for i in range(len(layout))), strict=True):
                n += 1
                yield n, _checked(where, n, layout, values)


def _checked(where: Callable[[int], str], n: int, layout: tuple[str, ...], values) -> tuple[str, ...]:
    """jsonl / parquet values, stripped; each must be a non-empty string."""
    for key, value in zip(layout, values, strict=True):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where(n)}: {key!r} must be a non-empty string, got {value!r}")
    return tuple(value.strip() for value in values)


def read_train_examples(path: str, fmt: str | None = None) -> tuple[list[tuple[str, ...]], ReadStats]:
    """Read training examples as tuples (sent0,), (sent0, sent1) or (sent0, sent1, hard_neg),
    all of one arity; `fmt` (one of FORMATS) defaults to detect_format(path). The whole file in
    memory: `TrainRows` streams it instead.

    txt: one sentence per line, no header. csv/tsv: a header row sent0[,sent1[,hard_neg]],
    or text, sentence, or anchor,entailment,contradiction; CSV may quote, TSV never does.
    jsonl: one object per line with keys sent0[,sent1[,hard_neg]], text, or
    origin[,entailment,contradiction]; the first line fixes the keys. parquet: columns named as
    jsonl's keys (needs pyarrow). Fields are stripped, blank lines skipped and counted; anything
    else malformed raises DataError(file:line). Files ending in .gz are decompressed."""
    rows = TrainRows(path, fmt)
    examples = [fields for _, fields in rows]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples, ReadStats(path=path, rows=len(examples), blank_lines=rows.blank_lines)


def load_examples(path: str, fmt: str | None, objective: str) -> tuple[list[Example], int]:
    """Read training examples for `objective` into memory; returns (examples, blank lines skipped).
    The in-memory reference that tests and bench/ compare the prepared corpora (corpus.py) with.

    unsup uses the first column of any layout (a sentence seen twice, dropout making the pair);
    sup needs (sent0, sent1) pairs or (sent0, sent1, hard_neg) triplets.
    """
    examples, stats = read_train_examples(resolve_path(path), fmt)
    arity = len(examples[0])
    if objective == "unsup":
        if arity > 1:
            examples = [(ex[0],) for ex in examples]
    elif arity < 2:
        raise DataError(
            f"{path}: train.objective=sup needs sent0,sent1[,hard_neg] columns, but the file has one column"
        )
    return examples, stats.blank_lines
