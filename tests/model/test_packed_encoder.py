"""Packed encoding (data/packing.py + model/packing.py) against the padded forward, the
reference: embeddings and one step's gradients to 1e-5 in fp32 for every pooler, BERT and tiny
decoders (Qwen2, Llama), and a block mask that leaks across sentences (or, in a decoder, to later
tokens) is caught."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import make_tiny_bert, make_tiny_decoder

import simcse_dist.model.packing as model_packing
from simcse_dist.config import ModelConfig
from simcse_dist.data.packing import pack, unpack
from simcse_dist.model.encoder import Encoder
from simcse_dist.model.packing import unsupported

POOLERS = ["cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2", "pooler_output"]


def padded_batch(b: int = 6, k: int = 3, seq: int = 12, seed: int = 0, left: bool = False) -> dict:
    """[b, k, L] inputs of random lengths 2..L, token types 0/1 per sentence half, right or left padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq + 1, (b, k), generator=g)
    pos = torch.arange(seq)
    mask = pos < lengths[..., None] if not left else pos >= seq - lengths[..., None]
    ids = torch.randint(1000, 2000, (b, k, seq), generator=g) * mask
    types = ((pos >= seq // 2) & mask).long()
    return {"input_ids": ids, "attention_mask": mask.long(), "token_type_ids": types}


def encoder(tmp_path, pooler: str, attn: str | None = None) -> Encoder:
    model = make_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=str(model), pooler=pooler, dropout=0.0, attn_implementation=attn)
    enc = Encoder.from_config(cfg)
    return enc.train()  # dropout 0: train mode, so the cls pooler's MLP is used


def max_diff(enc: Encoder, batch: dict, capacity: int, packed_attention: str | None = None) -> tuple[float, float]:
    """Largest |packed - padded| of the embeddings, and of the gradients of sum(z * w) relative to
    the largest gradient (summed over many tokens, they reach ~1e0 where fp32 keeps ~7 digits).
    `packed_attention`: the packed forward's attention implementation (the padded one keeps SDPA)."""
    out = []
    for inputs, attn in ((batch, None), (pack(batch, capacity), packed_attention)):
        if packed_attention:
            enc.backbone.set_attn_implementation(attn or "sdpa")
        enc.zero_grad()
        z = enc(**inputs)
        w = torch.linspace(-1, 1, z.numel()).view_as(z)
        (z * w).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in enc.parameters() if p.grad is not None])
        out.append((z.detach(), grads))
    (z0, g0), (z1, g1) = out
    assert z0.shape == z1.shape and g0.shape == g1.shape
    return float((z0 - z1).abs().max()), float((g0 - g1).abs().max() / g0.abs().max())


@pytest.mark.parametrize("pooler", POOLERS)
def test_packed_equals_padded(tmp_path, pooler):
    enc = encoder(tmp_path, pooler)
    assert unsupported(enc.backbone) is None
    for capacity in (12, 40):  # BERT numbers positions from the row's start: right padding is its reference
        batch = padded_batch()
        packed = pack(batch, capacity)
        assert packed["input_ids"].shape[0] < 18  # several sentences share rows
        dz, dg = max_diff(enc, batch, capacity)
        assert dz < 1e-5 and dg < 1e-5, (capacity, dz, dg)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_both_attention_interfaces_take_the_mask(tmp_path, attn):
    enc = encoder(tmp_path, "avg", attn)
    assert enc.backbone.config._attn_implementation == attn
    dz, dg = max_diff(enc, padded_batch(seed=1), 30)
    assert dz < 1e-5 and dg < 1e-5


def test_a_leaking_mask_is_caught(tmp_path, monkeypatch):
    """The same comparison with the block mask replaced by one that lets every token of a row
    see every other (the mask of plain concatenation) fails by far."""
    enc = encoder(tmp_path, "avg")
    batch = padded_batch()
    monkeypatch.setattr(
        model_packing, "block_mask", lambda seg, dtype, causal=False: torch.zeros(seg.shape[0], 1, 1, seg.shape[1])
    )
    dz, _ = max_diff(enc, batch, 40)
    assert dz > 1e-2


