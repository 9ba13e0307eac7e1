"""The MTEB adapter (simcse-eval --mteb) against mteb running the same tasks on the exported
SentenceTransformer, offline: tasks defined with local rows (bench/mteb_local_tasks.py, smaller in tests/mteb_tasks.py), a registered
task whose data is not cached (a clear error naming it), and mteb missing. mteb is an optional
extra: these tests skip without it."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import zygote
from helpers import REPO, SHARED_DATA

from simcse_dist.cli.eval import main as eval_cli
from simcse_dist.model.encoder import quiet_transformers
from simcse_dist.model.export import export_model
from simcse_dist.model.load import load_encoder

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
TASKS_FILE = REPO / "tests" / "mteb_tasks.py"  # small subclasses of the shipped example tasks


def st_scores(model_dir, task) -> dict:
    """mteb's own run of `task` on the exported folder loaded by sentence-transformers."""
    import mteb
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    result = mteb.evaluate(model, task, cache=None, co2_tracker=False, show_progress_bar=False)
    (task_result,) = result.task_results
    return task_result.scores["test"][0]


def numbers(scores: dict) -> dict[str, float]:
    return {k: v for k, v in scores.items() if isinstance(v, float) and "time" not in k}


@needs_data
def test_adapter_equals_mteb_on_the_exported_sentence_transformer(tmp_path, tiny_bert):
    pytest.importorskip("mteb")
    import mteb
    import mteb_tasks

    from simcse_dist.eval.mteb_adapter import MtebEncoder

    with quiet_transformers():
        export_model("bundled:all-MiniLM-L6-v2", tmp_path / "minilm")
        export_model(tiny_bert, tmp_path / "tiny", pooler="avg_top2")  # a layer pooler: WeightedLayerPooling in ST
    main = {}
    for model_dir, task_class in (
        (tmp_path / "minilm", mteb_tasks.LocalSTSB),
        (tmp_path / "tiny", mteb_tasks.LocalSTSRetrieval),
    ):
        with quiet_transformers():
            encoder, tokenizer, meta = load_encoder(model_dir)
        adapter = MtebEncoder(encoder, tokenizer, torch.device("cpu"), name=model_dir.name, batch_size=64)
        (ours,) = mteb.evaluate(
            adapter, task_class(), cache=None, co2_tracker=False, show_progress_bar=False
        ).task_results
        ours = numbers(ours.scores["test"][0])
        reference = numbers(st_scores(model_dir, task_class()))
        assert ours.keys() == reference.keys() and "main_score" in ours
        for key, value in reference.items():  # NaN where both are NaN (e.g. nAUC at a depth the corpus lacks)
            same = math.isclose(ours[key], value, abs_tol=1e-6) or (math.isnan(ours[key]) and math.isnan(value))
            assert same, (task_class.__name__, key, ours[key], value)
        main[task_class.__name__] = ours["main_score"]
    assert main["LocalSTSB"] > 0.9  # the pretrained MiniLM on STS-B: a real score, not a degenerate one


@needs_data
def test_eval_cli_mteb_runs_local_tasks_and_names_the_missing_one(tmp_path, capsys, tiny_bert):
    pytest.importorskip("mteb")
    import mteb_tasks

    with quiet_transformers():
        export_model(tiny_bert, tmp_path / "tiny", pooler="avg")
    out = tmp_path / "mteb.json"
    # STSBenchmark is registered, but its Hub dataset is not in this machine's cache (no network)
    code = eval_cli(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--mteb",
            f"{TASKS_FILE}:LocalSTSB,STSBenchmark",
            "--output-json",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "STSBenchmarkLocal (cosine_spearman)" in captured.out  # the task that could run still ran
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: MTEB task STSBenchmark:")
    assert "mteb/stsbenchmark-sts" in error[0] and "load_data()" in error[0] and "file.py:Class" in error[0]
    got = json.loads(out.read_text())
    reference = st_scores(tmp_path / "tiny", mteb_tasks.LocalSTSB())["main_score"]
    assert got == {"mteb/STSBenchmarkLocal": pytest.approx(100 * reference, abs=1e-4)}


@pytest.mark.slow
@needs_data
def test_eval_cli_mteb_on_two_ranks(tmp_path, tiny_bert):
    """Each rank runs mteb and encodes a share; a task that cannot load is skipped by both ranks
    (they agree), reported once by rank 0, and the others still equal mteb on the ST model."""
    pytest.importorskip("mteb")
    import mteb_tasks

    with quiet_transformers():
        export_model(tiny_bert, tmp_path / "tiny", pooler="avg_first_last")
    out = tmp_path / "two-ranks.json"
    args = [
        "--model",
        str(tmp_path / "tiny"),
        "--batch-size",
        "16",
        "--mteb",
        f"{TASKS_FILE}:LocalSTSB,STSBenchmark,{TASKS_FILE}:LocalSTSRetrieval",
        "--output-json",
        str(out),
        "--no-progress",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    proc = zygote.run(["-m", "simcse_dist.cli.eval", *args], ranks=2, env=env, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("error: MTEB task STSBenchmark:") == 1, proc.stderr[-4000:]
    assert "2 rank(s)" in proc.stdout
    got = json.loads(out.read_text())
    for name, task in (
        ("STSBenchmarkLocal", mteb_tasks.LocalSTSB()),
        ("STSRetrievalLocal", mteb_tasks.LocalSTSRetrieval()),
    ):
        assert got[f"mteb/{name}"] / 100 == pytest.approx(st_scores(tmp_path / "tiny", task)["main_score"], abs=1e-6)


def test_eval_cli_mteb_bad_requests_fail_before_loading_the_model(tmp_path, capsys, monkeypatch):
    no_model = str(tmp_path / "no-model")  # never loaded: the task list is checked first
    try:
        import mteb  # noqa: F401
    except ImportError:
        pass
    else:
        assert eval_cli(["--model", no_model, "--mteb", "NoSuchTask"]) == 2
        assert "unknown MTEB task 'NoSuchTask'" in capsys.readouterr().err
        assert eval_cli(["--model", no_model, "--mteb", f"{TASKS_FILE}:Nothing"]) == 2
        assert "has no mteb task class 'Nothing'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mteb", None)  # as if not installed
    assert eval_cli(["--model", no_model, "--mteb", "STS12"]) == 2
    assert "pip install 'simcse-dist[mteb]'" in capsys.readouterr().err
