"""data.sources: a mixture of an unsup text file and sup triplets in one run, each step's global
batch from one source, the same losses on 1 and 2 ranks, per-source metrics, config errors."""

from __future__ import annotations

import shutil

import pytest
from helpers import DEMO_DATA, cli, ok, read_jsonl

from simcse_dist.config import ConfigError, load_config

SOURCES = (
    f"data.sources=[{{name: wiki, path: {DEMO_DATA / 'wiki-demo.txt'}, objective: unsup}}, "
    f"{{name: nli, path: {DEMO_DATA / 'nli-demo.tsv'}, objective: sup, weight: 2}}]"
)


@pytest.mark.slow
def test_two_source_mixture_gives_the_same_losses_on_one_and_two_ranks(tiny_bert, tmp_path):
    common = [
        f"model.name_or_path={tiny_bert}",
        "model.dropout=0",
        SOURCES,
        "train.global_batch_size=12",
        "train.max_steps=6",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "optim.lr=1e-3",
        "checkpoint.every_steps=0",
    ]
    one = ok(cli([*common, f"train.output_dir={tmp_path / 'one'}"]))
    ok(cli([*common, f"train.output_dir={tmp_path / 'two'}"], nproc=2))
    assert "wiki: 660 examples" in one.stdout and "nli: 216 examples" in one.stdout, one.stdout
    rows = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 6
    drawn = []
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert set(k for k in a if "/" in k) == set(k for k in b if "/" in k)
        for key in [k for k in a if k.startswith(("train/loss", "train/grad_norm"))]:
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
        counts = (a["data/steps/wiki"], a["data/steps/nli"])
        assert counts == (b["data/steps/wiki"], b["data/steps/nli"]) and sum(counts) == a["step"]
        (source,) = [k.removeprefix("train/loss/") for k in a if k.startswith("train/loss/")]  # one per step
        assert a[f"train/loss/{source}"] == pytest.approx(a["train/loss"], rel=1e-6)
        drawn.append(source)
    assert set(drawn) == {"wiki", "nli"}, drawn  # both objectives ran in this run
    # sup steps score 12 x 2 candidates per anchor, unsup 12: their first losses differ in scale
    first = {s: next(r["train/loss"] for r, d in zip(rows["one"], drawn, strict=True) if d == s) for s in set(drawn)}
    assert first["nli"] > first["wiki"]


@pytest.mark.slow
def test_resumed_mixture_continues_the_schedule_and_its_counts(tiny_bert, tmp_path):
    """A 6-step run's checkpoint at step 3, resumed at 2 ranks: the same sources, losses and
    cumulative data/steps/<name> for steps 4-6 as the uninterrupted one-rank run."""
    common = [
        f"model.name_or_path={tiny_bert}",
        "model.dropout=0",
        SOURCES,
        "train.global_batch_size=12",
        "train.max_steps=6",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "optim.lr=1e-3",
        "checkpoint.every_steps=3",
    ]
    ok(cli([*common, f"train.output_dir={tmp_path / 'whole'}"]))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")  # as if stopped after step 3
    resumed = ok(cli([*common, f"train.output_dir={tmp_path / 'cut'}"], nproc=2))
    assert "resumed from step 3" in resumed.stdout
    whole, cut = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("whole", "cut"))
    assert [r["step"] for r in cut] == list(range(1, 7))
    for a, b in zip(whole[3:], cut[3:], strict=True):
        assert {k for k in a if k.startswith(("data/", "train/loss/"))} == {
            k for k in b if k.startswith(("data/", "train/loss/"))
        }
        assert (a["data/steps/wiki"], a["data/steps/nli"]) == (b["data/steps/wiki"], b["data/steps/nli"])
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)


def test_mixture_config_errors_name_the_field(tmp_path):
    for overrides, match in [
        ([SOURCES, f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}"], "data.sources: give either"),
        (
            [f"data.sources=[{{path: {DEMO_DATA / 'wiki-demo.txt'}}}, {{path: x.txt, weight: -1}}]"],
            r"data.sources\[1\].weight: must be a finite number > 0",
        ),
        ([SOURCES, "data.drop_last=false"], "data.drop_last: false needs a single source"),
        (
            [f"data.sources=[{{path: {DEMO_DATA / 'wiki-demo.txt'}}}, {{path: {DEMO_DATA / 'wiki-demo.txt'}}}]"],
            "two sources are named 'wiki-demo'",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides).validate(1)
    cfg = load_config(None, [f"data.sources=[{{path: {tmp_path / 'missing.txt'}}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: file not found"):
        cfg.validate(1)
