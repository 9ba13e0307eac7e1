"""Run under torchrun: full Trainer.train() runs for several ZeRO stages in one process group,
each into <out>/z<stage>, so a test pays the process start-up once."""

import argparse

from simcse_dist import distributed as du
from simcse_dist.config import load_config
from simcse_dist.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    env = du.DistEnv.from_env()
    du.init_distributed(env, timeout_s=120)
    for stage in map(int, args.stages.split(",")):
        cfg = load_config(None, [*args.overrides, f"engine.zero_stage={stage}", f"train.output_dir={args.out}/z{stage}"])
        cfg.validate(env.world_size)
        Trainer(cfg, env).train()
    du.teardown()


if __name__ == "__main__":
    main()
