"""Decoder backbones (tiny random Qwen2 and Llama configs, a BPE tokenizer trained here): the
last_token and avg poolers against each text encoded alone (no padding at all), under left and
right padding; the EOS the tokenizer is made to append; causal attention as the model defines it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_decoder

from simcse_dist.config import ModelConfig
from simcse_dist.model.encoder import Encoder
from simcse_dist.model.tokenizer import appends_eos, load_tokenizer

TEXTS = ["a short one", "a much longer sentence with many more words in it than the first", "mid length text here"]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def decoder(request, tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), arch=request.param)


def encoder(path, pooler: str) -> tuple[Encoder, object]:
    """In float64: fp32 rounding (~1e-6 on these embeddings of norm ~2) would hide nothing of a
    padding error but would blur the 1e-6 bound."""
    enc = Encoder.from_config(ModelConfig(name_or_path=str(path), pooler=pooler, dropout=0.0)).double().eval()
    return enc, load_tokenizer(str(path), pooler)


def encode(enc: Encoder, tok, texts: list[str], side: str) -> torch.Tensor:
    tok.padding_side = side
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return enc(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("pooler", ["last_token", "avg"])
def test_pooling_independent_of_padding_side(decoder, pooler):
    enc, tok = encoder(decoder, pooler)
    left, right = encode(enc, tok, TEXTS, "left"), encode(enc, tok, TEXTS, "right")
    alone = torch.cat([encode(enc, tok, [t], "right") for t in TEXTS])  # no padding token anywhere
    lengths = tok(TEXTS, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(TEXTS), "the batch must have unequal lengths"
    assert alone.std(0).mean() > 1e-3, "texts embed alike: the comparison would prove nothing"
    torch.testing.assert_close(left, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-6, rtol=0)


def test_last_token_reads_the_appended_eos(decoder):
    tok = load_tokenizer(str(decoder), "last_token")
    assert appends_eos(tok)
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(TEXTS, padding=True, truncation=True, max_length=8)
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            last = max(i for i, m in enumerate(mask) if m)
            assert ids[last] == tok.eos_token_id
            assert sum(mask) <= 8  # truncation keeps room for the EOS
    plain = load_tokenizer(str(decoder), "avg")
    assert not appends_eos(plain), "the EOS is appended for last_token only"


def test_eos_not_doubled_when_the_tokenizer_appends_it(tmp_path):
    path = make_tiny_decoder(tmp_path, arch="qwen2", add_eos=True)
    tok = load_tokenizer(str(path), "last_token")
    ids = tok("a b")["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id


def test_attention_stays_causal(decoder):
    """A prefix's token states do not depend on what follows it (bidirectional attention would)."""
    enc, tok = encoder(decoder, "avg")
    short, longer = tok(["the cat sat"])["input_ids"][0], tok(["the cat sat on the mat"])["input_ids"][0]
    assert longer[: len(short)] == short
    with torch.no_grad():
        h_short = enc.backbone(input_ids=torch.tensor([short])).last_hidden_state[0]
        h_long = enc.backbone(input_ids=torch.tensor([longer])).last_hidden_state[0, : len(short)]
    torch.testing.assert_close(h_short, h_long, atol=1e-6, rtol=0)
    assert enc.decoder
