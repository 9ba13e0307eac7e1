"""Readers for SimCSE training examples and STS evaluation pairs.

Pure Python (no torch). Every problem with the input is raised as a `DataError` whose
message names the file and, where it applies, the 1-based line number.
"""

import csv
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message names the file and (when relevant) the 1-based line,
    e.g. 'data/x.tsv:17: expected 3 fields (sent0, sent1, hard_neg), got 2'."""


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What a reader saw in one file."""

    path: str
    rows: int  # examples returned
    blank_lines: int  # blank lines skipped (counted, not an error)


FORMATS = ("txt", "csv", "tsv", "jsonl")

_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
}
# Accepted column / key layouts, each in output order (sent0, sent1, hard_neg).
_TABLE_LAYOUTS = (
    ("sent0",), ("text",), ("sentence",), ("sent0", "sent1"),
    ("sent0", "sent1", "hard_neg"), ("anchor", "entailment", "contradiction"),
)
_JSON_LAYOUTS = (
    ("sent0",), ("text",), ("origin",), ("sent0", "sent1"),
    ("sent0", "sent1", "hard_neg"), ("origin", "entailment", "contradiction"),
)
_STS_B_FIELDS = "genre, file, year, id, score, sentence1, sentence2"


def detect_format(path: str) -> str:
    """Return the format in FORMATS implied by the file extension (case-insensitive)."""
    ext = Path(path).suffix.lower()
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
            repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2], repo_type="dataset",
            local_files_only=offline,
        )
    except Exception as e:  # offline, missing repo/file, no huggingface_hub, ...
        raise DataError(
            f"{path}: the file could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); download it and pass a local path instead"
        ) from e


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line incl. newline) of a UTF-8 file (BOM tolerated; .gz read
    through gzip)."""
    try:
        with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid UTF-8 ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
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


def _read_txt(path: str) -> tuple[list[tuple[str, ...]], int]:
    examples, blank = [], 0
    for _, line in _lines(path):
        if sentence := line.strip():
            examples.append((sentence,))
        else:
            blank += 1
    return examples, blank


def _csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) per CSV record; quoted fields may span lines."""
    reader = csv.reader(line for _, line in _lines(path))
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: {e}") from None


def _tsv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) per line, split on TAB with no quoting."""
    for n, line in _lines(path):
        yield n, line.rstrip("\r\n").split("\t")


def _read_table(path: str, rows: Iterator[tuple[int, list[str]]]) -> tuple[list[tuple[str, ...]], int]:
    examples, blank = [], 0
    header = layout = order = None
    for n, fields in rows:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            blank += 1
            continue
        if header is None:
            header = tuple(f.strip().lower() for f in fields)
            layout = _match_layout(header, _TABLE_LAYOUTS) or _mined_layout(header)
            if layout is None:
                raise DataError(
                    f"{path}:{n}: unrecognised header {','.join(header)!r}; "
                    f"accepted layouts: {_describe(_TABLE_LAYOUTS)} | sent0,sent1,hard_neg_1..hard_neg_K"
                )
            order = [header.index(name) for name in layout]
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}")
        example = tuple(fields[i].strip() for i in order)
        for name, value in zip(layout, example, strict=True):
            if not value:
                raise DataError(f"{path}:{n}: empty field {name!r}")
        examples.append(example)
    return examples, blank


def _read_jsonl(path: str) -> tuple[list[tuple[str, ...]], int]:
    examples, blank = [], 0
    layout = None
    for n, line in _lines(path):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        if layout is None:
            layout = _match_layout(tuple(obj), _JSON_LAYOUTS)
            if layout is None:
                raise DataError(f"{path}:{n}: unrecognised keys {sorted(obj)}; accepted: {_describe(_JSON_LAYOUTS)}")
        elif set(obj) != set(layout):
            raise DataError(f"{path}:{n}: keys {sorted(obj)} differ from the first line's {sorted(layout)}")
        for key in layout:
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(f"{path}:{n}: {key!r} must be a non-empty string, got {obj[key]!r}")
        examples.append(tuple(obj[key].strip() for key in layout))
    return examples, blank


def read_train_examples(path: str, fmt: str | None = None) -> tuple[list[tuple[str, ...]], ReadStats]:
    """Read training examples as tuples (sent0,), (sent0, sent1) or (sent0, sent1, hard_neg),
    all of one arity; `fmt` (one of FORMATS) defaults to detect_format(path).

    txt: one sentence per line, no header. csv/tsv: a header row sent0[,sent1[,hard_neg]],
    or text, sentence, or anchor,entailment,contradiction; CSV may quote, TSV never does.
    jsonl: one object per line with keys sent0[,sent1[,hard_neg]], text, or
    origin[,entailment,contradiction]; the first line fixes the keys. Fields are stripped,
    blank lines skipped and counted; anything else malformed raises DataError(file:line)."""
    fmt = fmt or detect_format(path)
    if fmt == "txt":
        examples, blank = _read_txt(path)
    elif fmt == "csv":
        examples, blank = _read_table(path, _csv_rows(path))
    elif fmt == "tsv":
        examples, blank = _read_table(path, _tsv_rows(path))
    elif fmt == "jsonl":
        examples, blank = _read_jsonl(path)
    else:
        raise DataError(f"{path}: unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples, ReadStats(path=path, rows=len(examples), blank_lines=blank)
