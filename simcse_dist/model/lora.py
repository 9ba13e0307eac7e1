"""LoRA through peft: the adapters a run trains, the frozen base they are trained on, and the
merged model they make.

- `add_lora` wraps a backbone in a peft model whose only trainable parameters are the adapters
  (peft freezes every base weight), so the engine's optimizer holds only them (engine.param_groups
  takes the parameters that require grad) and a checkpoint holds only them and their optimizer
  state (the engine saves without frozen parameters).
- `base_fingerprint`: the frozen base is not in a checkpoint; it is referenced by its path and
  the sha256 of its files, which a resume compares (train/checkpoint.py refuses another base).
- `peft_from_adapter` rebuilds base + adapter on one process from the base's own files (no ZeRO
  gather of frozen weights): what export.py saves as the adapter and merges into best/.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from simcse_dist.config import ConfigError, LoraSettings, resolve_model_path

ADAPTER_DIR = "adapter"  # best/adapter/: the adapter alone (simcse-export --adapter copies it out)
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's
# files of a model directory that decide what the base computes (weights, config, tokenizer)
_BASE_FILES = ("config.json", "*.safetensors", "*.bin", "*.index.json", "tokenizer*", "vocab*", "merges.txt", "*.model")


def add_lora(backbone: nn.Module, settings: LoraSettings) -> nn.Module:
    """`backbone` as a peft model with LoRA adapters on `settings.target_modules` (peft's default
    targets for the architecture when None); only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else None,
        bias="none",
    )
    try:
        return get_peft_model(backbone, config)
    except ValueError as e:  # no module matches, or peft has no default targets for the architecture
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"model.lora.target_modules: {settings.target_modules or 'peft default'} on "
            f"{type(backbone).__name__}: {first}"
        ) from None


def is_lora(backbone: nn.Module) -> bool:
    return hasattr(backbone, "peft_config") and hasattr(backbone, "merge_and_unload")


def trainable_state(encoder_state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's adapter weights of a full or trainable-only Encoder state ("backbone.*")."""
    names = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    return {k.removeprefix("backbone."): v for k, v in encoder_state.items() if k.removeprefix("backbone.") in names}


def peft_from_adapter(base: nn.Module, peft_config, adapter: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh peft model: `base` (loaded from its own files, model/encoder.load_backbone) with
    `peft_config`'s adapters set to `adapter` (the names of the training backbone's parameters).
    Every adapter weight must be given; nothing else is."""
    from peft import get_peft_model

    model = get_peft_model(base, copy.deepcopy(peft_config))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(adapter) != wanted:
        missing, extra = sorted(wanted - set(adapter))[:3], sorted(set(adapter) - wanted)[:3]
        raise ValueError(f"adapter weights do not match the model: missing {missing}, unexpected {extra}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value.to(params[name].dtype))
    return model.eval()


def merge_adapter(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """`base` with the peft adapter saved in `adapter_dir` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def base_fingerprint(name_or_path: str) -> dict:
    """{"path", "sha256"} of the base model's files (config, weights, tokenizer; a Hub id: its
    local snapshot, which from_pretrained has downloaded by now). Streams every byte once: about
    10-30 s for a 7B model's 15 GB, once per start of a LoRA run (rank 0)."""
    root = Path(resolve_model_path(name_or_path)).expanduser()
    if not root.is_dir():
        from transformers.utils import cached_file

        root = Path(cached_file(name_or_path, "config.json")).parent
    files = sorted({f for pattern in _BASE_FILES for f in root.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return {"path": name_or_path, "sha256": digest.hexdigest()}


def read_adapter_config(model_dir: Path) -> dict | None:
    """peft's adapter_config.json of a directory, or None."""
    f = Path(model_dir) / ADAPTER_CONFIG_NAME
    return json.loads(f.read_text()) if f.is_file() else None
