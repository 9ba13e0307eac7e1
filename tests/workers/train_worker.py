"""Run under torchrun: full Trainer.train() runs for several ZeRO stages in one process group,
each into <out>/z<stage>, so a test pays the process start-up once."""

import argparse

from harness import process_group, trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with process_group() as env:
        for stage in map(int, args.stages.split(",")):
            trainer(
                env, [*args.overrides, f"engine.zero_stage={stage}", f"train.output_dir={args.out}/z{stage}"]
            ).train()


if __name__ == "__main__":
    main()
