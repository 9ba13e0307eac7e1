"""The saved-model format: a Hugging Face model directory that is also a sentence-transformers
model, and loading any such directory (or a plain HF / ST model) back into an `Encoder`.

A model directory holds
- config.json, model.safetensors, tokenizer files   (AutoModel / AutoTokenizer)
- simcse_config.json {"pooler", "mlp_only_train", "mlp"} and, when "mlp", simcse_mlp.pt
- the sentence-transformers 6 files, laid out exactly as `SentenceTransformer.save()` writes
  them for the equivalent modules (checked by tests/test_export.py against ST itself):
  modules.json, config_sentence_transformers.json, sentence_bert_config.json and

    pooler              ST modules after the Transformer (path)
    cls (MLP kept)      Pooling cls (1_Pooling) + Dense d->d, Tanh (2_Dense)
    cls, mlp_only_train Pooling cls (1_Pooling)
    cls_before_pooler   Pooling cls (1_Pooling)
    avg                 Pooling mean (1_Pooling)
    avg_first_last      WeightedLayerPooling from layer 1, weights [1, 0, ..., 0, 1]
                        (1_WeightedLayerPooling) + Pooling mean (2_Pooling)
    avg_top2            WeightedLayerPooling from layer L-1, weights [1, 1] + Pooling mean

  WeightedLayerPooling is a built-in ST module (no custom code, no trust_remote_code): its
  weighted mean (sum_l w_l h_l) / sum_l w_l over hidden_states[start:] is exactly SimCSE's
  (h_1 + h_L) / 2 or (h_{L-1} + h_L) / 2. It reads all hidden states, so config.json carries
  `output_hidden_states: true` for those two poolers, as ST's own save does.
  No Normalize module: SimCSE embeddings are not normalised (cosine is unaffected).

The layout targets sentence-transformers >= 6 (module paths `sentence_transformers.base...`);
older releases cannot import those paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .card import best_info_scores, write_model_card
from .config import POOLERS
from .fsutil import atomic_dir
from .model import Encoder
from .utils import quiet_transformers

SIMCSE_CONFIG_NAME = "simcse_config.json"
MLP_WEIGHTS_NAME = "simcse_mlp.pt"
ST_FORMAT_VERSION = "6.0.0"  # oldest sentence-transformers that reads this layout
_ST_DIRS = ("1_Pooling", "2_Pooling", "2_Dense", "1_WeightedLayerPooling")
_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
_DENSE = "sentence_transformers.base.modules.dense.Dense"
_WLP = "sentence_transformers.sentence_transformer.modules.weighted_layer_pooling.WeightedLayerPooling"


class ExportError(ValueError):
    """A model directory cannot be exported or loaded as asked; the message says why and where."""


def _write_json(path: Path, obj: dict | list, indent: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + "\n")


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))


def layer_weights(pooler: str, num_layers: int) -> tuple[int, list[float]]:
    """(layer_start, weights) of ST's WeightedLayerPooling over hidden_states[0..num_layers]."""
    if pooler == "avg_top2":
        return num_layers - 1, [1.0, 1.0]
    if pooler == "avg_first_last":  # hidden_states[1] and hidden_states[-1]
        if num_layers == 1:
            return 1, [1.0]
        return 1, [1.0] + [0.0] * (num_layers - 2) + [1.0]
    raise ValueError(pooler)


