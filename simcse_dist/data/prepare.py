"""Prepared corpus, build side: training inputs -> sharded, memory-mapped token ids, built once,
by every rank of the job together.

`open_or_prepare` (a collective) opens the entry for (inputs, reading, tokenizer, max_seq_len),
or builds it. The inputs (data/inputs.py: one file or many, local paths or fsspec URLs) are cut
into work units that depend on the files alone. Rank 0 plans: it takes the entry's lock, lists
what a killed build left, and gives each remaining unit to a rank (largest first, to the rank
with the fewest bytes so far). Every rank then reads its units and writes each unit's shards
with its own `workers` tokenizing processes (data/shards.py), while a heartbeat joins the ranks
(`distributed.together`): a failure anywhere stops every rank at once, a bad row named by
file:line on every rank. When all are done rank 0 checks the units, writes the manifest and
publishes the entry in one rename. Shard names and bytes, and the manifest, are the same for
any number of ranks and workers (the timing goes to build.json).

Entry `<root>/<input name>.<key[:20]>/`, key = sha256 of each file's identity (resolved path or
URL), size and version (mtime, or the store's etag), the format version, the columns kept, the
tokenizer fingerprint, max_seq_len and the prompts (when any): a hit reads no file.

    manifest.json                  written last: what was read (per file: size, version, sha256),
                                   shards in row order, totals
    build.json                     seconds, when, ranks and workers
    shards/shard-UUUUUU-KKKKK/     shard K of work unit U (its files: data/shards.py)

A build writes `<entry>.partial/`: plan.json (the units and their ranks), units/unit-UUUUUU.json
once every shard of unit U is complete (a rerun skips that unit unread) and the shards, each
renamed when complete (a rerun reads an unfinished unit again but keeps them). The entry must
be on a file system that every rank sees. Root: `cache_dir`, else $SIMCSE_CACHE_DIR, else
`.simcse_cache/` beside a local input if writable (by permission bits, even for root), else
~/.cache/simcse-dist.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from simcse_dist import distributed as du
from simcse_dist import logs
from simcse_dist.data.inputs import (
    UNIT_BYTES,
    InputFile,
    Unit,
    UnitReader,
    combine,
    describe,
    local_anchor,
    plan_units,
    resolve_inputs,
)
from simcse_dist.data.readers import DataError, chunk_columns
from simcse_dist.data.shards import ShardWriter, tokenizer_fingerprint, tokenizer_spec
from simcse_dist.fsutil import atomic_file, publish_dir, write_text_atomic
from simcse_dist.overrides import ConfigError

if TYPE_CHECKING:
    from simcse_dist.data.corpus import PreparedCorpus

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ENV_CACHE_DIR = "SIMCSE_CACHE_DIR"
SHARD_ROWS = 1 << 15  # rows per shard: what one worker tokenizes at a time (a few MB of text)
_SHARED = (DataError, ConfigError)  # raised on every rank with the message of the rank that had it


def default_cache_root(data_path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where entries for `data_path` (a local path, or None for a URL) live; see the module
    docstring for the order."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    if data_path is not None:
        parent = Path(data_path).expanduser().resolve().parent
        with contextlib.suppress(OSError):
            if parent.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(parent, os.W_OK):
                return parent / ".simcse_cache"
    return Path.home() / ".cache" / "simcse-dist"


def default_workers() -> int:
    """Tokenizing processes per rank when none are set: the cores this process may use, shared
    by the ranks of its node (LOCAL_WORLD_SIZE, set by torchrun; srun binds each task's cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def _identity(f: InputFile) -> str:
    return os.path.realpath(f.url) if f.local else f.url


def corpus_key(
    files: Sequence[InputFile], objective: str, tokenizer, max_seq_len: int, prompts: tuple[str, str] = ("", "")
) -> tuple[str, dict]:
    """(sha256 key, its ingredients): from the files' metadata, never their content."""
    if objective not in ("unsup", "sup"):
        raise ValueError(f"objective must be unsup or sup, got {objective!r}")
    parts = {
        "format_version": FORMAT_VERSION,
        "inputs": [{"id": _identity(f), "size": f.size, "version": f.version, "format": f.format} for f in files],
        "columns": "first" if objective == "unsup" else "all",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
    }
    if any(prompts):  # absent otherwise: corpora prepared without prompts keep their keys
        parts["prompts"] = list(prompts)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def _entry_name(spec: str | Sequence[str]) -> str:
    """The input's name: the last path component without a pattern (`+N` for a list of N + 1)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p for p in items[0].replace("://", "/").split("/") if p and not any(c in p for c in "*?[")]
    name = re.sub(r"[^\w.+-]", "_", parts[-1] if parts else "input")
    return name + (f"+{len(items) - 1}" if len(items) > 1 else "")


def _assign(weights: Sequence[int], world: int) -> list[int]:
    """Rank per unit: largest first, each to the rank with the fewest bytes so far (ties: the
    lower unit, the lower rank). A function of the sizes alone."""
    owners, heap = [0] * len(weights), [(0, r) for r in range(world)]
    for u in sorted(range(len(weights)), key=lambda u: (-weights[u], u)):
        load, r = heapq.heappop(heap)
        owners[u] = r
        heapq.heappush(heap, (load + weights[u], r))
    return owners


@contextlib.contextmanager
def _locked(entry: Path, tick: Callable[[], object]):
    """One build per entry on this file system (flock, polled so that `tick` keeps the other
    ranks' collectives alive while another job builds; a no-op where unsupported)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a+b") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        said = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log.info(f"waiting for another preparation of {entry.name} to finish")
                    said = True
                tick()
                time.sleep(0.1)
            except OSError:  # a file system without locks
                break
        yield


def _marker(partial: Path, u: int) -> Path:
    return partial / "units" / f"unit-{u:06d}.json"


_SHARD_RE = re.compile(r"shard-(\d{6})-\d{5}")


def _shard_name(u: int, k: int) -> str:
    return f"shard-{u:06d}-{k:05d}"


def _done_units(partial: Path, units: list[Unit]) -> set[int]:
    """Units a killed build finished: a marker for the same unit, every shard of it in place."""
    done = set()
    for u, unit in enumerate(units):
        with contextlib.suppress(OSError, ValueError, KeyError):
            m = json.loads(_marker(partial, u).read_text())
            if m["unit"] == unit.to_json() and all(
                (partial / "shards" / s["name"] / "shard.json").is_file() for s in m["shards"]
            ):
                done.add(u)
    return done


def _begin(
    spec, fmt, objective, tokenizer, max_seq_len, prompts, cache_dir, shard_rows, unit_bytes, workers, held, tick
):
    """Rank 0: the inputs, the key, and the entry: a hit, or a plan (the entry locked in `held`)."""
    t0 = time.time()
    files = resolve_inputs(spec, fmt)
    key, parts = corpus_key(files, objective, tokenizer, max_seq_len, prompts)
    entry = default_cache_root(local_anchor(spec), cache_dir) / f"{_entry_name(spec)}.{key[:20]}"
    began = {"entry": str(entry), "key": key, "state": "hit"}
    if (entry / "manifest.json").is_file():
        return began
    held.enter_context(_locked(entry, tick))
    if (entry / "manifest.json").is_file():  # another process finished it while we waited
        return began
    partial = entry.with_name(entry.name + ".partial")
    state = {"key": key, "shard_rows": shard_rows, "unit_bytes": unit_bytes}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((partial / "plan.json").read_text())
        if {k: old.get(k) for k in state} != state:  # another shard or unit size: start over
            shutil.rmtree(partial)
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    (partial / "units").mkdir(exist_ok=True)
    for leftover in [*(partial / "shards").glob("*.tmp-*"), *(partial / "units").glob("*.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    units = plan_units(files, unit_bytes, tick)
    done = _done_units(partial, units)
    todo = [u for u in range(len(units)) if u not in done]
    owners = [-1] * len(units)
    for u, r in zip(todo, _assign([units[u].bytes or 1 for u in todo], du.world_size()), strict=True):
        owners[u] = r
    nonce = secrets.token_hex(8)
    plan = {
        **state,
        "nonce": nonce,
        "started": t0,
        "parts": parts,
        "files": [asdict(f) for f in files],
        "units": [u.to_json() for u in units],
        "owners": owners,
    }
    write_text_atomic(partial / "plan.json", json.dumps(plan) + "\n")
    kept = sum(
        1 for p in (partial / "shards").iterdir() if (m := _SHARD_RE.fullmatch(p.name)) and int(m[1]) not in done
    )
    reused = f", {len(done)} unit(s) and {kept} more shard(s) reused" if done or kept else ""
    w = workers if tokenizer_spec(tokenizer, max_seq_len, prompts)["backend"] is not None else 1
    formats = sorted({f.format for f in files})
    log.info(
        f"preparing {_entry_name(spec)}: {', '.join(formats)}, {objective} "
        f"({'first column' if parts['columns'] == 'first' else 'all columns'}), max_seq_len {max_seq_len}, "
        f"{len(files)} file(s) in {len(units)} unit(s), {du.world_size()} rank(s) x {w} worker(s){reused} -> {entry}"
    )
    return {**began, "state": "build", "nonce": nonce}


def _visible(path: Path, check: Callable[[], object], what: str, seconds: float = 10.0):
    """`check()` once `path` is there as rank 0 wrote it; a shared file system may show it late."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except (OSError, ValueError, KeyError, AssertionError):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"data.cache_dir: rank {du.rank()} does not see {path}, which rank 0 wrote ({what}): "
                    "put data.cache_dir on a file system that every rank mounts"
                ) from None
            time.sleep(0.2)


def _read_plan(partial: Path, nonce: str) -> dict:
    def check() -> dict:
        plan = json.loads((partial / "plan.json").read_text())
        assert plan["nonce"] == nonce
        return plan

    return _visible(partial / "plan.json", check, "the plan of this build")


def _work(team: du.Team, partial: Path, plan: dict, objective: str, tokenizer, workers: int, progress: bool):
    """Every rank: its units of the plan, each into its shards and then its marker."""
    files = [InputFile(**f) for f in plan["files"]]
    units = [Unit.from_json(u) for u in plan["units"]]
    shards, me = partial / "shards", du.rank()
    mine = [u for u, r in enumerate(plan["owners"]) if r == me]
    max_seq_len, shard_rows, prompts = plan["parts"]["max_seq_len"], plan["shard_rows"], plan["parts"].get("prompts")
    bar = logs.progress(progress, desc=f"preparing ({du.world_size()} rank(s))", unit=" rows")
    units_state: dict[int, dict] = {}  # unit -> {"shards": {k: summary}, "count": shards once read, ...}

    def show() -> None:
        team.tick()
        if bar is not None:
            bar.update(team.total - bar.n)

    def finished(u: int, k: int, summary: dict) -> None:
        st = units_state[u]
        st["shards"][k] = summary
        team.add(summary["rows"])
        if st.get("count") == len(st["shards"]):
            _write_marker(partial, u, units[u], st)
            del units_state[u]

    try:
        spec_file = partial / f"tokenizer-spec-{me}.json"
        with ShardWriter(shards, tokenizer, max_seq_len, workers, spec_file, prompts) as writer:
            pending: dict = {}  # future -> (unit, shard); at most `workers` chunks in flight

            def collect(until: int) -> None:
                while len(pending) > until:
                    show()
                    ready, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in ready:
                        u, k = pending.pop(future)
                        finished(u, k, writer.result(future, _shard_name(u, k)))

            for u in mine:
                file = files[units[u].file]
                reader = UnitReader(file, units[u])
                st = units_state[u] = {"shards": {}, "reader": reader}
                count = 0
                skip = lambda k, u=u: (shards / _shard_name(u, k) / "shard.json").is_file()  # noqa: E731
                for k, columns, n in chunk_columns(iter(reader), shard_rows, objective, file.name, skip):
                    show()
                    count = k + 1
                    if columns is None:  # complete before a kill: kept, read past
                        summary = json.loads((shards / _shard_name(u, k) / "shard.json").read_text())
                        if summary["rows"] != n:
                            raise DataError(f"{file.name}: changed while being prepared; run again")
                        finished(u, k, summary)
                    else:
                        collect(writer.workers - 1)
                        pending[writer.submit(_shard_name(u, k), columns)] = (u, k)
                    del columns
                st["count"] = count
                if count == len(st["shards"]):
                    _write_marker(partial, u, units[u], st)
                    del units_state[u]
            collect(0)
    finally:
        if bar is not None:
            bar.close()


def _write_marker(partial: Path, u: int, unit: Unit, st: dict) -> None:
    reader = st["reader"]
    summaries = [st["shards"][k] for k in range(st["count"])]
    marker = {
        "unit": unit.to_json(),
        "rows": sum(s["rows"] for s in summaries),
        "blank_lines": reader.blank_lines,
        "layout": list(reader.layout) if reader.layout else None,
        "num_columns": len(summaries[0]["column_tokens"]) if summaries else None,
        "digests": reader.digests,
        "shards": [
            {"name": _shard_name(u, k), "rows": s["rows"], "tokens": s["tokens"]} for k, s in enumerate(summaries)
        ],
    }
    with atomic_file(_marker(partial, u)) as f:
        f.write(json.dumps(marker) + "\n")


def _publish(spec, fmt, entry: Path, plan: dict, objective: str, tokenizer, workers: int, tick) -> None:
    """Rank 0, once every rank is done: check the units and the files, write the manifest and
    build.json, and publish the entry in one rename."""
    partial = entry.with_name(entry.name + ".partial")
    files = [InputFile(**f) for f in plan["files"]]
    units = [Unit.from_json(u) for u in plan["units"]]
    try:
        markers = []
        for u in range(len(units)):
            tick()
            markers.append(
                _visible(_marker(partial, u), lambda u=u: json.loads(_marker(partial, u).read_text()), "a unit done")
            )
        rows = sum(m["rows"] for m in markers)
        if rows == 0:
            raise DataError(f"{describe(spec)}: no examples")
        by_columns = {}
        for m in markers:
            if m["num_columns"] is not None:
                by_columns.setdefault(m["num_columns"], files[m["unit"]["file"]].name)
        if len(by_columns) > 1:
            (a, fa), (b, fb) = sorted(by_columns.items())[:2]
            raise DataError(f"{fb}: {b} columns, but {fa} has {a}: the files of one source need the same columns")
        now = {f.url: f for f in resolve_inputs(spec, fmt)}
        for f in files:
            if f.url not in now or (now[f.url].size, now[f.url].version) != (f.size, f.version):
                raise DataError(f"{f.name}: changed while being prepared; run again")
        digests: list[list[str]] = [[] for _ in files]
        for m in markers:
            digests[m["unit"]["file"]] += m["digests"]
        file_sha = [combine(d) for d in digests]
        manifest = _manifest(spec, plan, files, file_sha, markers, objective, tokenizer)
    except DataError:  # the same input would fail the same way: keep nothing
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.time() - plan["started"]
    write_text_atomic(partial / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    record = {
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ranks": du.world_size(),
        "workers": workers,
    }
    write_text_atomic(partial / "build.json", json.dumps(record) + "\n")
    for temporary in ["plan.json", *(p.name for p in partial.glob("tokenizer-spec-*.json"))]:
        (partial / temporary).unlink(missing_ok=True)
    shutil.rmtree(partial / "units", ignore_errors=True)
    publish_dir(partial, entry, replace=False)
    log.info(
        f"preparing {_entry_name(spec)}: {rows:,} rows, {len(manifest['shards'])} shard(s), "
        f"{manifest['total_tokens']:,} tokens in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)"
    )


def _manifest(spec, plan, files, file_sha, markers, objective, tokenizer) -> dict:
    parts = plan["parts"]
    spec_ = tokenizer_spec(tokenizer, parts["max_seq_len"])
    formats = sorted({f.format for f in files})
    shards = [s for m in markers for s in m["shards"]]
    one = len(files) == 1
    return {
        "format_version": FORMAT_VERSION,
        "key": plan["key"],
        "input": {
            "path": _identity(files[0]) if one else describe(spec),
            "size": sum(f.size for f in files),
            "sha256": combine(file_sha),
            "files": [
                {"path": f.name, "id": _identity(f), "size": f.size, "version": f.version, "format": f.format}
                | {"sha256": sha}
                for f, sha in zip(files, file_sha, strict=True)
            ],
        },
        "format": formats[0] if len(formats) == 1 else "mixed",
        "objective": objective,
        "columns": parts["columns"],
        "layout": next((m["layout"] for m in markers if m["layout"]), None),
        "tokenizer": str(tokenizer.name_or_path),
        "tokenizer_fingerprint": parts["tokenizer_fingerprint"],
        "max_seq_len": parts["max_seq_len"],
        "num_columns": next(m["num_columns"] for m in markers if m["num_columns"] is not None),
        "token_type_ids": spec_["want_types"],
        "padding_side": tokenizer.padding_side,
        "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "id_dtype": spec_["id_dtype"],
        "shard_rows": plan["shard_rows"],
        "unit_bytes": plan["unit_bytes"],
        "units": len(markers),
        "shards": shards,
        "rows": sum(m["rows"] for m in markers),
        "blank_lines": sum(m["blank_lines"] for m in markers),
        "total_tokens": sum(s["tokens"] for s in shards),
    }


def _open(entry: Path) -> PreparedCorpus:
    from simcse_dist.data.corpus import PreparedCorpus

    return _visible(entry / "manifest.json", lambda: PreparedCorpus(entry), "the prepared corpus")


def open_or_prepare(
    path: str | Sequence[str],
    fmt: str | None,
    objective: str,
    tokenizer,
    max_seq_len: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = False,
    prompts: tuple[str, str] = ("", ""),
    shard_rows: int = SHARD_ROWS,
    unit_bytes: int = UNIT_BYTES,
    every_s: float = 2.0,
) -> PreparedCorpus:
    """The prepared corpus of the input `path` (a file, directory, glob or URL, or a list:
    data/inputs.py) for `objective` (unsup: the first column of any layout; sup: all columns,
    DataError on a one-column file), built first if missing, by every rank of the process group.

    collective: every rank calls this with the same arguments (without a process group, this
    process is the only rank). `workers` > 1 tokenizes in that many processes per rank;
    `progress` shows rank 0 a bar of every rank's rows (logs.progress); a build logs a line at
    its start and its end; `prompts` (query, document) are prepended to column 0 and to the
    other columns before tokenizing. No collective waits longer than about `every_s` for a peer (keep it
    well under the process group's timeout). Processes that build the same entry at once take
    turns (a file lock): the second finds it built. The result's `built` tells whether this
    call built it.
    """
    if workers > 1 and sys.modules.get("__mp_main__") is not sys.modules.get("__main__"):
        # a spawned process re-running a script's top level (spawn runs the parent's __main__
        # again as __mp_main__; elsewhere multiprocessing makes the two one module): it would
        # wait for the lock its parent holds, and the parent for it. tests/data/test_prepare.py
        # pins this
        raise RuntimeError(
            f"{describe(path)}: preparation started inside a worker process: the script that prepares "
            "(or trains) must do so under `if __name__ == '__main__':`"
        )
    workers = max(1, workers)
    with contextlib.ExitStack() as held:
        args = (path, fmt, objective, tokenizer, max_seq_len, prompts, cache_dir, shard_rows, unit_bytes, workers, held)
        began = du.broadcast_from_main(du.main_first(lambda tick: _begin(*args, tick), every_s))
        entry = Path(began["entry"])
        if began["state"] == "build":
            partial = entry.with_name(entry.name + ".partial")
            plan = du.agreed(lambda: _read_plan(partial, began["nonce"]), shared=_SHARED)
            try:
                du.together(
                    lambda team: _work(team, partial, plan, objective, tokenizer, workers, progress),
                    every_s,
                    shared=_SHARED,
                )
            except DataError:
                du.agreed(lambda: None)  # every rank's workers have stopped writing
                if du.rank() == 0:  # the same input would fail the same way: keep nothing
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            du.main_first(lambda tick: _publish(path, fmt, entry, plan, objective, tokenizer, workers, tick), every_s)
        corpus = du.agreed(lambda: _open(entry), shared=_SHARED)
    corpus.built = began["state"] == "build"
    return corpus
