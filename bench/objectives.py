"""The objectives table of docs/objectives.md: MiniLM, unsupervised SimCSE on the first 3,000
wiki-sample lines, the same steps, seed and batch, with and without each objective; STS-B dev
and test scored by sentence-transformers' EmbeddingSimilarityEvaluator at each `truncate_dim`.
The peer's runs (MultipleNegativesRankingLoss, MatryoshkaLoss over it) train the same model on
the same texts in the same script.

    python -m bench.objectives --output bench/results/objectives.json            # everything
    python -m bench.objectives --runs base,matryoshka --steps 5 --lines 400    # a quick check

Each run is one `simcse-train` process (1 rank, all cores); its best/ directory is what is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import BUNDLED, DEFAULT_DATA, REPO, TEMPERATURE, set_thread_env, start_result, write_result

STSB = REPO.parent / "shared" / "data" / "stsb"
DIMS = (384, 128, 64, 32)
OURS = {  # run name -> simcse-train overrides on top of the common recipe
    "base": [],
    "matryoshka": [f"loss.matryoshka_dims=[{','.join(map(str, DIMS))}]"],
    "guide": [f"loss.guide={{model: {BUNDLED}, margin_strategy: absolute, margin: 0.0}}"],
    "distill": [f"loss.distill={{teacher: {BUNDLED}, temperature: 0.05, weight: 1.0}}"],
}
PEER = ("peer-mnrl", "peer-matryoshka")


def common(train_file: Path, out: Path, steps: int, seed: int) -> list[str]:
    return [
        f"model.name_or_path={BUNDLED}",
        "model.pooler=avg",
        f"data.train_file={train_file}",
        "data.max_seq_len=32",
        "train.objective=unsup",
        "train.global_batch_size=64",
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        f"train.output_dir={out}",
        f"loss.temperature={TEMPERATURE}",
        "optim.lr=3e-5",
        "checkpoint.every_steps=0",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "engine.zero_stage=0",
    ]


def train_ours(name: str, train_file: Path, work: Path, steps: int, seed: int) -> Path:
    out = work / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "simcse_dist.cli", *common(train_file, out, steps, seed), *OURS[name]]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out / "best"


def train_peer(name: str, texts: list[str], work: Path, steps: int, seed: int) -> Path:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    from simcse_dist.config import resolve_model_path

    model = SentenceTransformer(resolve_model_path(BUNDLED), device="cpu")
    model.max_seq_length = 32
    loss = losses.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    if name == "peer-matryoshka":
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=list(DIMS))
    out = work / f"{name}-s{seed}"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=64,
        max_steps=steps,
        learning_rate=3e-5,
        warmup_ratio=0.0,
        seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, steps // 4),
        dataloader_drop_last=True,
        use_cpu=True,
    )
    data = Dataset.from_dict({"anchor": texts, "positive": texts})
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    model.save(str(out / "final"))
    return out / "final"


def score(model_dir: Path) -> dict[str, float]:
    """Spearman x 100 of STS-B dev and test at every truncation. The embeddings come from
    sentence-transformers' encode, once per split; a truncation is their first `dim`
    coordinates (what truncate_dim does), scored by cosine and Spearman as its
    EmbeddingSimilarityEvaluator scores."""
    import numpy as np
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from simcse_dist.eval.sts import read_pair_file

    model = SentenceTransformer(str(model_dir), device="cpu")
    out = {}
    for split in ("dev", "test"):
        data = read_pair_file(STSB / f"{split}.tsv")
        e1 = model.encode(data.sentences1, batch_size=128, convert_to_numpy=True)
        e2 = model.encode(data.sentences2, batch_size=128, convert_to_numpy=True)
        for dim in DIMS:
            a, b = e1[:, :dim], e2[:, :dim]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[f"{split}@{dim}"] = 100 * float(spearmanr(data.scores, cos).statistic)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join([*OURS, *PEER]), help="comma-separated run names")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lines", type=int, default=3000, help="first N lines of the wiki sample")
    p.add_argument("--seeds", default="42", help="comma-separated seeds")
    p.add_argument("--output", help="JSON result file")
    args = p.parse_args(argv)
    set_thread_env(None)
    result = start_result(args)
    texts = DEFAULT_DATA.read_text().splitlines()[: args.lines]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="simcse-objectives-") as tmp:
        work = Path(tmp)
        train_file = work / "wiki-first.txt"
        train_file.write_text("\n".join(texts) + "\n")
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.runs.split(","):
                if name in OURS:
                    model_dir = train_ours(name, train_file, work, args.steps, seed)
                elif name in PEER:
                    model_dir = train_peer(name, texts, work, args.steps, seed)
                else:
                    p.error(f"--runs: unknown run {name!r}; expected some of {', '.join([*OURS, *PEER])}")
                rows[f"{name}/seed{seed}"] = score(model_dir)
                print(json.dumps({name: rows[f"{name}/seed{seed}"], "seed": seed}), flush=True)
    result["rows"] = rows
    write_result(result, args.output)


if __name__ == "__main__":
    main()