@pytest.mark.parametrize("left", [False, True])
def test_pack_layout(left):
    batch = padded_batch(b=5, k=2, seq=10, seed=3, left=left)
    packed = pack(batch, 16)
    lengths = batch["attention_mask"].sum(-1)
    assert torch.equal(packed["pack_lengths"], lengths)
    assert packed["input_ids"].shape[1] <= 16
    real = packed["pack_segments"] < lengths.numel()
    assert int(real.sum()) == int(lengths.sum())  # every token once, padding apart
    # positions restart at every sentence, from the offset
    first = packed["position_ids"].reshape(-1)[packed["pack_starts"].reshape(-1)]
    assert torch.equal(first, torch.zeros_like(first))
    back = unpack(packed)
    assert torch.equal(back["attention_mask"].sum(-1), lengths)
    for key in ("input_ids", "token_type_ids"):
        real = batch[key][batch["attention_mask"].bool()]  # row-major: sentence by sentence
        assert torch.equal(back[key][back["attention_mask"].bool()], real)


def test_unpackable_models_are_named():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    tiny = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    bert = BertModel(BertConfig(**tiny))
    assert unsupported(bert) is None
    cases = {
        "gpt2": GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)),
        "decoder": BertModel(BertConfig(**tiny, is_decoder=True)),
        "relative_key": BertModel(BertConfig(**tiny, position_embedding_type="relative_key")),
    }
    for word, model in cases.items():
        reason = unsupported(model)
        assert reason is not None and word in reason, (word, reason)
    bert.config._attn_implementation = "flash_attention_2"  # as from_pretrained(attn_implementation=...) sets it
    assert unsupported(bert) is None  # its varlen path
    bert.config._attn_implementation = "flex_attention"
    assert "flex_attention" in unsupported(bert)
    assert "pooler" in unsupported(BertModel(BertConfig(**tiny)), "first_last_avg_typo")


def test_roberta_positions_start_after_its_padding_index():
    """RoBERTa numbers positions from padding_idx + 1: packed equals padded there too."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    enc = Encoder(RobertaModel(config, add_pooling_layer=False), "avg", False).train()
    assert unsupported(enc.backbone) is None
    batch = padded_batch(seed=2)
    batch["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], config.pad_token_id)
    del batch["token_type_ids"]  # RoBERTa has one token type
    dz, dg = max_diff(enc, batch, 30)
    assert dz < 1e-5 and dg < 1e-5


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def decoder(request, tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp(f"packed-{request.param}"), arch=request.param)


def decoder_batch(left: bool, seed: int = 4) -> dict:
    batch = padded_batch(b=5, k=2, seq=12, seed=seed, left=left)
    batch["input_ids"] = batch["input_ids"] % 400 + 50 * batch["attention_mask"]  # inside the 512-token vocabulary
    del batch["token_type_ids"]
    return batch


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pooler", ["last_token", "avg"])
def test_packed_decoder_equals_padded_under_either_padding_side(decoder, pooler, attn):
    """Rotary positions restart per sentence and the block mask is causal: the packed embeddings
    and gradients equal the padded forward's, whose positions count real tokens from 0."""
    torch.manual_seed(0)
    enc = Encoder.from_config(
        ModelConfig(name_or_path=str(decoder), pooler=pooler, dropout=0.0, attn_implementation=attn)
    )
    enc.train()
    assert unsupported(enc.backbone, pooler) is None
    for left in (False, True):
        dz, dg = max_diff(enc, decoder_batch(left), 30)
        assert dz < 1e-5 and dg < 1e-5, (left, dz, dg)


def test_a_decoder_mask_that_sees_later_tokens_is_caught(decoder, monkeypatch):
    """Packed with a block mask that is not causal, the decoder's embeddings differ by far: the
    comparison does see causality."""
    torch.manual_seed(0)
    enc = Encoder.from_config(ModelConfig(name_or_path=str(decoder), pooler="avg", dropout=0.0)).train()
    real = model_packing.block_mask
    monkeypatch.setattr(model_packing, "block_mask", lambda seg, dtype, causal=False: real(seg, dtype, False))
    dz, _ = max_diff(enc, decoder_batch(False), 30)
    assert dz > 1e-2


def test_a_causal_first_token_is_not_pooled_packed(decoder):
    from transformers import AutoModel

    reason = unsupported(AutoModel.from_pretrained(decoder), "cls")
    assert reason is not None and "last_token" in reason


