"""The tokenizer of a model: what training, preparation, evaluation and the export all tokenize with.

For `last_token` pooling every text must end with the token the embedding is read at: EOS, as
E5-mistral, gte-Qwen2 and Qwen3-Embedding train and encode. Many decoder tokenizers add no EOS
(Qwen2's and Llama's add none; Llama's prepends BOS), so `load_tokenizer` appends one in the
tokenizer itself: its post-processor (the Rust pipeline's last stage) gets EOS at the end of its
template. Being part of the tokenizer, the EOS is then the same everywhere without any other code
knowing: on-the-fly tokenization, the prepared corpora (data/prepare.py tokenizes with the
serialized pipeline, and its cache key hashes that pipeline, so a corpus prepared without the EOS
is not reused), `best/` and the exports (saved with the tokenizer: sentence-transformers and
plain transformers append it too), and truncation keeps room for it (the tokenizers library
reserves the template's special tokens within `max_length`). A tokenizer without a pad token
(Llama's) pads with EOS; the attention mask tells them apart. Prompts are text, not tokenizer
state (data.prompt: prepended before tokenizing, as sentence-transformers does).
"""

from __future__ import annotations

import json

from simcse_dist.config import ConfigError

_PROBE = "a b"


def load_tokenizer(path: str, pooler: str):
    """AutoTokenizer (fast) of `path`, made to end every text with EOS and pad on the right for
    `last_token` pooling, and to pad (with EOS when it has no pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    if pooler == "last_token":
        append_eos(tokenizer, path)
        # what the exports declare: sentence-transformers' lasttoken pooling and the model card's
        # code read the last real token; the Encoder itself finds it under either side
        tokenizer.padding_side = "right"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends a text with its EOS token."""
    ids = tokenizer(_PROBE)["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def append_eos(tokenizer, where: str = "the tokenizer") -> None:
    """Make `tokenizer` (fast) end every sequence with EOS, unless it already does (idempotent)."""
    if appends_eos(tokenizer):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if tokenizer.eos_token is None or backend is None:
        raise ConfigError(
            f"model.pooler: last_token reads the embedding at an EOS token, but {where} has "
            + ("no EOS token" if backend is not None else "no fast (Rust) tokenizer to append one with")
        )
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["post_processor"] = _with_eos(spec.get("post_processor"), tokenizer.eos_token, tokenizer.eos_token_id)
    backend.post_processor = Tokenizer.from_str(json.dumps(spec)).post_processor
    if not appends_eos(tokenizer):  # pragma: no cover - a post-processor this code does not know
        raise ConfigError(f"model.pooler: last_token: could not make {where} append its EOS token")


def _with_eos(processor: dict | None, eos: str, eos_id: int) -> dict:
    """The post-processor (its JSON) with EOS appended to its template."""
    processor, template = _template(processor)
    template["single"].append({"SpecialToken": {"id": eos, "type_id": 0}})
    template["pair"].append({"SpecialToken": {"id": eos, "type_id": 1}})
    template["special_tokens"][eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    return processor


def _template(processor: dict | None) -> tuple[dict, dict]:
    """(post-processor JSON, its template): the last TemplateProcessing in it (Llama's `<s> $A`,
    BERT's `[CLS] $A [SEP]`), or a new one after it (ByteLevel, none)."""
    template = _last_template(processor)
    if template is None:
        template = {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        }
        if processor is None:
            processor = template
        elif processor.get("type") == "Sequence":
            processor["processors"].append(template)
        else:
            processor = {"type": "Sequence", "processors": [processor, template]}
    return processor, template


def _last_template(processor: dict | None) -> dict | None:
    if not isinstance(processor, dict):
        return None
    if processor.get("type") == "TemplateProcessing":
        return processor
    if processor.get("type") == "Sequence":
        found = [t for p in processor.get("processors", []) if (t := _last_template(p)) is not None]
        return found[-1] if found else None
    return None
