"""Atomic publishing (simcse_dist/fsutil.py): readers see the old or the new version, never half
and never nothing."""

from __future__ import annotations

import pytest

from simcse_dist import fsutil


def _version(d) -> str:
    return (d / "v").read_text()


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_a_directory_and_leaves_nothing_else(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system without renameat2(RENAME_EXCHANGE): the two-rename fallback
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    final = tmp_path / "best"
    for v in ("1", "2"):
        with fsutil.atomic_dir(final) as tmp:
            (tmp / "v").write_text(v)
    assert _version(final) == "2" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_exchange_is_used_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "v").write_text("a")
    (b / "v").write_text("b")
    assert fsutil._exchange(a, b)
    assert (_version(a), _version(b)) == ("b", "a")


def test_a_failed_write_publishes_nothing(tmp_path):
    final = tmp_path / "best"
    with fsutil.atomic_dir(final) as tmp:
        (tmp / "v").write_text("good")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(final) as tmp:
        (tmp / "v").write_text("half")
        raise RuntimeError("crash mid-write")
    assert _version(final) == "good" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_crash_between_the_fallback_renames_is_recovered(tmp_path):
    final = tmp_path / "best"
    old = tmp_path / "best.old"
    old.mkdir()
    (old / "v").write_text("previous")  # the fallback moved best/ aside, then the process died
    fsutil.recover_dir(final)
    assert _version(final) == "previous" and not old.exists()


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    out = tmp_path / "mined.tsv"
    with fsutil.atomic_file(out) as f:
        f.write("a\n")
    with pytest.raises(ValueError), fsutil.atomic_file(out) as f:
        f.write("partial")
        raise ValueError
    assert out.read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == ["mined.tsv"]
