"""Run under torchrun: train tiny models (each pooler, ZeRO 0 and 3), then encode test sentences
with the *in-process* engine right after training, for tests/test_export.py to compare with
the exported model.

Also encodes the same sentences with a plain (non-DeepSpeed) encoder of the untrained model,
sharded over the ranks by evaluation.encode, for the sharding test.

Writes <out>/<variant>/inproc.pt ({"emb"}) per variant and <out>/sharded.pt on rank 0.
"""

import argparse
import json
from pathlib import Path

import torch

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.evaluation import encode, pair_embeddings
from simcse_dist.export import load_encoder
from simcse_dist.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--sentences", required=True, help="JSON list")
    p.add_argument("--variants", required=True, help='JSON list of [name, pooler, mlp_only_train, zero_stage]')
    args = p.parse_args()
    env = du.DistEnv.from_env()
    du.init_distributed(env, timeout_s=120)
    out = Path(args.out)
    sentences = json.loads(Path(args.sentences).read_text())
    try:
        plain, tokenizer, _ = load_encoder(args.model, "avg")
        emb = encode(plain, tokenizer, sentences, torch.device("cpu"), batch_size=3)  # collective
        left, right = pair_embeddings(plain, tokenizer, sentences[:4], sentences[4:8], torch.device("cpu"), 2)
        if env.is_main:
            torch.save({"emb": emb, "left": left, "right": right, "world": env.world_size}, out / "sharded.pt")
        for name, pooler, mlp_only_train, stage in json.loads(args.variants):
            cfg = load_config(None, [
                f"model.name_or_path={args.model}", f"model.pooler={pooler}",
                f"model.mlp_only_train={str(mlp_only_train).lower()}", f"data.train_file={args.train_file}",
                "train.global_batch_size=8", "train.max_steps=2", "optim.lr=0.001", f"engine.zero_stage={stage}",
                f"train.output_dir={out / name}", "log.wandb_mode=disabled", "log.progress_bar=false",
            ])
            cfg.validate(env.world_size)
            trainer = Trainer(cfg, env, quiet=True)
            trainer.train()
            trainer.engine.eval()
            emb = encode(trainer.engine, trainer.tokenizer, sentences, trainer.engine.device, batch_size=4)
            if env.is_main:
                torch.save({"emb": emb}, out / name / "inproc.pt")
        du.barrier()  # leave together (distributed.teardown)
    finally:
        du.teardown()


if __name__ == "__main__":
    main()
