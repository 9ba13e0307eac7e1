"""engine.compile: torch.compile of the encoder's transformer changes no number and no key.

The reference is the same engine without compile (eager PyTorch); a tiny BERT with dropout 0 and
three optimizer steps on fixed batches of one shape (one compile, no dynamic-shape recompile).
On CPU, torch.compile's inductor backend writes C++ and needs a C++ compiler: without one the
test is skipped (a CI machine with g++ or clang++ runs it).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from simcse_dist.config import load_config
from simcse_dist.data.batch import Batch
from simcse_dist.engine import Engine
from simcse_dist.model.encoder import Encoder
from simcse_dist.train.objective import Objective, ObjectiveSpec
from simcse_dist.train.step import forward_backward

CXX = os.environ.get("CXX") or next((c for c in ("g++", "clang++") if shutil.which(c)), None)


def train(tiny_bert, compile_: bool, batches: list[Batch]) -> tuple[list[float], Engine]:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "model.dropout=0",
            "train.global_batch_size=4",
            "optim.lr=1e-3",
            f"engine.compile={str(compile_).lower()}",
        ],
    )
    torch.manual_seed(0)
    engine = Engine(Encoder.from_config(cfg.model), cfg, world_size=1, total_steps=len(batches))
    engine.train()
    losses = []
    for batch in batches:
        result = forward_backward(
            [batch], lambda inputs: engine(**inputs), engine.backward, Objective(ObjectiveSpec(0.05)), False
        )
        engine.step()
        losses.append(float(result.loss))
    return losses, engine


@pytest.mark.skipif(
    CXX is None, reason="torch.compile on CPU (inductor) needs a C++ compiler: none of $CXX, g++, clang++ found"
)
def test_compile_keeps_losses_and_state_dict_keys(tiny_bert, single_process_group):
    import torch._dynamo

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(1000, 2000, (4, 2, 8), generator=g)
        batches.append(Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    eager, eager_engine = train(tiny_bert, False, batches)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, engine = train(tiny_bert, True, batches)
    keys = list(eager_engine.module.state_dict())
    assert not [k for k in engine.module.state_dict() if "_orig_mod" in k]
    assert list(engine.module.state_dict()) == keys  # what DeepSpeed checkpoints
    assert list(engine.full_state_dict()) == list(eager_engine.full_state_dict())  # what best/ is written from
    # compile really happened: dynamo captured frames and the transformer holds a compiled call
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0
    assert engine.module.backbone._compiled_call_impl is not None
    assert eager_engine.module.backbone._compiled_call_impl is None
    for a, b in zip(compiled, eager, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled, eager)
    torch._dynamo.reset()
