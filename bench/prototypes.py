"""Prototypes of engine changes, applied to a live Trainer so they can be measured side by side
with the unchanged trainer in bench/throughput.py (`--impls simcse-z0+fused+noar+clip1,...`).

Nothing here edits simcse_dist; each patch is the smallest runtime equivalent of a proposed
source change in simcse_dist/engine.py (see bench/RESULTS.md for the measured gains):

- fused: `torch.optim.AdamW(..., fused=True)` on CPU too, not only on CUDA. torch >= 2.4 has a
  fused CPU kernel: one pass over each parameter instead of ~10 elementwise ops, each of which
  allocates a temporary (for the flat ZeRO partitions, a 91 MB page-faulting allocation).
- noar: at world size 1 (ZeRO-0) skip DeepSpeed's gradient all-reduce, an identity that still
  flattens every gradient into one buffer (torch.cat), divides by 1, calls gloo and copies the
  buffer back (`engine.enable_backward_allreduce = False`).
- clip1: clip once with `torch.nn.utils.clip_grad_norm_(foreach=True)` and keep the norm it
  returns for logging, instead of computing the norm twice (Engine.backward's manual norm for
  logging, then DeepSpeed's per-parameter clip_grad_norm_ with an extra all-reduce). ZeRO-0
  fp32 only (DeepSpeed's ZeRO and bf16 optimizers clip themselves); the gradients are already
  averaged over ranks at that point, so the local norm is the global one.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# DeepSpeed JSON snippets (merged through engine.deepspeed_config, a user-level knob, no code change)
DS_PATCHES: dict[str, dict] = {
    "nocontig": {"zero_optimization": {"contiguous_gradients": False}},
    "bigbucket": {"zero_optimization": {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}},
}
PATCHES = ("fused", "noar", "clip1", "partition", *DS_PATCHES)


@contextlib.contextmanager
def fused_adamw():
    """Build-time patch: every torch.optim.AdamW created inside gets fused=True."""
    original = torch.optim.AdamW

    @functools.wraps(original)
    def make(*args, **kwargs):
        kwargs["fused"] = True
        return original(*args, **kwargs)

    torch.optim.AdamW = make
    try:
        yield
    finally:
        torch.optim.AdamW = original


def deepspeed_overrides(patches: list[str], work_dir, stage: int = 0) -> list[str]:
    """Config overrides for the DeepSpeed-JSON patches (written to work_dir). `partition` sets
    zero_optimization.stage explicitly, which makes the engine build ZeRO-1/2 even with one rank
    (engine.built_zero_stage otherwise builds stage 0 there): the DeepSpeed ZeRO-1/2 overhead."""
    import json
    from pathlib import Path

    merged: dict = {"zero_optimization": {"stage": stage}} if "partition" in patches else {}
    for name in patches:
        for section, values in DS_PATCHES.get(name, {}).items():
            merged.setdefault(section, {}).update(values)
    if not merged:
        return []
    path = Path(work_dir) / "deepspeed-overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged))
    return [f"engine.deepspeed_config={path}"]


def apply(trainer, patches: list[str]) -> None:
    """Run-time patches on a built Trainer (fused is applied at build time, see fused_adamw)."""
    engine = trainer.engine
    ds = engine.engine
    plain_fp32_z0 = engine.zero_stage == 0 and getattr(engine, "_manual_norm", False)
    if "noar" in patches:
        if engine.zero_stage != 0 or trainer.env.world_size != 1:
            raise ValueError("noar: only at ZeRO-0 and world size 1 (the all-reduce is an identity there)")
        ds.enable_backward_allreduce = False
    if "clip1" in patches:
        if not plain_fp32_z0:
            raise ValueError("clip1: only ZeRO-0 fp32 (other optimizers clip themselves)")
        max_norm = float(ds._config.gradient_clipping)
        ds._config.gradient_clipping = 0.0  # DeepSpeed no longer clips ...
        params = [p for p in ds.module.parameters() if p.requires_grad]

        def backward(loss, scale_wrt_gas=True):
            ds.backward(loss, scale_wrt_gas=scale_wrt_gas)  # ... and no manual norm here

        def step():
            if ds.is_gradient_accumulation_boundary():
                grads_present = [p for p in params if p.grad is not None]
                if max_norm > 0:
                    engine._last_norm = torch.nn.utils.clip_grad_norm_(grads_present, max_norm, foreach=True)
                else:
                    engine._last_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                        [p.grad for p in grads_present])))
            ds.step()

        engine.backward, engine.step = backward, step


def check(steps: int = 5) -> int:
    """Same updates with and without the patches: tiny BERT, dropout 0, lr 1e-3, ZeRO-0 (and
    ZeRO-2 for fused), gradient clipping 1.0 and 0.05 (both clip on every step here).

    The attention key biases are left out of the comparison: their true gradient is exactly
    0 (softmax is invariant to a constant added to a row's logits), so Adam turns rounding
    noise into lr-sized steps there in any two implementations that round differently.
    """
    import os
    import sys
    import tempfile
    from pathlib import Path

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import materialize_model, quiet_libraries

    from simcse_dist.config import load_config
    from simcse_dist.distributed import DistEnv, init_distributed
    from simcse_dist.preempt import StopRequest
    from simcse_dist.trainer import Trainer

    quiet_libraries()
    init_distributed(DistEnv.from_env(), 600)
    data = Path(__file__).resolve().parents[1] / "data" / "demo" / "wiki-demo.txt"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = materialize_model("tiny", Path(tmp))

        def run(stage: int, patches: list[str], clip: float):
            out = Path(tmp) / f"z{stage}-{'-'.join(patches)}-{clip}"
            cfg = load_config(None, [f"model.name_or_path={model_dir}", "model.dropout=0", f"data.train_file={data}",
                                     "train.global_batch_size=16", f"train.max_steps={steps}", f"train.output_dir={out}",
                                     f"engine.zero_stage={stage}", f"engine.gradient_clipping={clip}", "optim.lr=1e-3",
                                     "log.wandb_mode=disabled"])
            with fused_adamw() if "fused" in patches else contextlib.nullcontext():
                trainer = Trainer(cfg, DistEnv.from_env(), quiet=True)
            apply(trainer, patches)
            stop, norms = StopRequest(check_file=False), []
            for step, micro in trainer.sampler.iter_steps(0, steps):
                trainer.train_step(micro, stop, step)
                norms.append(trainer.engine.grad_norm())
            return {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}, norms

        def rel(a: dict, b: dict) -> float:
            return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b if "key.bias" not in k)

        print(f"max relative weight difference to the unpatched trainer after {steps} steps")
        for stage, clip, patches in [(0, 1.0, ["noar", "clip1"]), (0, 0.05, ["noar", "clip1"]), (0, 1.0, ["fused"]),
                                     (0, 1.0, ["fused", "noar", "clip1"]), (2, 1.0, ["fused"])]:
            ref, ref_norms = run(stage, [], clip)
            new, new_norms = run(stage, patches, clip)
            norm_diff = max(abs(a - b) / b for a, b in zip(new_norms, ref_norms, strict=True) if a is not None)
            print(f"  ZeRO-{stage} clip {clip:<5} +{'+'.join(patches):<18} weights {rel(new, ref):.1e}  "
                  f"logged grad norms {norm_diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(check())
