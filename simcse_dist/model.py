"""Encoder: a Hugging Face AutoModel + SimCSE's poolers + the MLP head. Never communicates.

Poolers follow the official SimCSE code (princeton-nlp/SimCSE, simcse/models.py):
- cls:               [CLS] of the last layer, then the MLP (Linear + Tanh). With
                     `mlp_only_train` the MLP is used in training only (paper, unsup).
- cls_before_pooler: [CLS] of the last layer, no MLP.
- avg:               mean of the last layer over non-padding tokens.
- avg_first_last:    mean over tokens of (hidden_states[1] + hidden_states[-1]) / 2.
- avg_top2:          mean over tokens of (hidden_states[-2] + hidden_states[-1]) / 2.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, resolve_model_path

SIMCSE_CONFIG_NAME = "simcse_config.json"
MLP_WEIGHTS_NAME = "simcse_mlp.pt"
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


@contextlib.contextmanager
def _quiet_transformers():
    """Loading without the HF pooler prints an 'UNEXPECTED pooler.dense.*' report and a progress
    bar on every rank; both are expected here and only bury the useful output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


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
    if pooler == "avg":
        tokens = last_hidden
    elif pooler == "avg_first_last":
        tokens = (hidden_states[1] + hidden_states[-1]) / 2.0
    elif pooler == "avg_top2":
        tokens = (hidden_states[-2] + hidden_states[-1]) / 2.0
    else:
        raise ValueError(f"model.pooler: unknown pooler {pooler!r}")
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [n, L, 1]
    return (tokens * mask).sum(1) / mask.sum(1)


class Encoder(nn.Module):
    """Sentence encoder. forward(input_ids [..., L], attention_mask [..., L]) -> [..., d].

    In training mode the cls pooler applies the MLP; in eval mode it does so unless
    `mlp_only_train`. Leading dims are flattened so all views go through one forward pass.
    """

    def __init__(self, backbone: nn.Module, pooler: str, mlp_only_train: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.mlp_only_train = mlp_only_train
        hidden = backbone.config.hidden_size
        std = getattr(backbone.config, "initializer_range", 0.02)
        self.mlp = MLPHead(hidden, std) if pooler == "cls" else None

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Encoder:
        from transformers import AutoConfig, AutoModel

        path = resolve_model_path(cfg.name_or_path)
        hf_config = AutoConfig.from_pretrained(path)
        if cfg.dropout is not None:
            touched = [k for k in _DROPOUT_KEYS if hasattr(hf_config, k)]
            if not touched:
                raise ValueError(f"model.dropout: {type(hf_config).__name__} has none of {_DROPOUT_KEYS}")
            for key in touched:
                setattr(hf_config, key, cfg.dropout)
        kwargs = {"config": hf_config}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        with _quiet_transformers():
            try:  # BERT/RoBERTa: SimCSE never uses HF's pooler layer; leaving it out avoids unused params.
                backbone = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
            except TypeError:
                backbone = AutoModel.from_pretrained(path, **kwargs)
        return cls(backbone, cfg.pooler, cfg.mlp_only_train)

    @property
    def uses_mlp(self) -> bool:
        return self.mlp is not None and (self.training or not self.mlp_only_train)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lead, seq = input_ids.shape[:-1], input_ids.shape[-1]
        flat = {"input_ids": input_ids.reshape(-1, seq), "attention_mask": attention_mask.reshape(-1, seq)}
        if token_type_ids is not None:
            flat["token_type_ids"] = token_type_ids.reshape(-1, seq)
        need_all = self.pooler in ("avg_first_last", "avg_top2")
        out = self.backbone(**flat, output_hidden_states=need_all, return_dict=True)
        emb = pool(self.pooler, flat["attention_mask"], out.last_hidden_state, out.hidden_states)
        if self.uses_mlp:
            emb = self.mlp(emb)
        return emb.reshape(*lead, emb.shape[-1])


def save_encoder(
    out_dir: str | Path,
    backbone_state: dict[str, torch.Tensor],
    mlp_state: dict[str, torch.Tensor] | None,
    encoder: Encoder,
    tokenizer,
) -> None:
    """Write a Hugging Face model directory (config, weights, tokenizer) plus SimCSE's pooling
    settings, which is also a sentence-transformers model (see export.py for the layout), so
    `AutoModel.from_pretrained(out_dir)` and `SentenceTransformer(out_dir)` both load it. The MLP
    is kept only where the pooler uses it at test time (cls without mlp_only_train).

    The states are passed in, not read from `encoder`, because under ZeRO-3 the live parameters
    are partitions; the trainer gathers full fp32 weights first. `encoder` supplies the config."""
    from .export import write_sentence_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only what the backbone persists: non-persistent buffers (e.g. BERT's token_type_ids) in a
    # gathered state would be reported as UNEXPECTED keys on every load.
    non_persistent = {f"{name}.{buf}" if name else buf for name, module in encoder.backbone.named_modules()
                      for buf in module._non_persistent_buffers_set}
    backbone_state = {k: v for k, v in backbone_state.items() if k not in non_persistent}
    encoder.backbone.save_pretrained(out, state_dict=backbone_state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    keep_mlp = encoder.pooler == "cls" and not encoder.mlp_only_train
    meta = {"pooler": encoder.pooler, "mlp_only_train": encoder.mlp_only_train, "mlp": keep_mlp}
    (out / SIMCSE_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if keep_mlp:
        if mlp_state is None:
            raise ValueError(f"{out}: pooler cls keeps the MLP at test time, but mlp_state is None")
        mlp_state = {k: v.detach().cpu() for k, v in mlp_state.items()}
        torch.save(mlp_state, out / MLP_WEIGHTS_NAME)
    config = encoder.backbone.config
    write_sentence_transformers(out, encoder.pooler, keep_mlp, config.hidden_size, config.num_hidden_layers,
                                mlp_state if keep_mlp else None)
