"""Every rank prepares (data/prepare.py, distributed.together): the same bytes for any ranks x
workers, a bad row named by file:line on every rank, no collective longer than the heartbeat
while the ranks' shares differ, a killed rank ending the others and its finished units reused
with the same bytes, and a simulated 2-node job that prepares and trains.

The reference for the bytes is the single-process build, itself held to the tokenizer row by
row here (tests/data/test_prepare.py holds that build's layout to data.Collator)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEMO_DATA, REPO, read_jsonl, run_gloo

from simcse_dist.config import resolve_model_path
from simcse_dist.data.prepare import open_or_prepare
from simcse_dist.data.readers import DataError, read_train_examples

WORKER = REPO / "tests" / "workers" / "prepare_worker.py"
UNIT = 1 << 15  # 32 KiB work units
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
}


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"), use_fast=True)


def sentences(n: int, tag: str = "") -> list[str]:
    demo = [s for s in (DEMO_DATA / "wiki-demo.txt").read_text("utf-8").splitlines() if s.strip()]
    return [f"{tag}{i} {demo[i % len(demo)]}" for i in range(n)]


def write_folder(folder: Path, bad: int | None = None) -> list[Path]:
    """7 files, txt / jsonl.gz / parquet in turn (f4 a plain jsonl when `bad` is its line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    paths = []
    for i in range(7):
        rows = sentences(400 + 60 * i, f"f{i}-")
        kind = "jsonl" if (i == 4 and bad is not None) else ("txt", "jsonl.gz", "parquet")[i % 3]
        path = folder / f"f{i}.{kind}"
        if kind == "txt":
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        elif kind == "parquet":
            pq.write_table(pa.table({"text": rows}), path, row_group_size=97)
        else:
            lines = [json.dumps({"text": r}) for r in rows]
            if i == 4 and bad is not None:
                lines = [json.dumps({"text": f"{r} {'x' * 60}"}) for r in rows]
                lines[bad - 1] = '{"text": "a",}'
            data = ("\n".join(lines) + "\n").encode()
            path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    big = root / "big.txt"
    big.write_text("\n".join(sentences(4000)) + "\n", encoding="utf-8")
    return big, root / "folder", write_folder(root / "folder")


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of an entry but build.json (its timing)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "build.json"
    }


def entry(cache: Path) -> Path:
    (found,) = [p for p in cache.iterdir() if p.is_dir()]
    return found


def test_any_ranks_and_workers_write_the_same_bytes(inputs, minilm, tmp_path):
    big, folder, files = inputs
    reference = {}
    for name, spec, paths in (("big", big, [big]), ("folder", folder, files)):
        corpus = open_or_prepare(
            str(spec), None, "unsup", minilm, 32, cache_dir=tmp_path / f"1x1-{name}", unit_bytes=UNIT, shard_rows=100
        )
        texts = [ex[0] for p in paths for ex in read_train_examples(str(p))[0]]
        ref = minilm(texts, truncation=True, max_length=32)["input_ids"]
        assert corpus.num_rows == len(texts) and all(corpus.ids(0, i).tolist() == ref[i] for i in range(len(texts)))
        reference[name] = tree_bytes(corpus.directory)
    assert json.loads(reference["big"]["manifest.json"])["units"] == 10  # 4000 lines, 298 KB
    assert json.loads(reference["folder"]["manifest.json"])["units"] == 10  # txt ranges, whole gz, row groups
    for ranks, layouts in ((2, (1, 2)), (3, (1,))):  # one launch for 2x1 and 2x2
        caches = {(name, w): tmp_path / f"{ranks}x{w}-{name}" for w in layouts for name in reference}
        args = []
        for (name, w), cache in caches.items():
            args += ["--input", str(big if name == "big" else folder), "--cache", str(cache), "--workers", str(w)]
        out = run_gloo(WORKER, ranks, [*args, "--unit-bytes", str(UNIT)], timeout=300)
        assert out.count(": ok ") == len(caches) * ranks, out
        for (name, w), cache in caches.items():
            built = json.loads((entry(cache) / "build.json").read_text())
            assert (built["ranks"], built["workers"]) == (ranks, w)
            assert tree_bytes(entry(cache)) == reference[name], (ranks, w, name)


