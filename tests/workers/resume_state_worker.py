"""Run under torchrun (or alone for one rank): build the Trainer for a run dir holding a
checkpoint, resume from it, and save (rank 0) each parameter's fp32 weight, Adam moments and
step as the engine now holds them, by parameter name: what tests compare across layouts.

With --train-steps N the run dir is first trained to step N in this process (the Trainer's
loop, as simcse-train runs it; it saves its checkpoint at step N): the run and its resume at
this world size in one launch instead of two."""

import argparse

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from harness import process_group
from harness import trainer as build_trainer

from simcse_dist.train.trainer import Trainer


def optimizer_state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """collective under ZeRO (full tensors are assembled from the partitions)."""
    engine = trainer.engine
    out: dict[str, dict[str, torch.Tensor]] = {}
    assert engine.zero_stage > 0, "reads ZeRO-partitioned optimizer state"
    # DeepSpeed links the moments to parameters lazily, at the first step: a private call,
    # needed only to read the state back in this test worker.
    zero = engine.engine.optimizer
    zero._lazy_init_hp_params_optimizer_state()
    base = zero.optimizer  # the torch AdamW over the flat partitions
    steps = {float(st["step"]) for st in base.state.values()}
    assert len(steps) == 1, steps
    step = torch.tensor(steps.pop())
    for name, p in engine.module.named_parameters():
        out[name] = {"fp32": safe_get_full_fp32_param(p).float().cpu(), "step": step}
        for key in ("exp_avg", "exp_avg_sq"):
            out[name][key] = safe_get_full_optimizer_state(p, key).float().cpu()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dump", required=True)
    p.add_argument("--config")
    p.add_argument("--train-steps", type=int, help="first train the run dir to this step")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with process_group() as env:
        if args.train_steps:
            build_trainer(env, [*args.overrides, f"train.max_steps={args.train_steps}"], args.config).train()
        trainer = build_trainer(env, args.overrides, args.config)
        stage = trainer.cfg.engine.zero_stage
        route = "universal" if trainer.ckpt.needs_universal(trainer.ckpt.latest(), stage) else "direct"
        step = trainer.setup()
        state = optimizer_state(trainer)
        if env.is_main:
            torch.save(
                {"step": step, "route": route, "zero_stage": trainer.engine.zero_stage, "params": state}, args.dump
            )


if __name__ == "__main__":
    main()
