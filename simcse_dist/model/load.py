"""Reading a model directory back into an `Encoder`: a run (its best/), a directory this
project wrote (format.py), a sentence-transformers directory whose modules are a SimCSE
pooler, or any Hugging Face encoder with an explicit pooler. What simcse-eval, simcse-mine and
simcse-export load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from simcse_dist.config import POOLERS, canonical_pooler, resolve_model_path
from simcse_dist.model.encoder import Encoder, load_backbone
from simcse_dist.model.format import MLP_WEIGHTS_NAME, SIMCSE_CONFIG_NAME, ExportError, layer_weights


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory means its best/; `bundled:all-MiniLM-L6-v2` the packaged weights."""
    p = Path(resolve_model_path(str(path))).expanduser()
    if (p / "best" / "config.json").is_file():
        return p / "best"
    if not (p / "config.json").is_file():
        raise ExportError(f"{p}: not a model directory (no config.json) nor a run directory (no best/config.json)")
    return p


def _pooler_from_st(model_dir: Path) -> tuple[str, bool] | None:
    """(pooler, has the Dense+Tanh MLP) implied by a sentence-transformers layout (this module's,
    or the legacy one of e.g. all-MiniLM-L6-v2), or None when the modules are not a SimCSE pooler."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    paths = {m["type"].rsplit(".", 1)[-1]: m["path"] for m in json.loads(modules_file.read_text())}
    if "Pooling" not in paths or set(paths) - {"Transformer", "WeightedLayerPooling", "Pooling", "Dense", "Normalize"}:
        return None

    def config(kind: str) -> dict:
        return json.loads((model_dir / paths[kind] / "config.json").read_text())

    pooling = config("Pooling")
    mode = pooling.get("pooling_mode")
    if mode is None:  # the legacy booleans; exactly one of cls / mean tokens must be on
        on = [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value]
        mode = (
            {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}.get(on[0]) if len(on) == 1 else None
        )
    mlp = False
    if "Dense" in paths:
        dense = config("Dense")
        mlp = dense.get("activation_function", "").endswith("Tanh") and dense["in_features"] == dense["out_features"]
        if not (mlp and mode == "cls" and "WeightedLayerPooling" not in paths):
            return None
    if "WeightedLayerPooling" in paths:
        from safetensors.torch import load_file

        wlp = config("WeightedLayerPooling")
        weights = load_file(str(model_dir / paths["WeightedLayerPooling"] / "model.safetensors"))["layer_weights"]
        for pooler in ("avg_first_last", "avg_top2"):
            start, expected = layer_weights(pooler, wlp["num_hidden_layers"])
            if mode == "mean" and wlp["layer_start"] == start and weights.tolist() == expected:
                return pooler, False
        return None
    if mode == "cls":
        return ("cls" if mlp else "cls_before_pooler"), mlp
    return ("avg", False) if mode == "mean" else None


def _serving_from_st(model_dir: Path) -> dict:
    """prompts, default_prompt_name and include_prompt as sentence-transformers would apply them."""
    out: dict = {"prompts": {}, "default_prompt_name": None, "include_prompt": True}
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        config = json.loads(st_config.read_text())
        out["prompts"] = {k: v for k, v in (config.get("prompts") or {}).items() if v}
        out["default_prompt_name"] = config.get("default_prompt_name")
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            pooling = model_dir / module["path"] / "config.json"
            if module["type"].endswith("Pooling") and "Weighted" not in module["type"] and pooling.is_file():
                out["include_prompt"] = json.loads(pooling.read_text()).get("include_prompt", True)
    return out


def read_pooling(model_dir: Path, pooler: str | None = None) -> dict:
    """simcse_config.json's settings; else those implied by an ST layout; `pooler` (a name or an
    alias) overrides the pooler."""
    pooler = canonical_pooler(pooler, "--pooler") if pooler else None
    meta_file = model_dir / SIMCSE_CONFIG_NAME
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
    elif (st := _pooler_from_st(model_dir)) is not None:
        meta = {"pooler": st[0], "mlp_only_train": False, "mlp": st[1]}
    elif pooler is None:
        raise ExportError(
            f"{model_dir}: no {SIMCSE_CONFIG_NAME} and no sentence-transformers pooling to map; "
            f"pass --pooler ({' | '.join(POOLERS)})"
        )
    else:
        meta = {"pooler": pooler, "mlp_only_train": False, "mlp": False}
    if pooler is not None and pooler != meta["pooler"]:
        meta = {**meta, "pooler": pooler, "mlp": meta["mlp"] and pooler == "cls"}
    meta = {**_serving_from_st(model_dir), **meta}
    if meta["pooler"] not in POOLERS:
        raise ExportError(f"{model_dir}: unknown pooler {meta['pooler']!r}; expected one of {', '.join(POOLERS)}")
    if meta["pooler"] == "cls" and not meta["mlp_only_train"] and not meta["mlp"]:
        raise ExportError(
            f"{model_dir}: pooler cls applies the MLP at test time, but the directory has no MLP "
            f"weights ({MLP_WEIGHTS_NAME} or 2_Dense); use cls_before_pooler"
        )
    return meta


def read_mlp(model_dir: Path) -> dict[str, torch.Tensor]:
    if (model_dir / MLP_WEIGHTS_NAME).is_file():
        return torch.load(model_dir / MLP_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    dense = load_file(str(model_dir / "2_Dense" / "model.safetensors"))
    return {"dense.weight": dense["linear.weight"], "dense.bias": dense["linear.bias"]}


def load_encoder(model: str | Path, pooler: str | None = None):
    """(Encoder in eval mode, tokenizer, settings) from a run dir, a model dir written by
    save_encoder/export, a sentence-transformers dir or any HF encoder (then `pooler` is needed)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model)
    meta = read_pooling(model_dir, pooler)
    encoder = Encoder(
        load_backbone(str(model_dir), meta["pooler"]),
        meta["pooler"],
        bool(meta["mlp_only_train"]),
        bool(meta.get("include_prompt", True)),
    )
    if encoder.mlp is not None and meta["mlp"]:
        encoder.mlp.load_state_dict(read_mlp(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    return encoder.eval(), tokenizer, {**meta, "path": str(model_dir)}
