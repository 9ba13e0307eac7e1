"""Writing the saved-model format (format.py): best/ during training, and `export_model` (any
model directory, a run's best/, a plain HF or ST model) for simcse-export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from simcse_dist.config import POOLERS
from simcse_dist.fsutil import atomic_dir
from simcse_dist.model.card import best_info_scores, write_model_card
from simcse_dist.model.encoder import Encoder, quiet_transformers
from simcse_dist.model.format import (
    MLP_WEIGHTS_NAME,
    SIMCSE_CONFIG_NAME,
    ST_DENSE,
    ST_DIRS,
    ST_FORMAT_VERSION,
    ST_POOLING,
    ST_TRANSFORMER,
    ST_WLP,
    ExportError,
    layer_weights,
)
from simcse_dist.model.load import read_mlp, read_pooling, resolve_model_dir


def _write_json(path: Path, obj: dict | list, indent: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + "\n")


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))


def write_sentence_transformers(
    out_dir: str | Path,
    pooler: str,
    hidden_size: int,
    num_layers: int,
    head: dict[str, torch.Tensor] | None = None,
    serving: dict | None = None,
) -> None:
    """Add the sentence-transformers files to a Hugging Face model directory (idempotent:
    stale module folders of another pooler are removed first). `head`: the Linear + Tanh after
    the [CLS] vector ({"dense.weight", "dense.bias"}): SimCSE's MLP kept at test time, or BERT's
    pooler layer for pooler_output. `serving` (Config.serving): the prompts, the default prompt
    and whether prompts count in pooling."""
    serving = serving or {}
    out = Path(out_dir)
    if pooler not in POOLERS:
        raise ExportError(f"unknown pooler {pooler!r}; expected one of {', '.join(POOLERS)}")
    if pooler == "pooler_output" and head is None:
        raise ExportError(f"{out}: pooler_output needs the weights of the model's pooler layer")
    for name in ST_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    modules = [("", ST_TRANSFORMER)]
    pooling_dir = "1_Pooling"
    if pooler in ("avg_first_last", "avg_top2"):
        start, weights = layer_weights(pooler, num_layers)
        modules.append(("1_WeightedLayerPooling", ST_WLP))
        _write_json(
            out / "1_WeightedLayerPooling" / "config.json",
            {"embedding_dimension": hidden_size, "layer_start": start, "num_hidden_layers": num_layers},
        )
        _save_safetensors(
            out / "1_WeightedLayerPooling" / "model.safetensors", {"layer_weights": torch.tensor(weights)}
        )
        pooling_dir = "2_Pooling"
        config = json.loads((out / "config.json").read_text())
        config["output_hidden_states"] = True
        _write_json(out / "config.json", config, indent=2)
    modules.append((pooling_dir, ST_POOLING))
    mode = "cls" if pooler in ("cls", "cls_before_pooler", "pooler_output") else "mean"
    _write_json(
        out / pooling_dir / "config.json",
        {
            "embedding_dimension": hidden_size,
            "pooling_mode": mode,
            "include_prompt": serving.get("include_prompt", True),
        },
    )
    if head is not None:
        modules.append(("2_Dense", ST_DENSE))
        _write_json(
            out / "2_Dense" / "config.json",
            {
                "in_features": hidden_size,
                "out_features": hidden_size,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
                "module_input_name": "sentence_embedding",
                "module_output_name": "sentence_embedding",
            },
        )
        _save_safetensors(
            out / "2_Dense" / "model.safetensors",
            {"linear.weight": head["dense.weight"], "linear.bias": head["dense.bias"]},
        )
    _write_json(
        out / "modules.json",
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)],
        indent=2,
    )
    _write_json(
        out / "sentence_bert_config.json",
        {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings",
        },
    )
    import transformers

    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {
                "pytorch": torch.__version__,
                "sentence_transformers": ST_FORMAT_VERSION,
                "transformers": transformers.__version__,
            },
            "default_prompt_name": serving.get("default_prompt_name"),
            "model_type": "SentenceTransformer",
            "prompts": {"document": "", "query": "", **serving.get("prompts", {})},
            "similarity_fn_name": "cosine",
        },
        indent=2,
    )


def _base_tensors(model_dir: str, names: set[str]) -> dict[str, torch.Tensor]:
    """Tensors `names` from a Hugging Face checkpoint directory (safetensors, sharded or not, or
    pytorch_model.bin); those it lacks are left out."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
        if (root / "model.safetensors").is_file()
        else []
    )
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for name in files:
            with safe_open(str(root / name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in names & set(f.keys())})
    elif (root / "pytorch_model.bin").is_file():
        state = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
        out = {k: v for k, v in state.items() if k in names}
    return out


