"""Prompts and Matryoshka dims from training to serving: the prepared corpus tokenizes prompt +
text as the tokenizer does; a trained model's export, in a fresh sentence-transformers process,
applies its default prompt, leaves the prompt's tokens out of mean pooling and truncates to 64
dims exactly as simcse-eval does; bad prompt configs fail with the field named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CLI_ENV, DEMO_DATA, REPO, cli, ok

from simcse_dist.cli.eval import main as eval_cli
from simcse_dist.config import BUNDLED_MINILM, resolve_model_path
from simcse_dist.data.collate import CorpusCollator, prompt_length
from simcse_dist.data.prepare import open_or_prepare
from simcse_dist.eval.encode import encode
from simcse_dist.model.encoder import quiet_transformers
from simcse_dist.model.load import load_encoder

PROMPT = "query: "
TEXTS = ["A man is playing a guitar.", "Two dogs run on the beach", "short", "What is the capital of France?"]


def test_prepared_corpus_tokenizes_prompt_and_text_together(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(BUNDLED_MINILM))
    rows = ["a cat\tsits on the mat\tno dog here", "two birds\tfly high in the sky\tfish swim"]
    path = tmp_path / "pairs.tsv"
    path.write_text("sent0\tsent1\thard_neg\n" + "\n".join(rows) + "\n")
    prompts = ("query: ", "passage: ")
    corpus = open_or_prepare(str(path), None, "sup", tok, 16, cache_dir=tmp_path / "c", prompts=prompts)
    plain = open_or_prepare(str(path), None, "sup", tok, 16, cache_dir=tmp_path / "c")
    assert corpus.directory != plain.directory  # the prompt is part of the corpus key
    batch = CorpusCollator(corpus, tok.pad_token_id, "sup")([0, 1])
    for i, row in enumerate(rows):
        for c, text in enumerate(row.split("\t")):
            want = tok(prompts[min(c, 1)] + text, truncation=True, max_length=16)["input_ids"]
            got = batch["input_ids"][i, c][batch["attention_mask"][i, c].bool()].tolist()
            assert got == want, (i, c)
    # the prompt alone is [CLS] query : [SEP]: three tokens before the text, the [SEP] is not the prompt's
    assert prompt_length(tok, "query: ") == 3 and prompt_length(tok, "") == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompted") / "run"
    args = [
        f"model.name_or_path={BUNDLED_MINILM}",
        "model.pooler=avg",
        "model.include_prompt=false",
        f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}",
        f"data.prompt={PROMPT!r}",
        "loss.matryoshka_dims=[384,64]",
        "train.global_batch_size=8",
        "train.max_steps=2",
        f"train.output_dir={out}",
        "log.wandb_mode=disabled",
        "checkpoint.every_steps=0",
    ]
    ok(cli(args))
    return out / "best"


def test_export_in_fresh_sentence_transformers_equals_simcse_eval_at_64_dims_with_prompt(trained, tmp_path):
    st_config = json.loads((trained / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"]["query"] == PROMPT and st_config["default_prompt_name"] == "query"
    assert json.loads((trained / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    assert json.loads((trained / "simcse_config.json").read_text())["matryoshka_dims"] == [384, 64]
    card = (trained / "README.md").read_text()
    assert "truncate_dim=64" in card and "query: " in card and "left out of mean pooling" in card

    # a process that imports sentence-transformers and numpy only: the default prompt applies itself
    script = (
        "import sys, json, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], device='cpu', truncate_dim=64)\n"
        "np.save(sys.argv[2], m.encode(json.loads(sys.argv[3]), convert_to_numpy=True))\n"
    )
    saved = tmp_path / "st.npy"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(trained), str(saved), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.load(saved)
    with quiet_transformers():
        encoder, tokenizer, meta = load_encoder(trained)
    ours = encode(encoder, tokenizer, TEXTS, torch.device("cpu"), prompt=meta["prompts"]["query"])[:, :64]
    assert theirs.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)
    # the prompt's tokens really are out of the mean: pooling them in gives other vectors
    encoder.include_prompt = True
    pooled_in = encode(encoder, tokenizer, TEXTS, torch.device("cpu"), prompt=PROMPT)[:, :64]
    assert (pooled_in - ours).abs().max() > 1e-3

    sts = tmp_path / "sts.tsv"
    sts.write_text((DEMO_DATA / "sts-demo.tsv").read_text())
    out = tmp_path / "scores.json"
    assert (
        eval_cli(["--model", str(trained), "--sts-file", str(sts), "--dims", "384,64", "--output-json", str(out)]) == 0
    )
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from simcse_dist.eval.sts import read_pair_file

    pairs = read_pair_file(sts)
    model = SentenceTransformer(str(trained), device="cpu", truncate_dim=64)
    reference = EmbeddingSimilarityEvaluator(pairs.sentences1, pairs.sentences2, pairs.scores)(model)
    assert json.loads(out.read_text())["dim64/sts.tsv"] == pytest.approx(100 * reference["spearman_cosine"], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['data.prompt={query: "q: ", document: "d: "}'], "data.prompt: unsup trains two dropout views"),
        (["data.prompt={question: 'q: '}", "train.objective=sup"], "data.prompt: unknown key question"),
        (["model.include_prompt=false", "model.pooler=cls"], "model.include_prompt: false needs model.pooler avg"),
        (["data.prompt=query: "], "data.prompt: read as the mapping {query: null}"),  # unquoted YAML
    ],
)
def test_bad_prompt_configs_name_the_field(overrides, message, tmp_path):
    proc = cli(["--config", str(REPO / "configs" / "demo.yaml"), f"train.output_dir={tmp_path / 'r'}", *overrides])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
