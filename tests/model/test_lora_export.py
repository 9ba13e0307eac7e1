"""A LoRA run's exports (tiny random Qwen2, last-token pooling, ZeRO 0 and 3 on 2 gloo ranks):
the merged model in a fresh sentence-transformers, and the adapter alone put on the base by peft
(pooling written out here) and by sentence-transformers' load_adapter, give the embeddings the trainer's own engine computed; simcse-eval's
loader takes the adapter export too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, REPO, make_tiny_decoder, run_gloo

from simcse_dist.cli.export import main as export_cli
from simcse_dist.model.load import load_encoder

SENTENCES = ["A man is playing a guitar.", "hello", "The quick brown fox jumps over the lazy dog, again.", "x y"]
LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj]", "model.dropout=0"]
TOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    base = make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")
    out = tmp_path_factory.mktemp("lora-export-runs")
    (out / "sentences.json").write_text(json.dumps(SENTENCES))
    variants = [[f"lora-z{stage}", "last_token", False, stage, LORA] for stage in (0, 3)]
    run_gloo(
        REPO / "tests" / "workers" / "export_worker.py",
        2,
        [
            "--out",
            str(out),
            "--model",
            str(base),
            "--train-file",
            str(DEMO_DATA / "wiki-demo.txt"),
            "--sentences",
            str(out / "sentences.json"),
            "--variants",
            json.dumps(variants),
        ],
        timeout=600,
    )
    return base, out


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]  # right padding


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_lora_exports_match_the_trainer(trained, tmp_path, stage):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    base, runs = trained
    run = runs / f"lora-z{stage}"
    inproc = torch.load(run / "inproc.pt")["emb"].float()
    best = run / "best"
    assert (best / "adapter" / "adapter_config.json").is_file()

    st = SentenceTransformer(str(best), device="cpu")
    assert st.tokenizer.padding_side == "right"
    got = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True, batch_size=4))
    torch.testing.assert_close(got, inproc, atol=TOL, rtol=TOL)

    assert export_cli([str(run), str(tmp_path / "merged")]) == 0
    st = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(SENTENCES)), inproc, atol=TOL, rtol=TOL)

    assert export_cli([str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert not (tmp_path / "adapter" / "model.safetensors").exists(), "the adapter export holds no base weights"
    tok = AutoTokenizer.from_pretrained(tmp_path / "adapter")  # appends the EOS (saved in its pipeline)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(len(SENTENCES)), last] == tok.eos_token_id).all()
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        emb = last_token(peft_model(**batch).last_hidden_state, batch["attention_mask"])
        plain = last_token(AutoModel.from_pretrained(base)(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(emb, inproc, atol=TOL, rtol=TOL)
    assert (plain - inproc).abs().max() > 1e-3, "training left the adapter at zero: the test would prove nothing"

    # sentence-transformers' adapter loading onto the base (the adapter's tokenizer: it appends EOS)
    from sentence_transformers import models

    module = models.Transformer(str(base), tokenizer_name_or_path=str(tmp_path / "adapter"))
    pooling = models.Pooling(module.get_word_embedding_dimension(), pooling_mode="lasttoken")
    st = SentenceTransformer(modules=[module, pooling], device="cpu")
    st.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(torch.as_tensor(st.encode(SENTENCES)), inproc, atol=TOL, rtol=TOL)

    encoder, tokenizer, meta = load_encoder(tmp_path / "adapter")  # what simcse-eval and simcse-mine load
    assert meta["pooler"] == "last_token"
    enc_in = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(encoder(**enc_in), inproc, atol=TOL, rtol=TOL)