# Flash-attention's varlen path, on CPU: a reference attention registered with transformers reads
# the cumulative lengths the way the flash kernel does (one flattened row, each sentence attending
# within its span, causal where the module is), so everything up to the kernel is held here; the
# kernel itself runs in bench/gpu_suite.sh.
def varlen_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    assert attention_mask is None and query.shape[0] == 1, "varlen inputs are one row without a mask"
    cu = kw["cu_seq_lens_q"].tolist()
    assert torch.equal(kw["cu_seq_lens_k"], kw["cu_seq_lens_q"]) and cu[-1] == query.shape[2]
    spans = [slice(a, b) for a, b in zip(cu[:-1], cu[1:], strict=True)]
    assert kw["max_length_q"] == max(s.stop - s.start for s in spans)
    causal = module.is_causal if is_causal is None else is_causal
    spans = [slice(0, cu[-1])] if VARLEN_LEAK else spans
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s], key[:, :, s], value[:, :, s], scale=scaling, is_causal=bool(causal), enable_gqa=True
        )
        for s in spans
    ]
    return torch.cat(out, 2).transpose(1, 2).contiguous(), None


VARLEN_LEAK = False


@pytest.fixture
def varlen(monkeypatch):
    """Models set to the reference attention take the varlen path (as a flash one does)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("varlen_reference", varlen_reference)
    AttentionMaskInterface.register("varlen_reference", flash_attention_mask)
    monkeypatch.setattr(
        model_packing, "varlen_attention", lambda m: m.config._attn_implementation == "varlen_reference"
    )
    return "varlen_reference"


@pytest.mark.parametrize("pooler", POOLERS)
def test_varlen_packing_equals_padded(tmp_path, varlen, pooler):
    enc = encoder(tmp_path, pooler)
    enc.backbone.set_attn_implementation(varlen)
    assert unsupported(enc.backbone, pooler) is None
    dz, dg = max_diff(enc, padded_batch(seed=5), 40, varlen)
    assert dz < 1e-5 and dg < 1e-5, (dz, dg)


@pytest.mark.parametrize("pooler", ["last_token", "avg"])
def test_varlen_packed_decoder_equals_padded(decoder, varlen, pooler):
    torch.manual_seed(0)
    enc = Encoder.from_config(ModelConfig(name_or_path=str(decoder), pooler=pooler, dropout=0.0)).train()
    for left in (False, True):
        dz, dg = max_diff(enc, decoder_batch(left), 30, varlen)
        assert dz < 1e-5 and dg < 1e-5, (left, dz, dg)


def test_varlen_lengths_that_leak_are_caught(tmp_path, varlen, monkeypatch):
    """The reference attending over the whole flattened row instead of each span fails by far:
    the comparison above does depend on the cumulative lengths."""
    enc = encoder(tmp_path, "avg")
    monkeypatch.setattr(sys.modules[__name__], "VARLEN_LEAK", True)
    dz, _ = max_diff(enc, padded_batch(seed=5), 40, varlen)
    assert dz > 1e-2


def test_flash_attention_is_preferred_for_packed_half_precision_runs(monkeypatch):
    import transformers.utils

    from simcse_dist.model.packing import preferred_attention

    for installed in (True, False):
        monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda installed=installed: installed)
        assert preferred_attention(None, True, "bf16") == ("flash_attention_2" if installed else None)
        assert preferred_attention(None, True, "fp16") == ("flash_attention_2" if installed else None)
        assert preferred_attention(None, True, "fp32") is None  # flash kernels take half precision only
        assert preferred_attention(None, False, "bf16") is None  # padded runs keep transformers' default
        assert preferred_attention("eager", True, "bf16") == "eager"  # what the config names wins


def test_a_preferred_attention_that_does_not_load_falls_back(tmp_path, caplog):
    """No flash-attn here: the preferred implementation fails to load, the default loads, one line
    says so, and the MLP head is drawn from the same seed as without the preference."""
    model = make_tiny_bert(tmp_path / "bert")
    cfg = ModelConfig(name_or_path=str(model), pooler="cls")
    torch.manual_seed(0)
    plain = Encoder.from_config(cfg)
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="simcse_dist"):
        tried = Encoder.from_config(cfg, prefer_attention="flash_attention_2")
    assert tried.backbone.config._attn_implementation == plain.backbone.config._attn_implementation
    assert torch.equal(tried.mlp.dense.weight, plain.mlp.dense.weight)
    assert [r.message for r in caplog.records if "flash_attention_2 does not load" in r.message]
    with pytest.raises((ValueError, ImportError)):  # named in the config: no silent fallback
        Encoder.from_config(ModelConfig(name_or_path=str(model), attn_implementation="flash_attention_2"))
