"""Training inputs: what `data.train_file` / `data.sources[].path` name -> files -> work units.

A spec is a path or an fsspec URL (`hf://`, `s3://`, `gs://`, `https://`, `memory://`, ...), a
directory (its files of known formats, sorted; names starting with `.` or `_` skipped), a glob
(its matches, sorted) or a list of these (in order). Every file is read through fsspec's public
API as a stream (`fs.open`, `seek`, `read`), never copied whole; its metadata (`fs.info`: size,
and the modification time or etag) keys the prepared corpus, so a start reads no content.

Work units (`plan_units`) depend only on the files and `unit_bytes`, never on ranks or workers:
- txt, tsv, jsonl: byte ranges of `unit_bytes`; a line belongs to the range where it begins
  (a unit reads past its end to finish its last line, and skips the line it starts inside);
- parquet: consecutive row groups, until their bytes reach `unit_bytes`;
- gzip (not splittable) and csv (a quoted field may span lines): the whole file.
Each unit hashes the bytes it covers (the units of a file partition it) in pieces that do not
depend on `unit_bytes` either (for any `unit_bytes` of at least DIGEST_BLOCK, as outside tests):
DIGEST_BLOCK-byte blocks of text files, the span of each parquet row group, the whole file
otherwise. `combine` folds them into a file's and an input's sha256:
a file read in one piece gets its own sha256.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from simcse_dist.data.readers import DataError, TrainRows, detect_format

log = logging.getLogger(__name__)

UNIT_BYTES = 1 << 25  # 32 MiB of text, ~300k rows: ~10 s of one worker's tokenizing
DIGEST_BLOCK = 1 << 22  # text files are hashed in 4 MiB blocks (smaller units, in tests: in blocks of their size)
_REMOTE_BLOCK = 1 << 23  # fsspec's read-ahead for object stores: few, large requests
_GLOB = "*?["
# what fs.info may give that changes with the content, most specific first
_VERSION_KEYS = (
    "ETag",
    "etag",
    "blob_id",
    "md5Hash",
    "generation",
    "VersionId",
    "version_id",
    "Content-MD5",
    "Digest",
    "LastModified",
    "last_modified",
    "Last-Modified",
    "mtime",
    "updated",
    "created",
)


@dataclass(frozen=True, slots=True)
class InputFile:
    """One training file: `name` as messages show it (the path or URL), `url` what fsspec opens."""

    name: str
    url: str
    size: int
    version: str  # local: st_mtime_ns; a store: its etag, blob id or modification time
    format: str

    @property
    def local(self) -> bool:
        return "://" not in self.url

    def open(self):
        """A binary stream of the file (seekable), closed by the caller."""
        from fsspec.core import url_to_fs

        try:
            fs, path = url_to_fs(self.url)
            return fs.open(path, "rb") if self.local else fs.open(path, "rb", block_size=_REMOTE_BLOCK)
        except FileNotFoundError:
            raise DataError(f"{self.name}: file not found") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{self.name}: cannot read: {e}") from None


@dataclass(frozen=True, slots=True)
class Unit:
    """One work unit: bytes [cuts[0], cuts[-1]) of file `file`, hashed in the pieces between
    consecutive cuts. kind: "lines" (a byte range), "parquet" (row groups `groups` = [a, b),
    whose first row is the file's row `first_row`) or "whole" (one stream)."""

    file: int
    kind: str
    cuts: tuple[int, ...]
    groups: tuple[int, int] | None = None
    first_row: int = 1

    @property
    def bytes(self) -> int:
        return self.cuts[-1] - self.cuts[0]

    def to_json(self) -> dict:
        """As plan.json and the unit markers hold it (lists, not tuples: equal once read back)."""
        d = asdict(self)
        return {**d, "cuts": list(self.cuts), "groups": list(self.groups) if self.groups else None}

    @staticmethod
    def from_json(d: dict) -> Unit:
        groups = tuple(d["groups"]) if d["groups"] is not None else None
        return Unit(d["file"], d["kind"], tuple(d["cuts"]), groups, d["first_row"])


def describe(spec: str | Sequence[str]) -> str:
    """A spec in one line, for messages."""
    if isinstance(spec, str):
        return spec
    items = list(spec)
    return ", ".join(items) if len(items) <= 3 else f"{items[0]}, {items[1]}, ... ({len(items)} inputs)"


def _url(item: str) -> str:
    """An fsspec URL for a spec item: `hf://<owner>/<repo>/...` means a dataset repo, as
    `hf://datasets/<owner>/<repo>/...`; local paths get expanduser."""
    if item.startswith("hf://"):
        ref = item.removeprefix("hf://")
        if not ref.startswith(("datasets/", "spaces/", "models/")):
            ref = f"datasets/{ref}"
        if len(ref.split("/", 3)) < 4 or not all(ref.split("/", 3)):
            raise DataError(f"{item}: expected hf://datasets/<owner>/<repo>/<path>")
        return f"hf://{ref}"
    return item if "://" in item else os.path.expanduser(item)


def _offline_hub() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_cached(item: str, url: str) -> str:
    """HF_HUB_OFFLINE: the Hub's cached copy of one file (huggingface_hub's public cache lookup)."""
    from huggingface_hub import try_to_load_from_cache

    kind, owner, repo, filename = url.removeprefix("hf://").split("/", 3)
    cached = try_to_load_from_cache(f"{owner}/{repo}", filename, repo_type=kind.rstrip("s"))
    if isinstance(cached, str):
        return cached
    raise DataError(
        f"{item}: HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache; "
        "unset it to stream the file, or pass a local path"
    )


def _skipped(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative).parts)


