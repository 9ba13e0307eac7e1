"""The model card: its front matter as huggingface_hub parses it, and its two usage snippets
(sentence-transformers, plain transformers) run as written for every pooler, with embeddings equal
to load_encoder's; simcse-export writes it from the run's config.yaml and best_info.json;
--push-to-hub without network fails with one line."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DEMO_DATA

from simcse_dist.cli.export import main as export_cli
from simcse_dist.model.card import PLACEHOLDER_ID, write_model_card
from simcse_dist.model.encoder import quiet_transformers
from simcse_dist.model.export import export_model
from simcse_dist.model.load import load_encoder

CONFIG = {
    "model": {"name_or_path": "bundled:all-MiniLM-L6-v2", "pooler": "cls", "mlp_only_train": True, "dropout": None},
    "data": {"train_file": "hf://datasets/princeton-nlp/datasets-for-simcse/wiki1m_for_simcse.txt", "max_seq_len": 32},
    "train": {"objective": "unsup", "global_batch_size": 64, "max_steps": 100, "seed": 1, "output_dir": "runs/x"},
    "loss": {"temperature": 0.05},
    "optim": {"lr": 3e-5, "warmup_ratio": 0.0},
    "engine": {"zero_stage": 2},
}
# (pooler, mlp_only_train, MLP weights in the folder)
KINDS = {
    "cls-mlp": ("cls", False, True),
    "cls-mlp-only-train": ("cls", True, False),
    "cls_before_pooler": ("cls_before_pooler", False, False),
    "avg": ("avg", False, False),
    "avg_first_last": ("avg_first_last", False, False),
    "avg_top2": ("avg_top2", False, False),
    "pooler_output": ("pooler_output", False, False),
}


def model_dir(tmp_path: Path, tiny_bert: Path, kind: str) -> Path:
    """An exported model of each kind, built from the tiny BERT with the documented files
    (simcse_config.json, simcse_mlp.pt) rather than by training."""
    pooler, mlp_only_train, mlp = KINDS[kind]
    src = tmp_path / f"src-{kind}"
    shutil.copytree(tiny_bert, src)
    (src / "simcse_config.json").write_text(
        json.dumps({"pooler": pooler, "mlp_only_train": mlp_only_train, "mlp": mlp})
    )
    if mlp:
        gen = torch.Generator().manual_seed(3)
        torch.save(
            {"dense.weight": torch.randn(32, 32, generator=gen) * 0.2, "dense.bias": torch.randn(32, generator=gen)},
            src / "simcse_mlp.pt",
        )
    with quiet_transformers():
        return export_model(src, tmp_path / kind)


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_block(code: str, path: Path) -> dict:
    code, n = re.subn(r'^model_id = "[^"]*".*$', f"model_id = {str(path)!r}", code, flags=re.M)
    assert n == 1, code
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()), quiet_transformers():
        exec(compile(code, "README.md", "exec"), namespace)  # the card's own usage code, as a reader would run it
    return namespace


@pytest.mark.parametrize("kind", list(KINDS))
def test_card_usage_code_runs_and_matches_load_encoder(tmp_path, tiny_bert, kind):
    path = model_dir(tmp_path, tiny_bert, kind)
    card = write_model_card(path, config=CONFIG, scores={"STS-B test Spearman x 100": 81.234}).read_text()
    blocks = python_blocks(card)
    assert len(blocks) == 2 and "SentenceTransformer" in blocks[0] and "AutoModel" in blocks[1]
    with quiet_transformers():
        encoder, tokenizer, _ = load_encoder(path)
    for code in blocks:
        namespace = run_block(code, path)
        with torch.no_grad():
            expected = encoder(**tokenizer(namespace["sentences"], padding=True, return_tensors="pt"))
        got = torch.as_tensor(namespace["embeddings"]).float()
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5), (kind, code)


def test_card_front_matter_is_what_the_hub_reads(tmp_path, tiny_bert):
    from huggingface_hub import ModelCard

    path = model_dir(tmp_path, tiny_bert, "cls-mlp-only-train")
    write_model_card(
        path,
        config=CONFIG,
        scores={"STS-B test Spearman x 100": 81.234, "retrieval/ndcg@10": 65.4321},
        split_note="STS-B test, retrieval on a set built from STS-B dev",
    )
    card = ModelCard.load(path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["tags"] == ["sentence-transformers", "sentence-similarity", "feature-extraction", "simcse"]
    assert data["datasets"] == ["princeton-nlp/datasets-for-simcse"]
    text = card.text
    assert "Unsupervised SimCSE" in text and "| `optim.lr` | `3e-05` |" in text and "| `train.seed` | `1` |" in text
    assert "output_dir" not in text and "engine." not in text  # run-local keys and other sections are left out
    assert "| retrieval/ndcg@10 | 65.4321 |" in text and "Split: STS-B test, retrieval" in text
    assert "@inproceedings{gao2021simcse," in text and "not part of the encoder at test time" in text
    # the title says what the model is; the usage code loads a placeholder id or a folder on disk,
    # and nothing names a path of this machine (a card is published)
    assert "# Unsupervised SimCSE on all-MiniLM-L6-v2\n" in text
    assert f'model_id = "{PLACEHOLDER_ID}"' in text and '# model_id = "/path/to/this/folder"' in text
    assert str(tmp_path) not in text
    # a local base model is not a Hub id: no base_model key, the Hub would reject it
    write_model_card(path, config={**CONFIG, "model": {"name_or_path": str(tmp_path)}}, scores=None)
    assert "base_model" not in ModelCard.load(path / "README.md").data.to_dict()


def test_export_cli_writes_the_card_from_the_run_and_push_fails_offline(tmp_path, tiny_bert, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(model_dir(tmp_path, tiny_bert, "avg"), run / "best")
    config = {**CONFIG, "model": {**CONFIG["model"], "pooler": "avg"}, "data": {"train_file": str(DEMO_DATA / "x.txt")}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "best" / "best_info.json").write_text(json.dumps({"step": 40, "stsb_dev_spearman": 0.8291911967888549}))
    assert export_cli([str(run), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| STS-B dev Spearman x 100 | 82.9191 |" in card and "at step 40" in card
    assert "| `model.pooler` | `avg` |" in card and "datasets:" not in card
    assert f'model_id = "{PLACEHOLDER_ID}"' in card and str(tmp_path) not in card
    assert "Data: `x.txt`" in card and str(DEMO_DATA) not in card
    assert "best_info.json" not in {p.name for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    # offline (the test environment sets HF_HUB_OFFLINE=1; forced here in case it is not)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert export_cli([str(run), str(tmp_path / "pushed"), "--push-to-hub", "someone/simcse-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push-to-hub someone/simcse-test: upload failed") and err.count("\n") == 1, err
    assert f"the exported model is in {tmp_path / 'pushed'}" in err
    assert 'model_id = "someone/simcse-test"' in (tmp_path / "pushed" / "README.md").read_text()
