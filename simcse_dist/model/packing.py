"""Packed forward: data/packing.py's rows of several sentences through a Hugging Face encoder or
decoder, each sentence attending only to itself, then pooled per sentence into [b, k, d].

How it reaches the model, through transformers' public inputs: `position_ids` (restarting at
every sentence) and a ready 4-D additive mask [R, 1, W, W] as `attention_mask`, which
transformers 5's `masking_utils` (`create_bidirectional_mask` for encoders, `create_causal_mask`
for decoders) returns as it is, and both the eager and the SDPA attention add to the scores
(tests/model/test_packed_encoder.py pins this: packed equals padded, and a mask that leaks is
caught). Encoders get a block-diagonal mask, decoders a block-diagonal causal one; rotary
positions read the restarting `position_ids`, as the padded decoder forward numbers real tokens
from 0. Which models: encoders with absolute position embeddings indexed by `position_ids` (BERT;
RoBERTa and XLM-R with their padding_idx + 1 offset) and the rotary decoders Qwen2, Qwen3,
Llama and Mistral. Everything else runs padded with one line saying why (`unsupported`):
relative positions, Gemma's sliding windows and soft-capping, other decoders.

Flash-attention (any `_attn_implementation` with "flash" in its name, transformers' own rule)
takes no 4-D mask: the real tokens of all rows go as one row [1, T] with the sentences'
cumulative lengths (`cu_seq_lens_q/k`, `max_length_q/k`, transformers' FlashAttentionKwargs),
which its varlen kernel reads, so neither the rows' padding nor a W x W mask is computed. The
trainer picks it for a packing run when flash-attn is installed (`preferred_attention`).
"""

from __future__ import annotations

import torch

# model_type -> how position ids start: 0, or "pad" (padding_idx + 1, as RoBERTa numbers them)
_POSITIONS = {"bert": 0, "roberta": "pad", "xlm-roberta": "pad", "camembert": "pad"}
# causal decoders whose positions are rotary, read from position_ids, and whose layers take a 4-D mask
_DECODERS = ("qwen2", "qwen3", "llama", "mistral")


POOLERS = ("cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2", "pooler_output", "last_token")


def unsupported(backbone: torch.nn.Module, pooler: str = "cls") -> str | None:
    """Why `backbone` with `pooler` cannot be packed, or None when it can."""
    if pooler not in POOLERS:
        return f"the {pooler} pooler is not packed (packing pools {', '.join(POOLERS)})"
    cfg = backbone.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in _POSITIONS and kind not in _DECODERS:
        return f"{kind} models are not packed (packing covers {', '.join(sorted([*_POSITIONS, *_DECODERS]))})"
    if kind in _DECODERS and pooler in ("cls", "cls_before_pooler", "pooler_output"):
        return f"{kind} is causal: its first token sees nothing else; pool with last_token or avg"
    if kind not in _DECODERS and getattr(cfg, "is_decoder", False):
        return f"{kind} is configured as a decoder (causal attention); packing needs bidirectional attention"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"{kind} has {cfg.position_embedding_type} position embeddings; packing needs absolute ones"
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa") and not varlen_attention(backbone):
        return f"attention {impl} takes neither a 4-D mask nor varlen lengths; packing runs with eager, sdpa or flash"
    return None


def varlen_attention(backbone: torch.nn.Module) -> bool:
    """Whether the model's attention is a flash-attention flavour, which reads packed sentences
    as cumulative lengths (transformers' is_flash_attention_requested tests the same substring)."""
    return "flash" in (getattr(backbone.config, "_attn_implementation", None) or "")


def preferred_attention(requested: str | None, packing: bool, precision: str) -> str | None:
    """The attention a run asks transformers for: `model.attn_implementation` when set; else
    flash_attention_2 for a packed run in bf16 or fp16 when flash-attn works here (installed, a
    CUDA device: transformers' is_flash_attn_2_available), since its varlen kernel skips the
    padding and the mask; else None (transformers' default, SDPA). Flash kernels take half
    precision only, so an fp32 run keeps SDPA."""
    if requested or not packing or precision not in ("bf16", "fp16"):
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else None