def pooler_weights(config, base_dir: str | Path) -> dict[str, torch.Tensor]:
    """Weights of the architecture's HF pooler layer (a Linear + Tanh on [CLS] that SimCSE never
    uses and trains without), saved so that `AutoModel.from_pretrained` and sentence-transformers
    load our directories without a MISSING-weights report: the base checkpoint's own where it
    has them, else HF's initialisation (normal(0, initializer_range), zero bias; seeded)."""
    from transformers import AutoModel

    with torch.device("meta"):
        full = AutoModel.from_config(config)  # the default build includes the pooler
    shapes = {k: v.shape for k, v in full.state_dict().items() if k.startswith("pooler.")}
    if not shapes:
        return {}
    base = _base_tensors(str(base_dir), set(shapes)) if Path(base_dir).is_dir() else {}
    g = torch.Generator().manual_seed(0)
    std = getattr(config, "initializer_range", 0.02)
    return {
        k: base[k]
        if k in base and base[k].shape == shape
        else torch.zeros(shape)
        if k.endswith("bias")
        else torch.randn(shape, generator=g) * std
        for k, shape in shapes.items()
    }


def _pooler_head(state: dict[str, torch.Tensor], pooler: str) -> dict[str, torch.Tensor] | None:
    """BERT's pooler layer (pooler.dense) as the ST head, for pooler_output; None otherwise."""
    if pooler != "pooler_output":
        return None
    return {"dense.weight": state["pooler.dense.weight"], "dense.bias": state["pooler.dense.bias"]}


