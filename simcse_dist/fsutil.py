"""The one way this project publishes a file or a directory: write it under a temporary name
next to the final one, then rename. Readers see the old version or the new one, never half.

Directories (checkpoints, best/, exports, token-cache entries, universal checkpoints):
`staging_dir(final)` gives an empty `<final>.tmp`; `publish_dir(tmp, final)` puts it in place.
When `final` already exists, the two are exchanged in one `renameat2(RENAME_EXCHANGE)` call
(Linux >= 3.15), so `final` is never absent; where the file system lacks it (some network file
systems), `final` is first moved aside to `<final>.old` and `recover_dir(final)` puts that back
if a crash fell between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or file system cannot."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:  # glibc < 2.28
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def staging_dir(final: Path, suffix: str = ".tmp") -> Path:
    """An empty `<final><suffix>` directory (a leftover of a crashed write is removed first)."""
    tmp = final.with_name(final.name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path, replace: bool = True) -> Path:
    """Put the complete directory `tmp` in place as `final`. With `replace=False` an existing
    `final` (another process won a race to write the same content) is kept and `tmp` dropped."""
    recover_dir(final)
    if not final.exists():
        try:
            tmp.rename(final)
            return final
        except OSError:
            if not final.exists():
                raise
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    if _exchange(tmp, final):  # tmp now holds the old version
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: Path) -> None:
    """Undo a crash between the two renames of the fallback in `publish_dir`."""
    old = final.with_name(final.name + ".old")
    if old.is_dir() and not final.exists():
        old.rename(final)


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into tmp; published only if the block completes."""
    tmp = staging_dir(final, f".tmp-{os.getpid()}")
    try:
        yield tmp
        publish_dir(tmp, final, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """`with atomic_file(out) as f:` stream into `<out>.tmp-<pid>`; renamed over `out` only if
    the block completes (large outputs written row by row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small file (config.yaml, metrics.jsonl after a resume) in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class WriteFailure(RuntimeError):
    """Writing run output failed (disk full, read-only, I/O error); the message names the path
    and the cause in words. The console scripts exit with cli.common.EXIT_WRITE_FAILURE."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system holding `path` (or its nearest parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def probe_writable(directory: Path) -> OSError | None:
    """Create and remove a small file in `directory`; the error, if any (root ignores permission
    bits, so only trying tells a read-only or full file system)."""
    probe = Path(directory) / f".simcse-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return None
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return e


def explain(path: Path, error: BaseException) -> str:
    """`<path>: <cause in words>` for a failed write, diagnosing errors that do not carry an
    errno (torch.save reports a full disk as 'unexpected pos ...')."""
    code = getattr(error, "errno", None)
    if code is None:  # errors of Rust code (safetensors, tokenizers) carry the OS error in the text
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
    if code is None:
        probe = probe_writable(Path(path) if Path(path).is_dir() else Path(path).parent)
        code = getattr(probe, "errno", None)
    words = {
        errno.ENOSPC: "the disk is full (ENOSPC)",
        errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
        errno.EROFS: "the file system is read-only (EROFS)",
        errno.EACCES: "permission denied (EACCES)",
        errno.EIO: "an I/O error from the device (EIO)",
    }
    cause = words.get(code, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}")
    detail = getattr(error, "strerror", None)
    if code in words and detail and detail != os.strerror(code):
        cause += f": {detail}"
        return f"{path}: {cause}"
    with contextlib.suppress(OSError):
        cause += f"; {human_bytes(free_bytes(Path(path)))} free there"
    return f"{path}: {cause}"
