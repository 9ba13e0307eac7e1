"""Run under torchrun: one optimizer step's gradients from the real trainer path, per ZeRO stage.

Writes rank 0's assembled fp32 gradients (after DeepSpeed's reduction, before the optimizer
step) to <out>/grads-<objective>-z<stage>.pt for the test to compare with a single process.
"""

import argparse
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--objectives", default="unsup,sup")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    env = du.DistEnv.from_env()
    du.init_distributed(env, timeout_s=120)
    out = Path(args.out)
    for objective in args.objectives.split(","):
        for stage in map(int, args.stages.split(",")):
            cfg = load_config(None, [*args.overrides, f"train.objective={objective}", f"engine.zero_stage={stage}",
                                     f"train.output_dir={out}/run-{objective}-z{stage}"])
            cfg.validate(env.world_size)
            trainer = Trainer(cfg, env, quiet=True)
            _, micro_steps = next(trainer.sampler.iter_steps(0, 1))
            losses = []
            for i, indices in enumerate(micro_steps):
                loss = trainer.compute_loss(trainer.micro_batch(indices))
                trainer.engine.backward(loss)
                losses.append(float(loss))
                if i < len(micro_steps) - 1:
                    trainer.engine.step()  # a non-boundary step: DeepSpeed only counts the micro-step
            # collective under ZeRO-3: every rank assembles every gradient
            grads = {n: safe_get_full_grad(q).detach().float().cpu().clone()
                     for n, q in trainer.engine.module.named_parameters()}
            if env.is_main:
                torch.save({"grads": grads, "rank0_losses": losses}, out / f"grads-{objective}-z{stage}.pt")
            du.barrier()
    du.teardown()


if __name__ == "__main__":
    main()
