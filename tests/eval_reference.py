"""Independent references for the evaluation/export tests: written-out formulas and the
documented "AutoModel + pooling" recipe, sharing no code with simcse_dist's encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties get the mean of the ranks they span (as Spearman requires)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def spearman_by_hand(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = a.double(), b.double()
    return [float(u @ v / (u.norm() * v.norm())) for u, v in zip(a, b, strict=True)]


@torch.no_grad()
def documented_embeddings(model_dir: str | Path, sentences: list[str], pooler: str | None = None) -> torch.Tensor:
    """The recipe docs/evaluation.md gives for plain transformers users, one sentence at a
    time (so no padding is involved at all)."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    settings_file = model_dir / "simcse_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {"mlp": False}
    pooler = pooler or settings["pooler"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    rows = []
    for sentence in sentences:
        batch = tokenizer(sentence, return_tensors="pt")
        hidden = model(**batch, output_hidden_states=True).hidden_states  # (embeddings, layer 1, ..., layer L)
        if pooler in ("cls", "cls_before_pooler"):
            vec = hidden[-1][0, 0]
        elif pooler == "avg":
            vec = hidden[-1][0].mean(0)
        elif pooler == "avg_first_last":
            vec = ((hidden[1] + hidden[-1]) / 2)[0].mean(0)
        elif pooler == "avg_top2":
            vec = ((hidden[-2] + hidden[-1]) / 2)[0].mean(0)
        else:
            raise ValueError(pooler)
        if settings["mlp"]:
            mlp = torch.load(model_dir / "simcse_mlp.pt", weights_only=True)
            vec = torch.tanh(mlp["dense.weight"] @ vec + mlp["dense.bias"])
        rows.append(vec)
    return torch.stack(rows)