def _version(fs, path: str, info: dict) -> str:
    if type(fs).__name__ == "LocalFileSystem":
        return str(os.stat(path).st_mtime_ns)  # fs.info's float mtime loses nanoseconds
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return str(info[key])
    log.warning(f"{path}: the store gives no modification time or etag: a change that keeps the size goes unnoticed")
    return ""


def _expand(item: str, fmt: str | None) -> list[InputFile]:
    url = _url(item)
    if url.startswith("hf://") and _offline_hub() and not any(c in url for c in _GLOB):
        url = _hub_cached(item, url)
    try:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(url)
        if any(c in root for c in _GLOB):
            found = {p: i for p, i in fs.glob(root, detail=True).items() if i.get("type") == "file"}
            found = {p: i for p, i in found.items() if not _skipped(PurePosixPath(p).name)}
            if not found:
                raise DataError(f"{item}: no file matches")
        elif fs.isdir(root):
            found = {
                p: i
                for p, i in fs.find(root, detail=True).items()
                if not _skipped(os.path.relpath(p, root)) and (fmt or _known(p))
            }
            if not found:
                raise DataError(
                    f"{item}: no training files in this directory (.txt, .csv, .tsv, .jsonl, .parquet[.gz])"
                )
        else:
            found = {root: fs.info(root)}
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{item}: file not found") from None
    except ImportError as e:  # s3fs, gcsfs, aiohttp: fsspec names the package
        raise DataError(f"{item}: {e}") from None
    except Exception as e:  # OSError, the Hub's errors (offline, missing repo), ...
        raise DataError(f"{item}: cannot read ({type(e).__name__}: {e})") from None
    files = []
    for path in sorted(found):
        info = found[path]
        if info.get("size") is None:
            raise DataError(f"{item}: the store does not give the size of {path}")
        local = type(fs).__name__ == "LocalFileSystem"
        if local:
            name = os.path.expanduser(item) if len(found) == 1 and path == root else path
        else:
            name = fs.unstrip_protocol(path)
        files.append(
            InputFile(
                name=name,
                url=path if local else fs.unstrip_protocol(path),
                size=int(info["size"]),
                version=_version(fs, path, info),
                format=fmt or detect_format(path),
            )
        )
    if url != _url(item):  # the Hub's cached copy: messages name what the user wrote
        files = [InputFile(item, f.url, f.size, f.version, f.format) for f in files]
    return files


