"""Run under torchrun: one optimizer step's gradients from the real trainer path.

For every objective x ZeRO stage x grad_accum asked for, builds a Trainer, runs
`forward_backward` on one step and writes rank 0's assembled fp32 gradients (after DeepSpeed's
reduction, before the optimizer step) to <out>/grads-<objective>-z<stage>-a<accum>.pt.

One case is given by the arguments, or `--cases FILE` names a JSON list of such argument lists,
run one after another in one process group (a launch's start-up is most of a case's cost); rank
0 prints "case <out>" before each, so a test can split the log by case.
"""

import argparse
import json
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad
from harness import process_group, trainer


def official_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As princeton-nlp/SimCSE's models.py: all_gather without grad, then the local tensor put
    back in its slot, so gradients reach only this rank's own rows (no cross-rank terms)."""
    parts = [torch.zeros_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[torch.distributed.get_rank()] = x
    return torch.cat(parts)


def case_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--objectives", default="unsup,sup")
    p.add_argument("--grad-accums", default="1")
    p.add_argument("--data-unsup", required=True)
    p.add_argument("--data-sup", required=True)
    p.add_argument("--hard-negative-weight", type=float, default=0.0)
    p.add_argument("--step", type=int, default=0, help="which step's gradients (the last may be short)")
    p.add_argument("overrides", nargs="*")
    return p


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)  # the rest is a case's
    p.add_argument("--cases", help="JSON file: a list of argument lists, one case each")
    p.add_argument(
        "--no-grad-gather",
        action="store_true",
        help="the official SimCSE code's gather (test of the test): no gradient across ranks",
    )
    p.add_argument(
        "--random-lora-b",
        action="store_true",
        help="LoRA: draw the B factors (peft starts them at 0, where A's gradient is 0) as helpers.randomize_lora_b",
    )
    args, rest = p.parse_known_args()
    argvs = json.loads(Path(args.cases).read_text()) if args.cases else [rest]
    cases = [case_parser().parse_args(argv) for argv in argvs]
    if args.no_grad_gather:
        import simcse_dist.train.objective

        # the name the objective layer calls (a test pins that the swap changes the gradients)
        simcse_dist.train.objective.gather_with_grad = official_gather_with_grad
    if args.random_lora_b:
        from helpers import randomize_lora_b

        import simcse_dist.train.trainer

        build = simcse_dist.train.trainer.Encoder.from_config
        simcse_dist.train.trainer.Encoder.from_config = lambda cfg, **kw: randomize_lora_b(build(cfg, **kw))
    with process_group() as env:
        for case in cases:
            if env.is_main:
                print(f"case {case.out}", flush=True)
            run_case(env, case)


def run_case(env, case: argparse.Namespace) -> None:
    out = Path(case.out)
    for objective in case.objectives.split(","):
        data = case.data_unsup if objective == "unsup" else case.data_sup
        hnw = case.hard_negative_weight if objective == "sup" else 0.0
        for accum in map(int, case.grad_accums.split(",")):
            for stage in map(int, case.stages.split(",")):
                name = f"{objective}-z{stage}-a{accum}"
                run = trainer(
                    env,
                    [
                        *case.overrides,
                        f"train.objective={objective}",
                        f"data.train_file={data}",
                        f"loss.hard_negative_weight={hnw}",
                        f"train.grad_accum={accum}",
                        f"engine.zero_stage={stage}",
                        f"train.output_dir={out}/run-{name}",
                    ],
                )
                run.setup()
                _, batches = next(run.data.steps(case.step, case.step + 1, run.engine.device))
                loss = run.forward_backward(batches).loss
                # collective under ZeRO-3: every rank assembles every gradient (of what trains)
                grads = {
                    n: safe_get_full_grad(q).detach().float().cpu().clone()
                    for n, q in run.engine.module.named_parameters()
                    if q.requires_grad
                }
                mean_loss = loss.clone()  # ranks hold equal numbers of anchors: the mean is the global loss
                torch.distributed.all_reduce(mean_loss)
                mean_loss = float(mean_loss) / env.world_size
                if env.is_main:
                    torch.save({"grads": grads, "rank0_loss": float(loss), "loss": mean_loss}, out / f"grads-{name}.pt")


if __name__ == "__main__":
    main()
