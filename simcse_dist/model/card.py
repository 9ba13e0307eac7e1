"""The model card (README.md) of a SimCSE model directory, for the Hugging Face Hub and
sentence-transformers.

YAML front matter with the keys the Hub reads (library_name: sentence-transformers, which also
gives the Hub's "Use this model" snippet; pipeline_tag: sentence-similarity; base_model; tags;
datasets where the training file is a Hub dataset), then the objective and data, the
hyperparameters of the run's resolved config, the scores with their split, usage code for
sentence-transformers and for plain transformers with this model's pooler (the recipe of
model.pool(); tests/model/test_card.py runs both blocks and compares with load_encoder), and the
SimCSE citation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from simcse_dist.model.format import SIMCSE_CONFIG_NAME

_SELECTED_ON_DEV = (
    "the checkpoint kept is the one with the highest dev Spearman, so this is a model-selection "
    "score, optimistic for unseen data; `simcse-eval` gives the test-split numbers"
)
DEFAULT_SPLIT_NOTE = f"STS-B dev: {_SELECTED_ON_DEV}"
CITATION = """@inproceedings{gao2021simcse,
  title={{SimCSE}: Simple Contrastive Learning of Sentence Embeddings},
  author={Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},
  booktitle={Empirical Methods in Natural Language Processing (EMNLP)},
  year={2021}
}"""
TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "simcse"]
# names in configs that are not Hub ids but stand for one
_HUB_IDS = {"bundled:all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
# run-local settings that say nothing about the model
_LOCAL_KEYS = {"train.output_dir", "train.overwrite", "data.cache_dir", "data.num_workers", "data.prepare_workers"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PLACEHOLDER_ID = "your-username/your-simcse-model"
_EXAMPLES = ["A man is playing a guitar.", "Someone is playing an instrument.", "The sky is blue today."]

_POOLING_CODE = {
    "cls": "embeddings = out.last_hidden_state[:, 0]  # [CLS] of the last layer (not pooler_output)",
    "avg": "embeddings = mean(out.last_hidden_state)  # mean of the last layer over real tokens",
    "avg_first_last": "embeddings = mean((out.hidden_states[1] + out.hidden_states[-1]) / 2)  # first + last layer",
    "avg_top2": "embeddings = mean((out.hidden_states[-2] + out.hidden_states[-1]) / 2)  # last two layers",
    "pooler_output": "embeddings = out.pooler_output  # BERT's pooler: dense + tanh over [CLS]",
}
_MEAN_CODE = """mask = batch["attention_mask"].unsqueeze(-1).float()


def mean(tokens):
    return (tokens * mask).sum(1) / mask.sum(1)