def _known(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except DataError:
        return False


def resolve_inputs(spec: str | Sequence[str], fmt: str | None = None) -> list[InputFile]:
    """The files of a spec, in order, with their metadata (no content read). DataError naming
    the item for a missing file, an empty directory or glob, or an unreadable store."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items or not all(items):
        raise DataError(f"{describe(spec) or '(empty)'}: no training file given")
    return [f for item in items for f in _expand(item, fmt)]


def local_anchor(spec: str | Sequence[str]) -> str | None:
    """The local path whose directory holds the default cache: the first item, or for a glob
    the directory above its first pattern (as for a directory: the cache sits beside it)."""
    first = spec if isinstance(spec, str) else (list(spec) or [""])[0]
    if not first or "://" in first:
        return None
    first = os.path.expanduser(first)
    while any(c in first for c in _GLOB):
        first = os.path.dirname(first)
    return first.rstrip("/") or "/"


def combine(digests: Sequence[str]) -> str:
    """The sha256 of parts read apart: a single part's own, else that of their hex digests."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# --- planning ---------------------------------------------------------------------------------


def plan_units(files: Sequence[InputFile], unit_bytes: int = UNIT_BYTES, tick=lambda: None) -> list[Unit]:
    """The work units of `files`, in file order (parquet footers are read; nothing else)."""
    block = min(DIGEST_BLOCK, unit_bytes)
    if unit_bytes % block:
        raise ValueError(f"unit_bytes must be a multiple of {DIGEST_BLOCK}, got {unit_bytes}")
    units: list[Unit] = []
    for i, f in enumerate(files):
        tick()
        if f.format == "parquet":
            units += _parquet_units(i, f, unit_bytes)
        elif f.format == "csv" or f.name.endswith(".gz"):
            units.append(Unit(i, "whole", (0, f.size)))
        else:
            for start in range(0, max(f.size, 1), unit_bytes):
                end = min(start + unit_bytes, f.size)
                units.append(Unit(i, "lines", (*range(start, end, block), end) if end > start else (0, 0)))
    return units


def _parquet_units(i: int, f: InputFile, unit_bytes: int) -> list[Unit]:
    """Row groups [a, b) per unit; the cuts are the row groups' starts (the first at 0, the last
    at the file's end: a file's units cover all its bytes)."""
    md = _parquet_metadata(f)
    n = md.num_row_groups
    starts, rows = [], []
    for g in range(n):
        rg = md.row_group(g)
        offsets = []
        for c in range(rg.num_columns):
            col = rg.column(c)
            offsets.append(col.data_page_offset)
            if col.has_dictionary_page and col.dictionary_page_offset:
                offsets.append(col.dictionary_page_offset)
        starts.append(min(offsets) if offsets else 0)
        rows.append(rg.num_rows)
    bounds = [0, *starts[1:], f.size]
    if n == 0 or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):  # no or unusual layout: one unit
        return [Unit(i, "parquet", (0, f.size), (0, n), 1)]
    units, a, first = [], 0, 1
    for g in range(n):
        if bounds[g + 1] - bounds[a] >= unit_bytes or g == n - 1:
            units.append(Unit(i, "parquet", tuple(bounds[a : g + 2]), (a, g + 1), first))
            first += sum(rows[a : g + 1])
            a = g + 1
    return units


def _parquet_metadata(f: InputFile):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f.name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        with f.open() as stream:
            return pq.ParquetFile(stream).metadata
    except DataError:
        raise
    except Exception as e:  # pyarrow.ArrowInvalid: not a parquet file
        raise DataError(f"{f.name}: cannot read as parquet: {e}") from None


# --- reading ------------------------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """Reads `f` from byte `pos` on; the bytes inside [cuts[0], cuts[-1]) go to one sha256 per
    piece between consecutive cuts."""

    def __init__(self, f, pos: int, cuts: tuple[int, ...]) -> None:
        self._f, self._pos, self.cuts = f, pos, cuts
        self._hashers = [hashlib.sha256() for _ in cuts[1:]]
        self.hashed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.feed(data)
        return n

    def feed(self, data: bytes) -> None:
        lo, hi = self._pos, self._pos + len(data)
        view = memoryview(data)
        for k, h in enumerate(self._hashers):
            a, c = max(lo, self.cuts[k]), min(hi, self.cuts[k + 1])
            if a < c:
                h.update(view[a - lo : c - lo])
                self.hashed += c - a
        self._pos = hi

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self._hashers]


class _SpanFile(io.RawIOBase):
    """A parquet file for pyarrow: bytes [start, start + len(data)) from memory (read once, and
    hashed), the rest (the footer) from the stream."""

    def __init__(self, f, start: int, data: bytes, size: int) -> None:
        self._f, self._start, self._data, self._size, self._pos = f, start, data, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self._size + offset}[whence]
        return self._pos

    def readinto(self, b) -> int:
        n, rel = min(len(b), max(self._size - self._pos, 0)), self._pos - self._start
        if 0 <= rel and rel + n <= len(self._data):
            b[:n] = self._data[rel : rel + n]
        else:
            self._f.seek(self._pos)
            data = self._f.read(n)
            n = len(data)
            b[:n] = data
        self._pos += n
        return n


def _blank(fmt: str, line: str) -> bool:
    """What the format's reader skips as a blank line (tsv: no TAB and nothing else)."""
    body = line.rstrip("\r\n")
    return not body.strip() and (fmt != "tsv" or "\t" not in body)