def test_a_bad_row_in_the_fifth_file_is_named_on_every_rank(tmp_path):
    files = write_folder(tmp_path / "bad", bad=600)  # f4.jsonl: 640 lines, 83 KB: in its third unit
    with pytest.raises(DataError) as ref:
        read_train_examples(str(files[4]))
    assert str(ref.value).startswith(f"{files[4]}:600: invalid JSON")
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(WORKER)]
        + ["--input", str(tmp_path / "bad"), "--cache", str(cache), "--unit-bytes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    said = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank ") and ": " in line)
    assert said == [f"rank {r}: DataError: {ref.value}" for r in range(3)], proc.stdout + proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.endswith(" read it")] == ["rank 1 read it"]
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no half entry kept


def test_ranks_with_unequal_shares_outlast_the_collective_timeout(tmp_path):
    """A 4 s process-group timeout; rank 0's reader stalls 10 s in its unit (a sleep, the same on
    any machine) while rank 1 is done at once and waits in heartbeats. Control: with a heartbeat
    slower than the timeout the same job fails (the timeout is real)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(sentences(300)) + "\n")
    (tmp_path / "in" / "b.txt").write_text("one\ntwo\n")
    args = ["--input", str(tmp_path / "in"), "--timeout", "4", "--unit-bytes", str(UNIT), "--stall-s", "10"]
    out = run_gloo(WORKER, 2, [*args, "--cache", str(tmp_path / "c1")], timeout=300)
    assert out.count(": ok ") == 2 and json.loads((entry(tmp_path / "c1") / "build.json").read_text())["seconds"] > 10
    with pytest.raises(AssertionError, match="(?i)timeout|timed out"):
        run_gloo(WORKER, 2, [*args, "--cache", str(tmp_path / "c2"), "--every-s", "20"], timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_of_a_rank_ends_the_others_and_the_rerun_reuses_its_units(tmp_path, minilm):
    """Two ranks as plain processes (no launcher to end the survivor): rank 0 (the planner, and
    the host of the rendezvous store) is killed once a few units are done; rank 1 stops by
    itself, well within its timeout; a 2-rank rerun reuses every finished unit and writes the
    bytes of a clean single-process build."""
    killed = 0
    path = tmp_path / "w.txt"
    path.write_text("\n".join(sentences(60_000)) + "\n", encoding="utf-8")  # 6.5 MB: 13 units of 512 KiB
    unit, rows = 1 << 19, 2048
    cache = tmp_path / "killed"
    port = _free_port()
    args = ["--input", str(path), "--cache", str(cache), "--unit-bytes", str(unit), "--shard-rows", str(rows)]
    args += ["--timeout", "60"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(cache.glob("*.partial/units/unit-*.json"))) < 3:
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
            time.sleep(0.01)
        done_before = len(list(cache.glob("*.partial/units/unit-*.json")))
        os.kill(procs[killed].pid, signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[1 - killed]
        out = survivor.communicate(timeout=60)[0]
        ended = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert survivor.returncode != 0 and "PeerFailed" in out, out[-3000:]
    assert ended < 30, ended  # the process group's timeout is 60 s: the heartbeat noticed first
    assert not list(cache.glob("*/manifest.json")) and 3 <= done_before < 13
    rerun = run_gloo(WORKER, 2, args, timeout=300)
    reused = int(rerun.split(" unit(s) and ")[0].rsplit(", ", 1)[1])
    assert reused >= done_before, rerun
    clean = open_or_prepare(
        str(path), None, "unsup", minilm, 32, cache_dir=tmp_path / "clean", unit_bytes=unit, shard_rows=rows
    )
    assert tree_bytes(entry(cache)) == tree_bytes(clean.directory)
    assert clean.num_rows == 60_000


def test_two_simulated_nodes_prepare_and_train(inputs, tiny_bert, tmp_path):
    """torchrun --nnodes 2 on one host: two launchers with the same rendezvous, one rank each;
    simcse-train prepares the folder on both ranks (every rank a share), then trains."""
    _, folder, _ = inputs
    port = _free_port()
    overrides = [
        f"model.name_or_path={tiny_bert}",
        f"data.train_file={folder}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.prepare_workers=1",
        "train.global_batch_size=8",
        "train.max_steps=2",
        "log.every_steps=1",
        f"train.output_dir={tmp_path / 'out'}",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "checkpoint.every_steps=0",
    ]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}"]
            + ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "simcse_dist.cli", *overrides],
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "2 rank(s) x 1 worker(s)" in outs[0]
    built = entry(tmp_path / "cache")
    assert json.loads((built / "build.json").read_text())["ranks"] == 2
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "train/loss" in r] == [1, 2]
