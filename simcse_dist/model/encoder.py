"""Encoder: a Hugging Face AutoModel + SimCSE's poolers + the MLP head. Never communicates.

Poolers follow the official SimCSE code (princeton-nlp/SimCSE, simcse/models.py):
- cls:               [CLS] of the last layer, then the MLP (Linear + Tanh). With
                     `mlp_only_train` the MLP is used in training only (paper, unsup).
- cls_before_pooler: [CLS] of the last layer, no MLP.
- avg:               mean of the last layer over non-padding tokens.
- avg_first_last:    mean over tokens of (hidden_states[1] + hidden_states[-1]) / 2.
- avg_top2:          mean over tokens of (hidden_states[-2] + hidden_states[-1]) / 2.
- pooler_output:     BERT's pretrained pooler (dense + tanh over [CLS], trained for next-sentence
                     prediction), trained on; the `pooler` of the SimCSE-PyTorch code.
- last_token:        the last layer at each row's last real token, wherever the padding is (left
                     or right): for decoders, whose last token is the only one that attends to the
                     whole text (causal attention, as the model defines it); model/tokenizer.py
                     makes that token an EOS (E5-mistral, gte-Qwen2, Qwen3-Embedding).

Decoder backbones (Qwen2, Llama, Mistral, Gemma, ...) load through AutoModel like encoders; the
forward asks for no KV cache. With model.lora the backbone is a peft model (model/lora.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from simcse_dist.config import POOLERS, ConfigError, ModelConfig, resolve_model_path

log = logging.getLogger(__name__)

_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


class MLPHead(nn.Module):
    """SimCSE's MLPLayer: Linear(d, d) + Tanh over the [CLS] representation."""

    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()
        nn.init.normal_(self.dense.weight, std=init_std)  # BERT-style init, as HF's init_weights
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x))