def _head(f: InputFile) -> tuple[int, int, str] | None:
    """(byte offset, line number, text) of a file's first non-blank line, or None."""
    with f.open() as stream:
        pos = 0
        for n, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f.name}:{n}: not valid UTF-8 ({e})") from None
            if not _blank(f.format, line):
                return pos, n, line
            pos += len(raw)
    return None


def _lines_before(f: InputFile, offset: int) -> int:
    """Lines that end before byte `offset` (what an error inside a byte range counts, only then)."""
    count, left = 0, offset
    with f.open() as stream:
        while left > 0 and (chunk := stream.read(min(left, 1 << 23))):
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


class UnitReader:
    """The examples of one work unit, streamed: iterating yields (line or row number, fields) as
    `TrainRows` reads the whole file (the same numbers and errors); then `digests` holds the
    sha256 of each of the unit's pieces, `layout` and `blank_lines` what it saw."""

    def __init__(self, file: InputFile, unit: Unit) -> None:
        self.file, self.unit = file, unit
        self.rows = TrainRows(file.name, file.format)
        self.digests: list[str] = []

    @property
    def layout(self) -> tuple[str, ...] | None:
        return self.rows.layout

    @property
    def blank_lines(self) -> int:
        return self.rows.blank_lines

    def __iter__(self) -> Iterator[tuple[int, tuple[str, ...]]]:
        kind = self.unit.kind
        return self._parquet() if kind == "parquet" else self._whole() if kind == "whole" else self._range()

    def _whole(self):
        from simcse_dist.data.readers import read_lines

        hasher, name = hashlib.sha256(), self.file.name
        yield from self.rows.parse(read_lines(name, hasher, opened=self.file.open()), lambda n: f"{name}:{n}")
        self.digests = [hasher.hexdigest()]

    def _range(self):
        f, cuts = self.file, self.unit.cuts
        start = cuts[0]
        head = None
        if start and f.format in ("tsv", "jsonl") and (found := _head(f)) is not None and found[0] < start:
            head = (f"{f.name}:{found[1]}", found[2])
        first = [start]  # where the unit's first line begins, once read

        def where(n: int) -> str:
            return f"{f.name}:{n + (_lines_before(f, first[0]) if first[0] else 0)}"

        yield from self.rows.parse(self._range_lines(first, where), where, head)

    def _range_lines(self, first: list[int], where) -> Iterator[tuple[int, str]]:
        f, cuts = self.file, self.unit.cuts
        start, end = cuts[0], cuts[-1]
        with f.open() as stream:
            pos = max(start - 1, 0)
            stream.seek(pos)
            raw = _Hashing(stream, pos, cuts)
            buf = io.BufferedReader(raw, 1 << 20)
            if start:  # the line that began before this unit belongs to the one before
                pos += len(buf.readline())
            first[0], n = pos, 0
            while pos < end:
                line = buf.readline()
                if not line:
                    break
                n += 1
                try:
                    text = line.decode("utf-8-sig" if pos == 0 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where(n)}: not valid UTF-8 ({e})") from None
                yield n, text
                pos += len(line)
        if raw.hashed != end - start:
            raise DataError(f"{f.name}: shorter than {f.size} bytes: changed while being prepared; run again")
        self.digests = raw.digests()

    def _parquet(self):
        import pyarrow.parquet as pq

        f, u = self.file, self.unit
        start, end = u.cuts[0], u.cuts[-1]
        with f.open() as stream:
            stream.seek(start)
            data = stream.read(end - start)
            if len(data) != end - start:
                raise DataError(f"{f.name}: shorter than {f.size} bytes: changed while being prepared; run again")
            hashing = _Hashing(stream, start, u.cuts)
            hashing.feed(data)
            try:
                pf = pq.ParquetFile(_SpanFile(stream, start, data, f.size))
            except Exception as e:  # pyarrow.ArrowInvalid: not a parquet file
                raise DataError(f"{f.name}: cannot read as parquet: {e}") from None
            yield from self.rows.parquet_rows(pf, u.groups, u.first_row)
        self.digests = hashing.digests()
