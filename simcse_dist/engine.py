"""The only `import deepspeed`: config dict from Config, initialize, grad norm, full weights.

Choices, and why:
- torch AdamW as a client optimizer (fused on CUDA): DeepSpeed's config optimizer would
  JIT-compile FusedAdam/CPUAdam, which fails or takes minutes on many machines.
- a client LambdaLR with HF's linear warmup/decay (what the official SimCSE code trains with),
  stepped by the engine after each optimizer step; its state is part of engine checkpoints.
- gradient clipping always set explicitly (DeepSpeed would default to 1.0).
- bf16: gradients are reduced over ranks in fp32 (`communication_data_type`), see below.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simcse_dist.config import Config, merge_dicts


def linear_schedule(total_steps: int, warmup_steps: int):
    """HF's get_linear_schedule_with_warmup as a LambdaLR factor of the optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return factor


@contextlib.contextmanager
def _zero_gather_deprecation():
    """DeepSpeed's ZeRO-1/2 step gathers the updated partitions with the
    `all_gather_into_tensor` that torch 2.13 marks deprecated: once per step and rank in the
    log otherwise. Only this warning, only around DeepSpeed's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")
        yield


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage the engine is built with: engine.zero_stage, unless engine.deepspeed_config
    sets zero_optimization.stage (checkpoints record it, checkpoint.py refuses another)."""
    user = json.loads(Path(cfg.engine.deepspeed_config).read_text()) if cfg.engine.deepspeed_config else {}
    return int((user.get("zero_optimization") or {}).get("stage", cfg.engine.zero_stage))


def select_accelerator() -> None:
    """Name DeepSpeed's accelerator before anything imports it (transformers' model modules do):
    on a machine without CUDA, DeepSpeed's public DS_ACCELERATOR override, else every rank warns
    "Setting accelerator to CPU" (our start-up line says the device once)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_process_group(rank: int, world_size: int, timeout_s: int) -> None:
    """Start the process group (nccl on GPUs, gloo on CPU) through DeepSpeed, which adopts it.
    collective: every rank calls this."""
    select_accelerator()
    import deepspeed
    import deepspeed.ops

    # On CPU DeepSpeed would JIT-compile its shared-memory comm op (1-2 min); gloo suffices.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=rank,
        world_size=world_size,
    )


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from ours (+ engine.deepspeed_config merged over it)."""
    micro = cfg.micro_batch_size(world_size)
    stage = zero_stage(cfg)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.engine.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.engine.precision == "bf16":
        # DeepSpeed reduces gradients in the model's dtype unless told otherwise: in bf16 (8-bit
        # mantissa) every add of the ring all-reduce / reduce-scatter rounds to ~3 significant
        # digits, so N ranks would no longer make the update of one process (the exactness
        # tests/train/test_grad_equivalence.py holds at fp32). fp32 reduction keeps it, for twice the
        # gradient bytes (at ZeRO-2/3 overlapped with the backward on GPUs). fp16 keeps
        # DeepSpeed's default (fp16: 11-bit mantissa and a loss scale that detects overflow).
        ds["communication_data_type"] = "fp32"
    if cfg.engine.deepspeed_config:
        ds = merge_dicts(ds, json.loads(Path(cfg.engine.deepspeed_config).read_text()))
    return ds


