"""Export round trip: a trained run's best/ and `simcse-export` output load with
SentenceTransformer and with AutoModel + the documented pooling, and give the embeddings the
training process itself computed (ZeRO 0 and 3, every pooler); the ST files are what
sentence-transformers writes itself; sharded encoding over 2 gloo ranks matches one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_reference import documented_embeddings
from helpers import DEMO_DATA, REPO, run_gloo
from safetensors.torch import load_file

from simcse_dist.cli.export import main as export_cli
from simcse_dist.model.load import load_encoder

SENTENCES = [
    "A man is playing a guitar.",
    "hello",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "一个女人在切洋葱。",
    "x y",
    "Two dogs play in the snow near a red barn.",
    "what?",
    "She sells sea shells by the sea shore.",
]
# (name, pooler, mlp_only_train)
KINDS = [
    ("cls", "cls", False),
    ("cls-mlp-only-train", "cls", True),
    ("cls_before_pooler", "cls_before_pooler", False),
    ("avg", "avg", False),
    ("avg_first_last", "avg_first_last", False),
    ("avg_top2", "avg_top2", False),
]
VARIANTS = [(f"{name}-z{stage}", pooler, mot, stage) for stage in (0, 3) for name, pooler, mot in KINDS]
TOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> Path:
    """One torchrun job (2 gloo ranks) training every variant for 2 steps at lr 1e-3."""
    out = tmp_path_factory.mktemp("export-runs")
    (out / "sentences.json").write_text(json.dumps(SENTENCES))
    run_gloo(
        REPO / "tests" / "workers" / "export_worker.py",
        2,
        [
            "--out",
            str(out),
            "--model",
            str(tiny_bert),
            "--train-file",
            str(DEMO_DATA / "wiki-demo.txt"),
            "--sentences",
            str(out / "sentences.json"),
            "--variants",
            json.dumps([list(v) for v in VARIANTS]),
        ],
        timeout=300,
    )
    return out


@torch.no_grad()
def _encoder_embeddings(model_dir: Path) -> torch.Tensor:
    encoder, tokenizer, _ = load_encoder(model_dir)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return encoder(**batch)


@pytest.mark.slow
@pytest.mark.parametrize("name,pooler,mlp_only_train,stage", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_export_round_trip(trained, tmp_path, tiny_bert, name, pooler, mlp_only_train, stage):
    from sentence_transformers import SentenceTransformer

    run = trained / name
    in_process = torch.load(run / "inproc.pt", weights_only=True)["emb"]
    assert export_cli([str(run), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"

    exported_st = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True, batch_size=3)
    best_st = SentenceTransformer(str(run / "best"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    documented = documented_embeddings(out, SENTENCES)
    fresh_encoder = _encoder_embeddings(run / "best")
    for label, emb in [
        ("ST(export)", exported_st),
        ("ST(best/)", best_st),
        ("AutoModel+pooling", documented),
        ("fresh Encoder(best/)", fresh_encoder),
    ]:
        diff = (emb.float() - in_process).abs().max().item()
        assert diff <= TOL, f"{label} vs in-process encoder after training: max |diff| {diff:.2e}"

    # the export holds the trained weights, not the initial ones
    untrained = _encoder_embeddings_untrained(tiny_bert, pooler)
    if pooler != "cls" or mlp_only_train:
        assert (untrained - in_process).abs().max().item() > 1e-3

    settings = json.loads((out / "simcse_config.json").read_text())
    keeps_mlp = pooler == "cls" and not mlp_only_train
    assert settings == {"pooler": pooler, "mlp_only_train": mlp_only_train, "mlp": keeps_mlp}
    assert (out / "simcse_mlp.pt").is_file() == keeps_mlp
    assert (out / "2_Dense").is_dir() == keeps_mlp
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    expected = {
        "avg_first_last": ["Transformer", "WeightedLayerPooling", "Pooling"],
        "avg_top2": ["Transformer", "WeightedLayerPooling", "Pooling"],
    }.get(pooler, ["Transformer", "Pooling", "Dense"] if keeps_mlp else ["Transformer", "Pooling"])
    assert modules == expected


@torch.no_grad()
def _encoder_embeddings_untrained(model_dir: Path, pooler: str) -> torch.Tensor:
    return documented_embeddings(model_dir, SENTENCES, pooler="cls_before_pooler" if pooler == "cls" else pooler)


@pytest.mark.slow
def test_sharded_encoding_matches_one_process(trained, tiny_bert):
    """evaluation.encode over 2 ranks (equal shares, gathered) == one sentence at a time here."""
    sharded = torch.load(trained / "sharded.pt", weights_only=True)
    assert sharded["world"] == 2
    reference = documented_embeddings(tiny_bert, SENTENCES, pooler="avg")
    assert (sharded["emb"] - reference).abs().max().item() <= TOL
    assert (sharded["left"] - reference[:4]).abs().max().item() <= TOL
    assert (sharded["right"] - reference[4:8]).abs().max().item() <= TOL


# -- the sentence-transformers files are those ST 6 writes itself ------------------------------


def _st_reference_save(model_dir: Path, out: Path, pooler: str, keeps_mlp: bool) -> None:
    """What SentenceTransformer.save() writes for the equivalent built-in modules."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling, WeightedLayerPooling
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    wlp = pooler in ("avg_first_last", "avg_top2")
    modules = [Transformer(str(model_dir), config_kwargs={"output_hidden_states": True} if wlp else None)]
    if pooler == "avg_first_last":  # (h_1 + h_L) / 2
        weights = torch.tensor([1.0] + [0.0] * (layers - 2) + [1.0])
        modules.append(
            WeightedLayerPooling(d, num_hidden_layers=layers, layer_start=1, layer_weights=torch.nn.Parameter(weights))
        )
    if pooler == "avg_top2":  # (h_{L-1} + h_L) / 2
        modules.append(WeightedLayerPooling(d, num_hidden_layers=layers, layer_start=layers - 1))
    modules.append(Pooling(d, "cls" if pooler.startswith("cls") else "mean"))
    if keeps_mlp:
        mlp = torch.load(model_dir / "simcse_mlp.pt", weights_only=True)
        modules.append(Dense(d, d, init_weight=mlp["dense.weight"], init_bias=mlp["dense.bias"]))
    SentenceTransformer(modules=modules, device="cpu").save(str(out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["cls-z0", "cls-mlp-only-train-z0", "cls_before_pooler-z0", "avg-z0", "avg_first_last-z0", "avg_top2-z0"]
)
def test_st_files_match_what_sentence_transformers_writes(trained, tmp_path, name):
    best = trained / name / "best"
    settings = json.loads((best / "simcse_config.json").read_text())
    _st_reference_save(best, tmp_path / "ref", settings["pooler"], settings["mlp"])
    ref = tmp_path / "ref"
    for f in ["modules.json", "sentence_bert_config.json"]:
        assert json.loads((best / f).read_text()) == json.loads((ref / f).read_text()), f
    ours, theirs = (json.loads((p / "config_sentence_transformers.json").read_text()) for p in (best, ref))
    assert {k: v for k, v in ours.items() if k != "__version__"} == {
        k: v for k, v in theirs.items() if k != "__version__"
    }
    ours, theirs = (json.loads((p / "config.json").read_text()) for p in (best, ref))
    assert ours.get("output_hidden_states", False) == theirs.get("output_hidden_states", False)
    for module in json.loads((ref / "modules.json").read_text())[1:]:
        sub = module["path"]
        assert json.loads((best / sub / "config.json").read_text()) == json.loads(
            (ref / sub / "config.json").read_text()
        )
        if (ref / sub / "model.safetensors").exists():
            a, b = load_file(best / sub / "model.safetensors"), load_file(ref / sub / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


# -- errors and other sources ------------------------------------------------------------------


def test_export_plain_hf_model_needs_a_pooler(tiny_bert, tmp_path, capsys):
    assert export_cli([str(tiny_bert), str(tmp_path / "a")]) == 2
    assert "pass --pooler" in capsys.readouterr().err
    assert export_cli([str(tiny_bert), str(tmp_path / "a"), "--pooler", "cls"]) == 2
    assert "no MLP weights" in capsys.readouterr().err
    assert export_cli([str(tmp_path / "nowhere"), str(tmp_path / "b")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_export_plain_hf_model_with_pooler(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "out"
    assert export_cli([str(tiny_bert), str(out), "--pooler", "avg_first_last"]) == 0
    assert export_cli([str(tiny_bert), str(out), "--pooler", "avg"]) == 2  # not empty
    st = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    reference = documented_embeddings(tiny_bert, SENTENCES, pooler="avg_first_last")
    assert (st - reference).abs().max().item() <= TOL
    assert export_cli([str(out), str(out), "--pooler", "avg", "--overwrite"]) == 2  # out is the source


def test_bundled_minilm_pooling_is_read_from_its_st_files():
    from simcse_dist.model.load import read_pooling, resolve_model_dir

    model_dir = resolve_model_dir("bundled:all-MiniLM-L6-v2")
    assert read_pooling(model_dir)["pooler"] == "avg"  # legacy 1_Pooling: pooling_mode_mean_tokens