"""
_MLP_CODE = """
# SimCSE's MLP head (Linear + Tanh) is part of this encoder: simcse_mlp.pt holds its weights
mlp_file = os.path.join(model_id, "simcse_mlp.pt") if os.path.isdir(model_id) else hf_hub_download(model_id, "simcse_mlp.pt")
mlp = torch.load(mlp_file, weights_only=True)
embeddings = torch.tanh(embeddings @ mlp["dense.weight"].T + mlp["dense.bias"])
"""


def _hub_id(name: str | None) -> str | None:
    """A Hub model id for base_model, or None for a local path (the Hub rejects those)."""
    if not name:
        return None
    name = _HUB_IDS.get(name, name)
    return name if _HUB_ID.match(name) and not Path(name).exists() else None


def _hub_dataset(train_file: str | None) -> str | None:
    match = re.match(r"^hf://datasets/([^/]+/[^/]+)/", train_file or "")
    return match.group(1) if match else None


def _objective(config: dict) -> str:
    train, loss = config.get("train", {}), config.get("loss", {})
    tau = loss.get("temperature", 0.05)
    if train.get("objective") == "sup":
        weight = loss.get("hard_negative_weight") or 0
        return (
            "Supervised SimCSE: NLI triplets (premise, entailment, contradiction); the entailment hypothesis is the "
            "positive, the contradiction a hard negative"
            + (f" (logit weight {weight})" if weight else "")
            + f", and every other sentence of the global batch a negative; cross-entropy over cosine / {tau}."
        )
    return (
        "Unsupervised SimCSE: each sentence is encoded twice with dropout on; the two views are a positive pair "
        f"and every other sentence of the global batch a negative; cross-entropy over cosine / {tau}."
    )


def _public(value):
    """A config value as the card may show it: a local path becomes its file name (a card is
    published; where the run kept its files is nobody's business), Hub paths and ids stay."""
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if (
        isinstance(value, str)
        and "://" not in value
        and (value.startswith(("/", "./", "../", "~")) or Path(value).exists())
    ):
        return Path(value).name
    return value


def _data_line(config: dict) -> str:
    """Each training file by name and size (the size when the card is written next to it)."""
    data = config.get("data") or {}
    files = [s.get("path") for s in data.get("sources") or []] or [data.get("train_file")]
    shown = []
    for f in filter(None, files):
        local = "://" not in f and Path(f).is_file()
        shown.append(f"`{_public(f)}`" + (f" ({Path(f).stat().st_size:,} bytes)" if local else ""))
    return f"Data: {', '.join(shown) or 'not recorded'} (max {data.get('max_seq_len')} tokens per sentence)."


def _hyperparameters(config: dict) -> list[str]:
    rows = ["| setting | value |", "|---|---|"]
    for section in ("model", "data", "train", "loss", "optim"):
        for key, value in (config.get(section) or {}).items():
            if f"{section}.{key}" not in _LOCAL_KEYS:
                value = _public(value)
                shown = value if isinstance(value, str) else json.dumps(value)  # true / null, as in config.yaml
                rows.append(f"| `{section}.{key}` | `{shown}` |")
    return rows


def _title(config: dict, base: str | None) -> str:
    kind = {"sup": "Supervised SimCSE", "unsup": "Unsupervised SimCSE"}.get(
        (config.get("train") or {}).get("objective"), "SimCSE"
    )
    name = _HUB_IDS.get(base, base) if base else None
    return f"{kind} on {_public(name).split('/')[-1]}" if name else f"{kind} sentence encoder"


def _usage(model_id: str | None, pooling: dict) -> list[str]:
    pooler, mlp = pooling["pooler"], bool(pooling["mlp"])
    examples = repr(_EXAMPLES)
    where = (
        f'model_id = "{model_id}"\n'
        if model_id
        else f'model_id = "{PLACEHOLDER_ID}"  # its Hub id once uploaded (simcse-export --push-to-hub)\n'
        '# model_id = "/path/to/this/folder"  # or this folder on disk\n'
    )
    st = (
        f"from sentence_transformers import SentenceTransformer\n\n{where}"
        f"model = SentenceTransformer(model_id)\nsentences = {examples}\n"
        "embeddings = model.encode(sentences)\nprint(model.similarity(embeddings, embeddings))\n"
    )
    layers = pooler in ("avg_first_last", "avg_top2")
    imports = "import os\n\n" if mlp else ""
    hub = "from huggingface_hub import hf_hub_download\n" if mlp else ""
    hf = (
        f"{imports}import torch\n{hub}from transformers import AutoModel, AutoTokenizer\n\n"
        f"{where}tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
        f"model = AutoModel.from_pretrained(model_id).eval()\nsentences = {examples}\n"
        'batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")\n'
        f"with torch.no_grad():\n    out = model(**batch{', output_hidden_states=True' if layers else ''})\n"
        + (_MEAN_CODE if pooler.startswith("avg") else "")
        + _POOLING_CODE["cls" if pooler.startswith("cls") else pooler]
        + "\n"
        + (_MLP_CODE if mlp else "")
    )
    head = "[CLS]" if pooler.startswith("cls") else "BERT pooler" if pooler == "pooler_output" else "mean"
    dropped = (
        (
            " The MLP head used in training is not part of the encoder at test time (`mlp_only_train`, the paper's "
            "unsupervised setting)."
        )
        if pooling.get("mlp_only_train")
        else ""
    )
    return [
        "## Usage",
        "",
        "With sentence-transformers (>= 6: the module layout this folder uses):",
        "",
        "```python",
        st.rstrip(),
        "```",
        "",
        f"With plain transformers, {head} pooling (`{pooler}`{', then the MLP head' if mlp else ''}), the same "
        f"embedding as sentence-transformers and `simcse-eval`:{dropped}",
        "",
        "```python",
        hf.rstrip(),
        "```",
        "",
        "The embeddings are not normalised; compare them by cosine.",
    ]


def best_info_scores(info: dict) -> tuple[dict[str, float] | None, str]:
    """(scores, split_note) for the card from a best/'s best_info.json ({"step", "stsb_dev_spearman"};
    the score is None when the run had no dev evaluation)."""
    score = info.get("stsb_dev_spearman")
    if score is None:
        return None, DEFAULT_SPLIT_NOTE
    return {"STS-B dev Spearman x 100": 100 * score}, f"STS-B dev at step {info.get('step')}: {_SELECTED_ON_DEV}"


def _serving_lines(model_dir: Path, pooling: dict) -> list[str]:
    """The Matryoshka dims and the prompts the model was trained with, and how to use them."""
    lines = []
    if dims := pooling.get("matryoshka_dims"):
        lines += [
            f"Matryoshka embeddings: trained so that the first {', '.join(map(str, dims))} coordinates each "
            f"work as an embedding; load a truncated model with "
            f"`SentenceTransformer(path, truncate_dim={dims[-1]})` (`simcse-eval --dims` scores each size).",
            "",
        ]
    st_file = model_dir / "config_sentence_transformers.json"
    st = json.loads(st_file.read_text()) if st_file.is_file() else {}
    prompts = {k: v for k, v in (st.get("prompts") or {}).items() if v}
    if prompts:
        default = st.get("default_prompt_name")
        shown = "; ".join(f"`{name}`: `{text!r}`" for name, text in prompts.items())
        lines += [
            f"Prompts (prepended to the text before tokenizing): {shown}"
            + (f"; `{default}` by default" if default else "")
            + ". Pass another with `model.encode(texts, prompt_name=...)`."
            + ("" if _include_prompt(model_dir) else " The prompt's tokens are left out of mean pooling."),
            "",
        ]
    return lines


def _include_prompt(model_dir: Path) -> bool:
    for pooling in model_dir.glob("[0-9]_Pooling/config.json"):
        return json.loads(pooling.read_text()).get("include_prompt", True)
    return True


def write_model_card(
    model_dir: Path,
    *,
    config: dict | None,
    scores: dict[str, float] | None,
    split_note: str = DEFAULT_SPLIT_NOTE,
    model_id: str | None = None,
) -> Path:
    """Write model_dir/README.md and return its path. `config` is the run's resolved config
    (config.yaml as a dict: model / data / train / loss / optim sections), `scores` {name: value}
    as they should be shown, `split_note` which split they come from, `model_id` the Hub repo id
    the usage code loads (when pushing; default: a placeholder and the local-folder variant)."""
    model_dir = Path(model_dir)
    try:
        pooling = json.loads((model_dir / SIMCSE_CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{model_dir}: cannot read {SIMCSE_CONFIG_NAME} ({e}); write the model first (save_encoder / export_model)"
        ) from None
    config = config or {}
    base = (config.get("model") or {}).get("name_or_path")
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}
    if (base_id := _hub_id(base)) is not None:
        front["base_model"] = base_id
    front["tags"] = TAGS
    if (dataset := _hub_dataset((config.get("data") or {}).get("train_file"))) is not None:
        front["datasets"] = [dataset]
    mlp = " + MLP head (Linear + Tanh)" if pooling["mlp"] else ""
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {_title(config, base)}",
        "",
        f"A SimCSE sentence encoder (Gao, Yao & Chen, 2021) trained with simcse-dist"
        f"{f' from `{base_id or _public(base)}`' if base else ''}. Sentence embedding: pooler `{pooling['pooler']}`{mlp}, "
        "compared by cosine similarity.",
        "",
        *_serving_lines(model_dir, pooling),
    ]
    if config:
        lines += [
            "## Training",
            "",
            _objective(config),
            "",
            _data_line(config),
            "",
            "Hyperparameters (the run's resolved config):",
            "",
            *_hyperparameters(config),
            "",
        ]
    if scores:
        lines += [
            "## Evaluation",
            "",
            f"Split: {split_note}.",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {name} | {value:.4f} |" for name, value in scores.items()),
            "",
        ]
    lines += [*_usage(model_id, pooling), "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create the Hub model repo if needed and upload `folder`; returns the repo URL. Needs network
    and a token (`hf auth login` or HF_TOKEN); with HF_HUB_OFFLINE=1 huggingface_hub refuses."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message="Upload SimCSE model (simcse-export)",
    )
    return str(url)
