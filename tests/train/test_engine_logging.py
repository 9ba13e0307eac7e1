"""Generated DeepSpeed config, the LR schedule, and the metric sinks."""

from __future__ import annotations

import json
import logging

import pytest

from simcse_dist.config import load_config
from simcse_dist.engine import deepspeed_config, linear_schedule
from simcse_dist.train.sinks import MetricsLogger


def test_deepspeed_config_from_ours_and_expert_merge(tmp_path):
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "steps_per_print": 7}))
    cfg = load_config(
        None,
        [
            "train.global_batch_size=64",
            "train.grad_accum=2",
            "engine.zero_stage=2",
            "engine.precision=bf16",
            "engine.gradient_clipping=0",
            f"engine.deepspeed_config={expert}",
        ],
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        8,
        2,
    )
    assert ds["gradient_clipping"] == 0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 12345
    assert ds["steps_per_print"] == 7
    assert "optimizer" not in ds and "scheduler" not in ds  # client AdamW + LambdaLR: nothing JIT-built


def test_linear_schedule_is_hf_linear_warmup_decay():
    f = linear_schedule(total_steps=10, warmup_steps=2)
    assert [round(f(s), 4) for s in range(11)] == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    g = linear_schedule(total_steps=4, warmup_steps=0)  # the paper: no warmup, first step at full lr
    assert [g(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.slow
def test_offline_wandb_without_key_and_jsonl(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "out"))
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'out'}", "log.wandb_mode=online"])
    with caplog.at_level(logging.INFO, logger="simcse_dist"):
        logger = MetricsLogger(cfg, is_main=True)
        logger.log({"train/loss": 1.5, "train/lr": 3e-5}, step=10)
        logger.close()
    assert any("logging offline" in s for s in caplog.messages)
    assert "step 10: train/loss=1.5  train/lr=3e-05" in caplog.messages
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text()) == {
        "step": 10,
        "train/loss": 1.5,
        "train/lr": 3e-5,
    }
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_non_main_ranks_write_nothing(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "log.wandb_mode=offline"])
    logger = MetricsLogger(cfg, is_main=False)
    logger.log({"train/loss": 1.0}, step=1)
    logger.close()
    assert not any(tmp_path.iterdir())


def test_deepspeed_details_the_engine_relies_on(tiny_bert, single_process_group):
    """Pinned because engine.py depends on them: (1) the name of DeepSpeed's shared-memory comm op
    in `deepspeed.ops.__compatible_ops__` (init_process_group disables it, else every CPU start
    JIT-compiles it for 1-2 min); (2) at one rank, ZeRO-0 fp32, the public `engine.no_sync()`
    skips DeepSpeed's identity gradient all-reduce, and the gradient is plain autograd's."""
    import deepspeed.ops
    import torch

    from simcse_dist.engine import Engine
    from simcse_dist.model.encoder import Encoder

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "model.dropout=0",
            "train.global_batch_size=4",
            "engine.gradient_clipping=0",
        ],
    )
    torch.manual_seed(0)
    reference = Encoder.from_config(cfg.model)
    torch.manual_seed(0)
    engine = Engine(Encoder.from_config(cfg.model), cfg, world_size=1, total_steps=2)
    calls = []
    engine.engine.allreduce_gradients = lambda *a, **k: calls.append(1)
    ids = torch.randint(1000, 2000, (4, 2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    engine.backward(engine(**inputs).square().mean())
    reference(**inputs).square().mean().backward()
    assert calls == []
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_fp16_at_zero0_scales_the_loss_deepspeed_does_not(monkeypatch):
    """fp16 needs a GPU, so this pins the premise in DeepSpeed's source and checks our side with a
    stand-in engine: DeepSpeed's backward scales the loss only for ZeRO optimizers (its fp16
    stage-0 optimizers are not ZeRO ones, yet their step() unscales by `loss_scale`), so
    Engine.backward must multiply by the optimizer's loss_scale itself."""
    import inspect

    import deepspeed.runtime.engine as ds_engine
    import torch
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from simcse_dist.engine import Engine

    source = inspect.getsource(ds_engine)  # backward is wrapped by an nvtx decorator without functools.wraps
    body = source[source.index("    def backward(self, loss") :]
    body = body[: body.index("\n    def ", 10)]
    assert "loss = self.optimizer.scale_if_loss(loss)" in body and "isinstance(self.optimizer, ZeROOptimizer)" in body
    assert not issubclass(FP16_Optimizer, ZeROOptimizer) and not issubclass(FP16_UnfusedOptimizer, ZeROOptimizer)
    assert isinstance(FP16_UnfusedOptimizer.loss_scale, property)

    seen = []

    class StandIn:  # what Engine.backward touches of a DeepSpeed engine
        optimizer = type("Opt", (), {"loss_scale": 65536.0})()

        def backward(self, loss, scale_wrt_gas):
            seen.append(float(loss))

        def is_gradient_accumulation_boundary(self):
            return True

    engine = Engine.__new__(Engine)
    engine.engine, engine._no_sync, engine._manual_norm = StandIn(), False, False
    for fp16, expected in ((True, 2.0 * 65536), (False, 2.0)):
        engine._scale_fp16 = fp16
        engine.backward(torch.tensor(2.0))
        assert seen.pop() == expected