def compile_encoder(model: nn.Module) -> nn.Module:
    """engine.compile: torch.compile the transformer (`model.backbone`, where the FLOPs are; the
    whole module when it has none) in place, with `nn.Module.compile()`: parameters, hooks and
    state_dict keys stay the module's own (`torch.compile(module)` would wrap it and prefix every
    checkpoint and best/ key with `_orig_mod.`). Dynamic padding recompiles once, when the
    length first changes (then the graph is dynamic); eval mode compiles its own graph."""
    target = getattr(model, "backbone", None)
    (target if isinstance(target, nn.Module) else model).compile()
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases and LayerNorm weights (1-d tensors), as HF Trainer."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _undo_init_step(optimizer) -> None:
    """DeepSpeed's FP16 optimizers (ZeRO-0 bf16 and fp16) run one optimizer.step() with zero
    gradients at construction to create Adam's state: its step count then starts at 1, so the first
    real update uses step 2's bias corrections (0.74x the update of torch's AdamW, measured) and
    every later step is one off. ZeRO 1-3 create no state ahead. Empty state makes torch's AdamW
    start at step 1 at the first real update, as at fp32 and ZeRO 1-3 (checkpoints load into it)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_Optimizer | FP16_UnfusedOptimizer):
        optimizer.optimizer.state.clear()


class Engine:
    """Thin wrapper over a DeepSpeed engine: forward, backward, step and what we log."""

    def __init__(
        self, model: nn.Module, cfg: Config, world_size: int, total_steps: int, load_universal: bool = False
    ) -> None:
        """collective: deepspeed.initialize broadcasts the weights and builds ZeRO's groups."""
        import deepspeed

        if cfg.engine.compile:
            compile_encoder(model)
        warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            eps=cfg.optim.adam_eps,
            fused=True,  # CUDA and CPU kernels (torch >= 2.4); the loop version costs ~3% of a CPU step
        )
        self.ds_config = deepspeed_config(cfg, world_size)
        # ZeRO-0 fp32 hands DeepSpeed a plain torch optimizer, which computes no global norm; we
        # need the norm for logging anyway, so we clip there once (foreach) and tell DeepSpeed not
        # to compute it a second time.
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self._manual_norm = self.zero_stage == 0 and cfg.engine.precision == "fp32"
        self._clip = cfg.engine.gradient_clipping
        if self._manual_norm:
            self.ds_config["gradient_clipping"] = 0.0
        if load_universal:  # resuming a ZeRO checkpoint written at another world size
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        schedule = linear_schedule(total_steps, warmup)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
        )
        _undo_init_step(self.engine.optimizer)
        # One rank: DeepSpeed's gradient "all-reduce" would flatten, divide by 1 and copy back
        # every gradient (~30 ms of a 1.7 s MiniLM CPU step) for an identity; its public
        # no_sync() skips it (ZeRO-0 only: ZeRO-2/3 partition gradients in that reduction).
        self._no_sync = world_size == 1 and self._manual_norm
        # fp16 at ZeRO-0: DeepSpeed's engine.backward scales the loss only for ZeRO optimizers
        # (or torch autocast), while its FP16_(Unfused)Optimizer.step() still divides the
        # gradients by the loss scale: updates 2^16 times too small and a scale that only grows
        # (upstream PR #8393). We scale the loss by the optimizer's public `loss_scale` ourselves.
        self._scale_fp16 = cfg.engine.precision == "fp16" and self.zero_stage == 0
        self._last_norm: torch.Tensor | None = None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Add d loss / d theta to the gradients; `loss` is already this micro-step's exact share
        of the step (step.py divides by grad_accum), so DeepSpeed must not scale it again.
        After the `last` micro-step the gradients are complete (averaged over ranks); before it,
        engine.step() only advances DeepSpeed's micro-step counter."""
        if self._scale_fp16:
            loss = loss * self.engine.optimizer.loss_scale
        if self._no_sync:
            with self.engine.no_sync():
                self.engine.backward(loss, scale_wrt_gas=False)
        else:
            self.engine.backward(loss, scale_wrt_gas=False)
        if self._manual_norm and self.engine.is_gradient_accumulation_boundary():
            # Gradients are final here (averaged over ranks): the global norm before clipping.
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            if self._clip > 0:
                self._last_norm = torch.nn.utils.clip_grad_norm_(params, self._clip, foreach=True)
            else:
                self._last_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if not last:
            self.engine.step()

    def step(self) -> None:
        with _zero_gather_deprecation():
            self.engine.step()

    def drop_gradients(self) -> None:
        """Make the coming boundary step() change no weight (train.on_nonfinite=skip).

        ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers already skip a step whose gradient norm is
        not finite; the plain torch AdamW of ZeRO-0 fp32 skips parameters whose grad is None.
        """
        if self._manual_norm:
            for p in self.engine.module.parameters():
                p.grad = None
            self._last_norm = torch.tensor(float("nan"))

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """collective: every rank writes its shards."""
        self.engine.save_checkpoint(save_dir, tag=tag, save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str):
        """collective. Model, optimizer, LR schedule and loss scaler."""
        return self.engine.load_checkpoint(load_dir, tag=tag)

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step, before clipping (a host sync)."""
        if self._manual_norm:
            return None if self._last_norm is None else float(self._last_norm)
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def sync_lr(self) -> float:
        """Set the optimizer's learning rates to the schedule's value at the current step: after
        a resume with more total steps the restored rates are the old schedule's. Returns it."""
        sch = self.scheduler
        for group, base, factor in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas, strict=True):
            group["lr"] = base * factor(sch.last_epoch)
        return self.lr()

    def _fp32_masters(self) -> dict[int, torch.Tensor]:
        """id(module parameter) -> its fp32 master weight, for DeepSpeed's FP16 optimizers: ZeRO-0
        bf16 and fp16 wrap our torch AdamW in FP16_UnfusedOptimizer (FP16_Optimizer with a fused
        Adam), which keep the masters in `fp32_groups` (`fp32_groups_flat`) parallel to
        `fp16_groups` and link no `_hp_mapping`, so `safe_get_full_fp32_param` returns None for
        their parameters and the module's bf16/fp16 values are all that is left."""
        opt = self.engine.optimizer
        low = getattr(opt, "fp16_groups", None)
        if low is None:
            return {}
        if getattr(opt, "fp32_groups_flat", None) is not None:
            from torch._utils import _unflatten_dense_tensors

            high = [
                _unflatten_dense_tensors(flat, group) for flat, group in zip(opt.fp32_groups_flat, low, strict=True)
            ]
        elif getattr(opt, "fp32_groups", None) is not None:
            high = opt.fp32_groups
        else:
            return {}
        return {id(p): m for group, masters in zip(low, high, strict=True) for p, m in zip(group, masters, strict=True)}

    def full_state_dict(self, dst_rank: int | None = None) -> dict[str, torch.Tensor]:
        """fp32 master weights of every parameter (the optimizer's, not the bf16/fp16 module
        copies), gathered from ZeRO partitions, on CPU, plus the buffers.

        dst_rank: None, every rank returns the copy; r, only rank r does and the others return {}
        after joining every gather (under ZeRO-3 one full fp32 CPU copy per job, not per rank).
        collective: every rank calls this (ZeRO 1-3 assemble partitions with all-reduces /
        all-gathers, parameter by parameter).
        """
        from deepspeed.utils import safe_get_full_fp32_param

        keep = dst_rank is None or self.engine.global_rank == dst_rank
        masters = self._fp32_masters()
        state = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective at ZeRO 1-3
            if not keep:
                continue
            if full is None:
                full = masters.get(id(p), p.data)
            state[name] = full.detach().float().cpu().clone()
        if keep:
            for name, buf in self.engine.module.named_buffers():
                state[name] = buf.detach().cpu().clone()
        return state