def write_sentence_transformers(
    out_dir: str | Path,
    pooler: str,
    keep_mlp: bool,
    hidden_size: int,
    num_layers: int,
    mlp_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Add the sentence-transformers files to a Hugging Face model directory (idempotent:
    stale module folders of another pooler are removed first)."""
    out = Path(out_dir)
    if pooler not in POOLERS:
        raise ExportError(f"unknown pooler {pooler!r}; expected one of {', '.join(POOLERS)}")
    if keep_mlp and mlp_state is None:
        raise ExportError(f"{out}: pooler cls keeps the MLP at test time, but no MLP weights were given")
    for name in _ST_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    modules = [("", _TRANSFORMER)]
    pooling_dir = "1_Pooling"
    if pooler in ("avg_first_last", "avg_top2"):
        start, weights = layer_weights(pooler, num_layers)
        modules.append(("1_WeightedLayerPooling", _WLP))
        _write_json(out / "1_WeightedLayerPooling" / "config.json",
                    {"embedding_dimension": hidden_size, "layer_start": start, "num_hidden_layers": num_layers})
        _save_safetensors(out / "1_WeightedLayerPooling" / "model.safetensors",
                          {"layer_weights": torch.tensor(weights)})
        pooling_dir = "2_Pooling"
        config = json.loads((out / "config.json").read_text())
        config["output_hidden_states"] = True
        _write_json(out / "config.json", config, indent=2)
    modules.append((pooling_dir, _POOLING))
    mode = "cls" if pooler in ("cls", "cls_before_pooler") else "mean"
    _write_json(out / pooling_dir / "config.json",
                {"embedding_dimension": hidden_size, "pooling_mode": mode, "include_prompt": True})
    if keep_mlp:
        modules.append(("2_Dense", _DENSE))
        _write_json(out / "2_Dense" / "config.json", {
            "in_features": hidden_size, "out_features": hidden_size, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh",
            "module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding",
        })
        _save_safetensors(out / "2_Dense" / "model.safetensors",
                          {"linear.weight": mlp_state["dense.weight"], "linear.bias": mlp_state["dense.bias"]})
    _write_json(out / "modules.json",
                [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)],
                indent=2)
    _write_json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    })
    import transformers

    _write_json(out / "config_sentence_transformers.json", {
        "__version__": {"pytorch": torch.__version__, "sentence_transformers": ST_FORMAT_VERSION,
                        "transformers": transformers.__version__},
        "default_prompt_name": None,
        "model_type": "SentenceTransformer",
        "prompts": {"document": "", "query": ""},
        "similarity_fn_name": "cosine",
    }, indent=2)


def _base_tensors(model_dir: str, names: set[str]) -> dict[str, torch.Tensor]:
    """Tensors `names` from a Hugging Face checkpoint directory (safetensors, sharded or not, or
    pytorch_model.bin); those it lacks are left out."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"] if (root / "model.safetensors").is_file() else [])
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
    return {k: base[k] if k in base and base[k].shape == shape else
            torch.zeros(shape) if k.endswith("bias") else torch.randn(shape, generator=g) * std
            for k, shape in shapes.items()}


def save_encoder(
    out_dir: str | Path,
    backbone_state: dict[str, torch.Tensor],
    mlp_state: dict[str, torch.Tensor] | None,
    encoder: Encoder,
    tokenizer,
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
    backbone_state = {**pooler_weights(encoder.backbone.config, encoder.backbone.name_or_path), **{k: v for k, v in backbone_state.items() if k in persistent}}
    with quiet_transformers():  # no "Writing model shards" bar in the training log
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


def write_best(out: Path, state: dict[str, torch.Tensor], encoder: Encoder, tokenizer, info: dict,
               config: dict | None = None) -> Path:
    """Publish `out` (a run's best/) from a full state dict of the Encoder ("backbone.*",
    "mlp.*") with its model card, atomically: readers see the previous best model or the new
    one, never neither. `config`: the run's resolved config, for the card."""
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")} or None
    with atomic_dir(out) as tmp:
        save_encoder(tmp, backbone, mlp, encoder, tokenizer)
        _write_json(tmp / "best_info.json", info, indent=2)
        scores, note = best_info_scores(info)
        write_model_card(tmp, config=config, scores=scores, split_note=note, model_id=str(out))
    return out


# -- reading a model directory back ------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory means its best/; `bundled:all-MiniLM-L6-v2` the packaged weights."""
    from .config import resolve_model_path

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
        mode = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}.get(on[0]) if len(on) == 1 else None
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


