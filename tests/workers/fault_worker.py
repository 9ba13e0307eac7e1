"""Run under torchrun or as independent processes: the real training entry path with a fault
injected by a Trainer subclass (test code only): rank R raises, or its loss turns NaN, at step S;
or (metrics) rank 0's write of step S to metrics.jsonl fails as on a full disk."""

import argparse
import sys

import torch
from harness import config

from simcse_dist.cli.train import run_training
from simcse_dist.distributed import DistEnv
from simcse_dist.train.trainer import Trainer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=["raise", "nan", "metrics"], required=True)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--step", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    class FaultyTrainer(Trainer):
        """Wraps the loss of every micro-step (step.py calls a loss_fn once per micro-step)."""

        def setup(self) -> int:
            start = super().setup()
            calls = [0]

            def wrap(inner):
                def faulty(z, *side):
                    loss, masked = inner(z, *side)
                    calls[0] += 1
                    step = calls[0] // self.cfg.train.grad_accum + 1
                    if self.env.rank == args.rank and calls[0] >= args.step:
                        if args.fault == "raise":
                            raise RuntimeError(f"injected failure on rank {self.env.rank} at step {step}")
                        return loss * torch.tensor(float("nan")), masked
                    return loss, masked

                faulty.spec = inner.spec  # what the trainer asks of an objective
                return faulty

            self.loss_fns = [wrap(fn) for fn in self.loss_fns]
            return start

    if args.fault == "metrics":
        import errno

        from simcse_dist.train.sinks import JsonlLogger

        write = JsonlLogger.log

        def full_disk(self, metrics, step):
            if step == args.step:
                raise OSError(errno.ENOSPC, "No space left on device")
            write(self, metrics, step)

        JsonlLogger.log = full_disk
        env = DistEnv.from_env()
        return run_training(config(env, args.overrides), env)
    env = DistEnv.from_env()
    return run_training(config(env, args.overrides), env, FaultyTrainer)


if __name__ == "__main__":
    sys.exit(main())
