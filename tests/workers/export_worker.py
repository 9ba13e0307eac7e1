"""Run under torchrun: train tiny models (each pooler, ZeRO 0 and 3), then encode test sentences
with the *in-process* engine right after training, for tests/model/test_export.py to compare with
the exported model.

Also encodes the same sentences with a plain (non-DeepSpeed) encoder of the untrained model,
sharded over the ranks by eval/encode.py, for the sharding test.

Writes <out>/<variant>/inproc.pt ({"emb"}) per variant and <out>/sharded.pt on rank 0.
"""

import argparse
import json
from pathlib import Path

import torch
from harness import process_group, trainer

from simcse_dist.eval.encode import encode, pair_embeddings
from simcse_dist.model.load import load_encoder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--sentences", required=True, help="JSON list")
    p.add_argument(
        "--variants", required=True, help="JSON list of [name, pooler, mlp_only_train, zero_stage(, [overrides])]"
    )
    args = p.parse_args()
    out = Path(args.out)
    sentences = json.loads(Path(args.sentences).read_text())
    with process_group() as env:
        plain, tokenizer, _ = load_encoder(args.model, "avg")
        emb = encode(plain, tokenizer, sentences, torch.device("cpu"), batch_size=3)  # collective
        left, right = pair_embeddings(plain, tokenizer, sentences[:4], sentences[4:8], torch.device("cpu"), 2)
        if env.is_main:
            torch.save({"emb": emb, "left": left, "right": right, "world": env.world_size}, out / "sharded.pt")
        for name, pooler, mlp_only_train, stage, *extra in json.loads(args.variants):
            run = trainer(
                env,
                [
                    f"model.name_or_path={args.model}",
                    f"model.pooler={pooler}",
                    f"model.mlp_only_train={str(mlp_only_train).lower()}",
                    f"data.train_file={args.train_file}",
                    "train.global_batch_size=8",
                    "train.max_steps=2",
                    "optim.lr=0.001",
                    f"engine.zero_stage={stage}",
                    f"train.output_dir={out / name}",
                    "log.wandb_mode=disabled",
                    "log.progress_bar=false",
                    *(extra[0] if extra else []),
                ],
            )
            run.train()
            run.engine.eval()
            emb = encode(run.engine, run.tokenizer, sentences, run.engine.device, batch_size=4)
            if env.is_main:
                torch.save({"emb": emb}, out / name / "inproc.pt")


if __name__ == "__main__":
    main()