def read_pooling(model_dir: Path, pooler: str | None = None) -> dict:
    """simcse_config.json's settings; else those implied by an ST layout; `pooler` overrides the pooler."""
    meta_file = model_dir / SIMCSE_CONFIG_NAME
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
    elif (st := _pooler_from_st(model_dir)) is not None:
        meta = {"pooler": st[0], "mlp_only_train": False, "mlp": st[1]}
    elif pooler is None:
        raise ExportError(f"{model_dir}: no {SIMCSE_CONFIG_NAME} and no sentence-transformers pooling to map; "
                          f"pass --pooler ({' | '.join(POOLERS)})")
    else:
        meta = {"pooler": pooler, "mlp_only_train": False, "mlp": False}
    if pooler is not None and pooler != meta["pooler"]:
        meta = {**meta, "pooler": pooler, "mlp": meta["mlp"] and pooler == "cls"}
    if meta["pooler"] not in POOLERS:
        raise ExportError(f"{model_dir}: unknown pooler {meta['pooler']!r}; expected one of {', '.join(POOLERS)}")
    if meta["pooler"] == "cls" and not meta["mlp_only_train"] and not meta["mlp"]:
        raise ExportError(f"{model_dir}: pooler cls applies the MLP at test time, but the directory has no MLP "
                          f"weights ({MLP_WEIGHTS_NAME} or 2_Dense); use cls_before_pooler")
    return meta


def _mlp_state(model_dir: Path) -> dict[str, torch.Tensor]:
    if (model_dir / MLP_WEIGHTS_NAME).is_file():
        return torch.load(model_dir / MLP_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    dense = load_file(str(model_dir / "2_Dense" / "model.safetensors"))
    return {"dense.weight": dense["linear.weight"], "dense.bias": dense["linear.bias"]}


def load_encoder(model: str | Path, pooler: str | None = None):
    """(Encoder in eval mode, tokenizer, settings) from a run dir, a model dir written by
    save_encoder/export, a sentence-transformers dir or any HF encoder (then `pooler` is needed)."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = resolve_model_dir(model)
    meta = read_pooling(model_dir, pooler)
    with quiet_transformers():  # the saved pooler weights are UNEXPECTED without the pooler layer
        try:  # SimCSE never uses HF's pooler layer
            backbone = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
        except TypeError:
            backbone = AutoModel.from_pretrained(model_dir)
    encoder = Encoder(backbone, meta["pooler"], bool(meta["mlp_only_train"]))
    if encoder.mlp is not None and meta["mlp"]:
        encoder.mlp.load_state_dict(_mlp_state(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    return encoder.eval(), tokenizer, {**meta, "path": str(model_dir)}


def _export_into(model_dir: Path, out: Path, meta: dict) -> None:
    """Write the export of `model_dir` with pooling settings `meta` into the empty dir `out`."""
    # ST module folders ("1_Pooling", "2_Normalize", ...) are rewritten, not copied
    shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("[0-9]_*", "best_info.json"))
    keep_mlp = meta["pooler"] == "cls" and not meta["mlp_only_train"]
    mlp = _mlp_state(model_dir) if keep_mlp else None
    if not keep_mlp:
        (out / MLP_WEIGHTS_NAME).unlink(missing_ok=True)
    elif not (out / MLP_WEIGHTS_NAME).is_file():
        torch.save(mlp, out / MLP_WEIGHTS_NAME)
    settings = {"pooler": meta["pooler"], "mlp_only_train": bool(meta["mlp_only_train"]), "mlp": keep_mlp}
    _write_json(out / SIMCSE_CONFIG_NAME, settings, indent=2)
    config = json.loads((out / "config.json").read_text())
    config.pop("output_hidden_states", None)  # re-set below only for the poolers that need it
    _write_json(out / "config.json", config, indent=2)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    weights = out / "model.safetensors"
    if weights.is_file():  # directories written before the pooler weights were shipped
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        missing = {k: v for k, v in pooler_weights(hf, model_dir).items() if k not in state}
        if missing:
            save_file({**state, **missing}, str(weights), metadata={"format": "pt"})
    write_sentence_transformers(out, meta["pooler"], keep_mlp, hf.hidden_size, hf.num_hidden_layers, mlp)


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
