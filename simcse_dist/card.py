"""The model card (README.md) of a SimCSE model directory, for the Hugging Face Hub and
sentence-transformers.

YAML front matter with the keys the Hub reads (library_name: sentence-transformers, which also
gives the Hub's "Use this model" snippet; pipeline_tag: sentence-similarity; base_model; tags;
datasets where the training file is a Hub dataset), then the objective and data, the
hyperparameters of the run's resolved config, the scores with their split, usage code for
sentence-transformers and for plain transformers with this model's pooler (the recipe of
model.pool(); tests/test_card.py runs both blocks and compares with load_encoder), and the
SimCSE citation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

# Read here rather than through export.read_pooling, so that export.py (best/'s writer) can call
# write_model_card without an import cycle; every model dir written by simcse-dist has it.
SIMCSE_CONFIG_FILE = "simcse_config.json"

_SELECTED_ON_DEV = ("the checkpoint kept is the one with the highest dev Spearman, so this is a model-selection "
                    "score, optimistic for unseen data; `simcse-eval` gives the test-split numbers")
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
_EXAMPLES = ["A man is playing a guitar.", "Someone is playing an instrument.", "The sky is blue today."]

_POOLING_CODE = {
    "cls": "embeddings = out.last_hidden_state[:, 0]  # [CLS] of the last layer (not pooler_output)",
    "avg": "embeddings = mean(out.last_hidden_state)  # mean of the last layer over real tokens",
    "avg_first_last": "embeddings = mean((out.hidden_states[1] + out.hidden_states[-1]) / 2)  # first + last layer",
    "avg_top2": "embeddings = mean((out.hidden_states[-2] + out.hidden_states[-1]) / 2)  # last two layers",
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
    train, model, optim = config.get("train", {}), config.get("model", {}), config.get("optim", {})
    tau = model.get("temperature", 0.05)
    if train.get("objective") == "sup":
        weight = optim.get("hard_negative_weight") or 0
        return ("Supervised SimCSE: NLI triplets (premise, entailment, contradiction); the entailment hypothesis is the "
                "positive, the contradiction a hard negative" + (f" (logit weight {weight})" if weight else "") +
                f", and every other sentence of the global batch a negative; cross-entropy over cosine / {tau}.")
    return ("Unsupervised SimCSE: each sentence is encoded twice with dropout on; the two views are a positive pair "
            f"and every other sentence of the global batch a negative; cross-entropy over cosine / {tau}.")


def _hyperparameters(config: dict) -> list[str]:
    rows = ["| setting | value |", "|---|---|"]
    for section in ("model", "data", "train", "optim"):
        for key, value in (config.get(section) or {}).items():
            if f"{section}.{key}" not in _LOCAL_KEYS:
                shown = value if isinstance(value, str) else json.dumps(value)  # true / null, as in config.yaml
                rows.append(f"| `{section}.{key}` | `{shown}` |")
    return rows


def _usage(model_id: str, pooling: dict) -> list[str]:
    pooler, mlp = pooling["pooler"], bool(pooling["mlp"])
    examples = repr(_EXAMPLES)
    st = (f'from sentence_transformers import SentenceTransformer\n\nmodel_id = "{model_id}"\n'
          f"model = SentenceTransformer(model_id)\nsentences = {examples}\n"
          "embeddings = model.encode(sentences)\nprint(model.similarity(embeddings, embeddings))\n")
    layers = pooler in ("avg_first_last", "avg_top2")
    imports = "import os\n\n" if mlp else ""
    hub = "from huggingface_hub import hf_hub_download\n" if mlp else ""
    hf = (f"{imports}import torch\n{hub}from transformers import AutoModel, AutoTokenizer\n\n"
          f'model_id = "{model_id}"\ntokenizer = AutoTokenizer.from_pretrained(model_id)\n'
          f"model = AutoModel.from_pretrained(model_id).eval()\nsentences = {examples}\n"
          'batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")\n'
          f"with torch.no_grad():\n    out = model(**batch{', output_hidden_states=True' if layers else ''})\n"
          + (_MEAN_CODE if pooler.startswith("avg") else "")
          + _POOLING_CODE["cls" if pooler.startswith("cls") else pooler] + "\n" + (_MLP_CODE if mlp else ""))
    head = "[CLS]" if pooler.startswith("cls") else "mean"
    dropped = (" The MLP head used in training is not part of the encoder at test time (`mlp_only_train`, the paper's "
               "unsupervised setting).") if pooling.get("mlp_only_train") else ""
    return [
        "## Usage", "",
        "With sentence-transformers (>= 6: the module layout this folder uses):", "", "```python", st.rstrip(), "```", "",
        f"With plain transformers, {head} pooling (`{pooler}`{', then the MLP head' if mlp else ''}), the same "
        f"embedding as sentence-transformers and `simcse-eval`:{dropped}", "", "```python", hf.rstrip(), "```", "",
        "Loading with `AutoModel` reports `pooler.dense.*` as missing: expected, SimCSE never uses BERT's pooler layer "
        "and `pooler_output` is not the sentence embedding. The embeddings are not normalised; compare them by cosine.",
    ]


def best_info_scores(info: dict) -> tuple[dict[str, float] | None, str]:
    """(scores, split_note) for the card from a best/'s best_info.json ({"step", "stsb_dev_spearman"};
    the score is None when the run had no dev evaluation)."""
    score = info.get("stsb_dev_spearman")
    if score is None:
        return None, DEFAULT_SPLIT_NOTE
    return {"STS-B dev Spearman x 100": 100 * score}, f"STS-B dev at step {info.get('step')}: {_SELECTED_ON_DEV}"


def write_model_card(
    model_dir: Path,
    *,
    config: dict | None,
    scores: dict[str, float] | None,
    split_note: str = DEFAULT_SPLIT_NOTE,
    model_id: str | None = None,
) -> Path:
    """Write model_dir/README.md and return its path. `config` is the run's resolved config
    (config.yaml as a dict: model / data / train / optim sections), `scores` {name: value} as they
    should be shown, `split_note` which split they come from, `model_id` the name the usage code
    loads (a Hub repo id when pushing; default: model_dir as given)."""
    model_dir = Path(model_dir)
    try:
        pooling = json.loads((model_dir / SIMCSE_CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir}: cannot read {SIMCSE_CONFIG_FILE} ({e}); write the model first "
                         "(save_encoder / export_model)") from None
    config = config or {}
    base = (config.get("model") or {}).get("name_or_path")
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}
    if (base_id := _hub_id(base)) is not None:
        front["base_model"] = base_id
    front["tags"] = TAGS
    if (dataset := _hub_dataset((config.get("data") or {}).get("train_file"))) is not None:
        front["datasets"] = [dataset]
    parts = (model_id or str(model_dir.resolve())).rstrip("/").split("/")
    title = parts[-2] if parts[-1] == "best" and len(parts) > 1 else parts[-1]  # a run's best/: the run's name
    mlp = " + MLP head (Linear + Tanh)" if pooling["mlp"] else ""
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"A SimCSE sentence encoder (Gao, Yao & Chen, 2021) trained with simcse-dist"
             f"{f' from `{base_id or base}`' if base else ''}. Sentence embedding: pooler `{pooling['pooler']}`{mlp}, "
             "compared by cosine similarity.", ""]
    if config:
        data = config.get("data") or {}
        lines += ["## Training", "", _objective(config), "",
                  f"Data: `{data.get('train_file')}` (max {data.get('max_seq_len')} tokens per sentence).", "",
                  "Hyperparameters (the run's resolved config):", "", *_hyperparameters(config), ""]
    if scores:
        lines += ["## Evaluation", "", f"Split: {split_note}.", "", "| metric | value |", "|---|---|",
                  *(f"| {name} | {value:.4f} |" for name, value in scores.items()), ""]
    lines += [*_usage(model_id or str(model_dir), pooling), "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create the Hub model repo if needed and upload `folder`; returns the repo URL. Needs network
    and a token (`hf auth login` or HF_TOKEN); with HF_HUB_OFFLINE=1 huggingface_hub refuses."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="Upload SimCSE model (simcse-export)")
    return str(url)