def save_encoder(
    out_dir: str | Path,
    backbone_state: dict[str, torch.Tensor],
    mlp_state: dict[str, torch.Tensor] | None,
    encoder: Encoder,
    tokenizer,
    serving: dict | None = None,
) -> None:
    """Write a Hugging Face model directory (config, weights, tokenizer) plus SimCSE's pooling
    settings, which is also a sentence-transformers model (layout above), so
    `AutoModel.from_pretrained(out_dir)` and `SentenceTransformer(out_dir)` both load it. The MLP
    is kept only where the pooler uses it at test time (cls without mlp_only_train).

    The states are passed in, not read from `encoder`, because under ZeRO-3 the live parameters
    are partitions; the trainer gathers full fp32 weights first. `encoder` supplies the config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only what the backbone persists: non-persistent buffers (e.g. BERT's token_type_ids) in a
    # gathered state would be reported as UNEXPECTED keys on every load. state_dict()'s keys
    # are exactly the persistent ones (under ZeRO-3 too: the keys do not depend on partitioning).
    persistent = set(encoder.backbone.state_dict().keys())
    backbone_state = {
        **pooler_weights(encoder.backbone.config, encoder.backbone.name_or_path),
        **{k: v for k, v in backbone_state.items() if k in persistent},
    }
    with quiet_transformers():  # no "Writing model shards" bar in the training log
        encoder.backbone.save_pretrained(out, state_dict=backbone_state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    keep_mlp = encoder.pooler == "cls" and not encoder.mlp_only_train
    meta = {"pooler": encoder.pooler, "mlp_only_train": encoder.mlp_only_train, "mlp": keep_mlp}
    if serving and serving.get("matryoshka_dims"):
        meta["matryoshka_dims"] = serving["matryoshka_dims"]
    (out / SIMCSE_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if keep_mlp:
        if mlp_state is None:
            raise ValueError(f"{out}: pooler cls keeps the MLP at test time, but mlp_state is None")
        mlp_state = {k: v.detach().cpu() for k, v in mlp_state.items()}
        torch.save(mlp_state, out / MLP_WEIGHTS_NAME)
    config = encoder.backbone.config
    write_sentence_transformers(
        out,
        encoder.pooler,
        config.hidden_size,
        config.num_hidden_layers,
        mlp_state if keep_mlp else _pooler_head(backbone_state, encoder.pooler),
        serving,
    )


def write_best(
    out: Path,
    state: dict[str, torch.Tensor],
    encoder: Encoder,
    tokenizer,
    info: dict,
    config: dict | None = None,
    serving: dict | None = None,
) -> Path:
    """Publish `out` (a run's best/) from a full state dict of the Encoder ("backbone.*",
    "mlp.*") with its model card, atomically: readers see the previous best model or the new
    one, never neither. `config`: the run's resolved config, for the card; `serving`:
    Config.serving()."""
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")} or None
    with atomic_dir(out) as tmp:
        save_encoder(tmp, backbone, mlp, encoder, tokenizer, serving)
        _write_json(tmp / "best_info.json", info, indent=2)
        scores, note = best_info_scores(info)
        write_model_card(tmp, config=config, scores=scores, split_note=note)
    return out


def _export_into(model_dir: Path, out: Path, meta: dict) -> None:
    """Write the export of `model_dir` with pooling settings `meta` into the empty dir `out`."""
    # ST module folders ("1_Pooling", "2_Normalize", ...) are rewritten, not copied
    shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("[0-9]_*", "best_info.json"))
    keep_mlp = meta["pooler"] == "cls" and not meta["mlp_only_train"]
    mlp = read_mlp(model_dir) if keep_mlp else None
    if not keep_mlp:
        (out / MLP_WEIGHTS_NAME).unlink(missing_ok=True)
    elif not (out / MLP_WEIGHTS_NAME).is_file():
        torch.save(mlp, out / MLP_WEIGHTS_NAME)
    settings = {"pooler": meta["pooler"], "mlp_only_train": bool(meta["mlp_only_train"]), "mlp": keep_mlp}
    if meta.get("matryoshka_dims"):
        settings["matryoshka_dims"] = meta["matryoshka_dims"]
    _write_json(out / SIMCSE_CONFIG_NAME, settings, indent=2)
    config = json.loads((out / "config.json").read_text())
    config.pop("output_hidden_states", None)  # re-set below only for the poolers that need it
    _write_json(out / "config.json", config, indent=2)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    from safetensors.torch import load_file, save_file

    weights = out / "model.safetensors"
    if weights.is_file():  # a model saved without its pooler layer: ship one, so AutoModel loads it silently
        state = load_file(str(weights))
        missing = {k: v for k, v in pooler_weights(hf, model_dir).items() if k not in state}
        if missing:
            save_file({**state, **missing}, str(weights), metadata={"format": "pt"})
    head = mlp if keep_mlp else _pooler_head(load_file(str(weights)) if weights.is_file() else {}, meta["pooler"])
    serving = {k: meta[k] for k in ("prompts", "default_prompt_name", "include_prompt") if k in meta}
    write_sentence_transformers(out, meta["pooler"], hf.hidden_size, hf.num_hidden_layers, head, serving)


def export_model(src: str | Path, out_dir: str | Path, pooler: str | None = None, overwrite: bool = False) -> Path:
    """Copy a model (run dir -> best/) to out_dir as a HF + sentence-transformers model."""
    model_dir = resolve_model_dir(src)
    meta = read_pooling(model_dir, pooler)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if out.resolve() == model_dir.resolve():
        raise ExportError(f"{out}: the output directory is the model directory")
    with atomic_dir(out) as tmp:
        _export_into(model_dir, tmp, meta)
    return out
