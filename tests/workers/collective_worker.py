"""Run under torchrun (gloo): train with every torch.distributed collective wrapped, recording
the tensors that *our* code hands them (the direct caller is simcse_dist/train/gather.py,
simcse_dist/distributed.py, or torch.distributed.nn.functional, which only our gather uses:
its forward all-gather and its backward: reduce-scatter on nccl, scatters on gloo), for
tests/train/test_gpu_risks.py. DeepSpeed's own collectives are left out (their caller is DeepSpeed).

Modes:
  train <out> <overrides...>  Trainer.train() with the overrides; writes <out>/calls-rank{r}.json:
                              the engine device and, per recorded call, op, caller, devices,
                              contiguity and dtypes of its tensors.
  state <out> <model dir>     ZeRO-3 fp32, no step: Engine.full_state_dict(dst_rank=0) on every
                              rank (rank 0 saves its copy to <out>/state-rank0.pt, rank 1 the
                              number of keys it got), and the default (every rank) for contrast.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from harness import process_group, trainer

from simcse_dist.config import load_config

OPS = (
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "broadcast",
)
OURS = (
    "simcse_dist/train/gather.py",
    "simcse_dist/distributed.py",
    "simcse_dist/eval/encode.py",
    "simcse_dist/train/step.py",
    "simcse_dist/train/objective.py",
    "simcse_dist/train/trainer.py",
    "simcse_dist/train/state.py",
    "torch/distributed/nn/functional.py",
)


def tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in [*args, *kwargs.values()]:
        if torch.is_tensor(a):
            out.append(a)
        elif isinstance(a, list | tuple):
            out += [t for t in a if torch.is_tensor(t)]
    return out


def install(calls: list[dict]) -> None:
    for op in OPS:
        original = getattr(dist, op)

        def wrapper(*args, _op=op, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            where = next((o for o in OURS if caller.endswith(o)), None)
            if where is not None:
                ts = tensors(args, kwargs)
                calls.append(
                    {
                        "op": _op,
                        "caller": where,
                        "devices": sorted({str(t.device) for t in ts}),
                        "contiguous": all(t.is_contiguous() for t in ts),
                        "dtypes": sorted({str(t.dtype) for t in ts}),
                        "n": len(ts),
                    }
                )
            return _original(*args, **kwargs)

        setattr(dist, op, wrapper)


def train(out: Path, overrides: list[str]) -> None:
    from simcse_dist.train.objective import Objective

    with process_group() as env:
        calls: list[dict] = []
        install(calls)
        padded = []  # real rows of each loss call that had padding on this rank
        loss_call = Objective.__call__

        def counting(self, z, row_valid=None, ids=None, guide=None, teacher=None):
            if row_valid is not None and not bool(row_valid.all()):
                padded.append(int(row_valid.sum()))
            return loss_call(self, z, row_valid, ids, guide, teacher)

        Objective.__call__ = counting
        run = trainer(env, overrides)
        run.train()
        record = {
            "engine_device": str(run.engine.device),
            "calls": calls,
            "overlap_comm": run.engine.ds_config["zero_optimization"].get("overlap_comm"),
            "stage": run.engine.zero_stage,
            "padded_real_rows": padded,
        }
        (out / f"calls-rank{env.rank}.json").write_text(json.dumps(record))


def state(out: Path, model: str) -> None:
    from simcse_dist.engine import Engine
    from simcse_dist.model.encoder import Encoder

    with process_group() as env:
        cfg = load_config(
            None, [f"model.name_or_path={model}", "model.dropout=0", "train.global_batch_size=4", "engine.zero_stage=3"]
        )  # no data: the engine alone
        torch.manual_seed(0)  # the MLP head's initial weights, as in the test's reference
        engine = Engine(Encoder.from_config(cfg.model), cfg, env.world_size, total_steps=1)
        mine = engine.full_state_dict(dst_rank=0)
        everyone = engine.full_state_dict()
        if env.rank == 0:
            torch.save(mine, out / "state-rank0.pt")
        (out / f"keys-rank{env.rank}.json").write_text(json.dumps({"dst0": len(mine), "all": len(everyone)}))


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    {"train": lambda: train(Path(out), rest), "state": lambda: state(Path(out), rest[0])}[mode]()