def position_offset(backbone: torch.nn.Module) -> int:
    """The position id of a sentence's first token: 0, or padding_idx + 1 for RoBERTa's kind."""
    start = _POSITIONS.get(getattr(backbone.config, "model_type", ""), 0)
    return backbone.config.pad_token_id + 1 if start == "pad" else 0


def is_causal(backbone: torch.nn.Module) -> bool:
    return getattr(backbone.config, "model_type", "") in _DECODERS


def block_mask(segments: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """[R, W] segment ids -> [R, 1, W, W] additive mask: 0 within a segment (and, `causal`, only
    for keys at or before the query), the dtype's minimum elsewhere (every query sees at least
    itself, so no row of the softmax is empty)."""
    same = segments[:, :, None] == segments[:, None, :]
    if causal:
        width = segments.shape[1]
        same &= torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~same, torch.finfo(dtype).min).unsqueeze(1)


def packed_embeddings(
    backbone: torch.nn.Module,
    pooler: str,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    pack_segments: torch.Tensor,
    pack_starts: torch.Tensor,
    pack_lengths: torch.Tensor,
) -> torch.Tensor:
    """Packed rows [R, W] -> [b, k, d] sentence embeddings before any MLP head, equal to the
    padded forward's (encoder.pool) for every pooler of POOLERS."""
    offset = position_offset(backbone)
    positions = position_ids + offset if offset else position_ids
    causal = is_causal(backbone)
    kwargs = {"input_ids": input_ids, "position_ids": positions}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    starts, segments = pack_starts.reshape(-1), pack_segments.reshape(-1)
    if varlen_attention(backbone):
        # one row of the real tokens (row padding is segment >= n); sentences stay contiguous, so
        # their first tokens in order, then the total, are the cumulative lengths
        keep = segments < starts.numel()
        kwargs = {key: value.reshape(-1)[keep][None] for key, value in kwargs.items()}
        starts, segments = (keep.cumsum(0) - 1)[starts], segments[keep]
        cu = torch.cat([starts.sort().values, starts.new_tensor([segments.numel()])]).to(torch.int32)
        longest = int(pack_lengths.max())
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        dtype = backbone.get_input_embeddings().weight.dtype
        kwargs["attention_mask"] = block_mask(pack_segments, dtype, causal)
    if causal:
        kwargs["use_cache"] = False
    need_all = pooler in ("avg_first_last", "avg_top2")
    out = backbone(**kwargs, output_hidden_states=need_all, return_dict=True)
    lead = pack_lengths.shape
    if pooler == "last_token":  # a sentence's last token (the EOS the tokenizer appended)
        d = out.last_hidden_state.shape[-1]
        last = starts + pack_lengths.reshape(-1) - 1
        return out.last_hidden_state.reshape(-1, d)[last].reshape(*lead, d)
    if pooler in ("cls", "cls_before_pooler", "pooler_output"):
        d = out.last_hidden_state.shape[-1]
        first = out.last_hidden_state.reshape(-1, d)[starts]  # [n, d]
        emb = backbone.pooler(first[:, None]) if pooler == "pooler_output" else first
        return emb.reshape(*lead, d)
    if pooler == "avg":
        tokens = out.last_hidden_state
    elif pooler == "avg_first_last":
        tokens = (out.hidden_states[1] + out.hidden_states[-1]) / 2.0
    elif pooler == "avg_top2":
        tokens = (out.hidden_states[-2] + out.hidden_states[-1]) / 2.0
    else:
        raise ValueError(f"model.pooler: {pooler!r} cannot be packed")
    n, d = starts.numel(), tokens.shape[-1]
    segment = segments.clamp(max=n)  # padding tokens -> a dropped bucket n
    sums = tokens.new_zeros(n + 1, d).index_add_(0, segment, tokens.reshape(-1, d))[:n]
    return (sums / pack_lengths.reshape(-1, 1).to(sums.dtype)).reshape(*lead, d)