def pool(
    pooler: str,
    attention_mask: torch.Tensor,
    last_hidden: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """[n, L, d] token states -> [n, d] sentence embeddings (before any MLP)."""
    if pooler in ("cls", "cls_before_pooler"):
        return last_hidden[:, 0]
    if pooler == "last_token":
        return last_hidden[
            torch.arange(last_hidden.shape[0], device=last_hidden.device), last_positions(attention_mask)
        ]
    if pooler == "avg":
        tokens = last_hidden
    elif pooler == "avg_first_last":
        tokens = (hidden_states[1] + hidden_states[-1]) / 2.0
    elif pooler == "avg_top2":
        tokens = (hidden_states[-2] + hidden_states[-1]) / 2.0
    else:
        raise ValueError(f"model.pooler: unknown pooler {pooler!r}; expected one of {', '.join(POOLERS)}")
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [n, L, 1]
    return (tokens * mask).sum(1) / mask.sum(1)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[n, L] mask -> [n] index of each row's last real token, under left or right padding: the
    largest position whose mask is 1 (argmax of mask * position; a row without tokens gives 0)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class Encoder(nn.Module):
    """Sentence encoder. forward(input_ids [..., L], attention_mask [..., L]) -> [..., d], or
    forward(**packed inputs) (data/packing.py, model/packing.py) -> [b, k, d].

    In training mode the cls pooler applies the MLP; in eval mode it does so unless
    `mlp_only_train`. Leading dims are flattened so all views go through one forward pass.
    """

    def __init__(self, backbone: nn.Module, pooler: str, mlp_only_train: bool, include_prompt: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.mlp_only_train = mlp_only_train
        self.include_prompt = include_prompt  # False: a prompt's tokens are left out of the mean
        hidden = backbone.config.hidden_size
        std = getattr(backbone.config, "initializer_range", 0.02)
        self.mlp = MLPHead(hidden, std) if pooler == "cls" else None
        # decoders build a KV cache by default (config.use_cache): nothing here ever reads one
        self._no_cache = bool(getattr(backbone.config, "use_cache", False))
        self.decoder = is_decoder(backbone.config)

    @classmethod
    def from_config(cls, cfg: ModelConfig, prefer_attention: str | None = None) -> Encoder:
        """The encoder `cfg` names. `prefer_attention` (model/packing.py preferred_attention) is
        tried when cfg.attn_implementation is unset; a model that does not take it loads with
        transformers' default and one line saying so."""
        from transformers import AutoConfig

        path = resolve_model_path(cfg.name_or_path)
        hf_config = AutoConfig.from_pretrained(path)
        if cfg.dropout is not None:
            touched = [k for k in _DROPOUT_KEYS if hasattr(hf_config, k)]
            if not touched:
                raise ValueError(f"model.dropout: {type(hf_config).__name__} has none of {_DROPOUT_KEYS}")
            for key in touched:
                setattr(hf_config, key, cfg.dropout)
        attn = cfg.attn_implementation or prefer_attention
        rng = torch.get_rng_state()  # a failed load must not move the seed the MLP head is drawn from
        try:
            backbone = load_backbone(
                path, cfg.pooler, config=hf_config, **({"attn_implementation": attn} if attn else {})
            )
        except (ValueError, ImportError) as exc:
            if cfg.attn_implementation or not attn:
                raise
            log.info(f"attention: {attn} does not load for {path} ({str(exc).splitlines()[0]}); using the default")
            torch.set_rng_state(rng)
            backbone = load_backbone(path, cfg.pooler, config=hf_config)
        else:
            if attn and not cfg.attn_implementation:
                log.info(f"attention: {attn} (packed sentences reach its varlen kernel)")
        if cfg.lora.enabled:
            from simcse_dist.model.lora import add_lora

            backbone = add_lora(backbone, cfg.lora)
        return cls(backbone, cfg.pooler, cfg.mlp_only_train, cfg.include_prompt)

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.hidden_size

    def checkpoint_activations(self) -> None:
        """engine.activation_checkpointing: Hugging Face gradient checkpointing of each layer,
        non-reentrant (torch.utils.checkpoint with use_reentrant=False): it needs no input that
        requires grad (LoRA's frozen embeddings), and it restores the RNG state before the
        recompute, so the recomputed forward draws the dropout masks of the first one."""
        if not getattr(self.backbone, "supports_gradient_checkpointing", True):
            raise ConfigError(f"engine.activation_checkpointing: {type(self.backbone).__name__} does not support it")
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def uses_mlp(self) -> bool:
        return self.mlp is not None and (self.training or not self.mlp_only_train)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        **packed: torch.Tensor,
    ) -> torch.Tensor:
        """Padded [..., L] inputs, or data/packing.py's packed rows (`packed`: position_ids and the
        pack_* layout, no attention_mask) -> [..., d] / [b, k, d]. prompt_lengths [...]: the tokens
        of each text's prompt (data.collate.prompt_length), left out of the mean when the encoder
        does not include prompts (padded inputs only: the trainer does not pack such a model)."""
        if packed:
            if prompt_lengths is not None and not self.include_prompt:
                raise ValueError("packed inputs cannot leave prompt tokens out of pooling; encode padded")
            from simcse_dist.model.packing import packed_embeddings

            emb = packed_embeddings(self.backbone, self.pooler, input_ids, token_type_ids, **packed)
            return self.mlp(emb) if self.uses_mlp else emb
        lead, seq = input_ids.shape[:-1], input_ids.shape[-1]
        flat = {"input_ids": input_ids.reshape(-1, seq), "attention_mask": attention_mask.reshape(-1, seq)}
        if token_type_ids is not None:
            flat["token_type_ids"] = token_type_ids.reshape(-1, seq)
        need_all = self.pooler in ("avg_first_last", "avg_top2")
        if self._no_cache:
            flat["use_cache"] = False
        if self.decoder:
            # Positions count real tokens only, as generation does under left padding: a text's
            # embedding does not depend on the padding side (with the default arange, left padding
            # shifts every rotary position, equal only to rounding).
            mask = flat["attention_mask"].long()
            flat["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(**flat, output_hidden_states=need_all, return_dict=True)
        if self.pooler == "pooler_output":
            emb = out.pooler_output
        else:
            mask = flat["attention_mask"]
            if prompt_lengths is not None and not self.include_prompt:
                # the first prompt_length real tokens, under either padding side (as sentence-transformers)
                mask = mask * (mask.cumsum(-1) > prompt_lengths.reshape(-1, 1)).to(mask.dtype)
            emb = pool(self.pooler, mask, out.last_hidden_state, out.hidden_states)
        if self.uses_mlp:
            emb = self.mlp(emb)
        return emb.reshape(*lead, emb.shape[-1])


def is_decoder(config) -> bool:
    """A causal language model's architecture (Qwen2, Llama, Mistral, Gemma, ...): transformers maps
    it to a causal-LM head and to no masked-LM head (BERT and RoBERTa have both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_backbone(path: str, pooler: str, **kwargs) -> nn.Module:
    """The Hugging Face model under an Encoder: without its pooler layer (BERT's dense + tanh,
    which SimCSE never uses, so no parameter goes unused), except for `pooler_output`, which is it."""
    from transformers import AutoModel

    with quiet_transformers():
        if pooler != "pooler_output":
            try:
                return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
            except TypeError:  # an architecture without that switch (no pooler layer to leave out)
                return AutoModel.from_pretrained(path, **kwargs)
        backbone, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    if getattr(backbone, "pooler", None) is None:
        raise ConfigError(
            f"model.pooler: pooler_output needs a model with a pooler layer (BERT, RoBERTa); "
            f"{type(backbone).__name__} of {path} has none"
        )
    if any(k.startswith("pooler.") for k in info.get("missing_keys", ())):
        log.warning(f"model.pooler: pooler_output: {path} has no pretrained pooler weights; its pooler starts random")
    return backbone


@contextlib.contextmanager
def quiet_transformers():
    """Load models without transformers' per-load weight report and progress bars. SimCSE
    backbones are saved without BERT's pooler layer on purpose (SimCSE never uses it), which
    transformers would list as MISSING/UNEXPECTED on every load and on every rank."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
