"""No host sync between logging steps (issue: a b64 GPU step is launch-bound, so reading a device
value back every step costs the overlap of host and device).

Without a GPU, the calls that force a device->host sync on CUDA tensors are counted instead:
`Tensor.item/tolist/__bool__/__float__/__int__/cpu` and `torch.cuda.synchronize`, when called
from simcse_dist's code. Reading a pinned host buffer after an event (state.StepFlags) is not
one of them: it is what replaces the per-step `flags.tolist()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA

import simcse_dist
from simcse_dist.config import load_config
from simcse_dist.train.trainer import Trainer

PACKAGE = str(Path(simcse_dist.__file__).parent)
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


@pytest.fixture
def sync_calls(monkeypatch):
    """A list that gets the name (and caller) of every sync-forcing call made from simcse_dist."""
    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                calls.append(f"{_name} in {Path(caller.co_filename).name}:{caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_no_host_sync_between_logging_steps(tiny_bert, tmp_path, single_process_group, sync_calls):
    """train.on_nonfinite=stop (the default). With skip, every step waits for its own agreement
    (StepFlags.read after post): the step cannot be skipped otherwise."""
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}",
            "train.global_batch_size=8",
            "train.max_steps=9",
            "log.every_steps=4",
            "checkpoint.every_steps=0",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, single_process_group)
    seen: list[tuple[int, bool, int]] = []  # (step, sync, calls so far when the step began)
    step_fn = trainer.train_step

    def recording(batches, stop, step, sync=True):
        seen.append((step, sync, len(sync_calls)))
        return step_fn(batches, stop, step, sync)

    trainer.train_step = recording
    trainer.train()
    assert [s for s, sync, _ in seen if sync] == [3, 7, 8]  # steps 4, 8 log; 9 is the last (and saves)
    # From the start of a step that does not sync to the start of the next step: the step, the
    # loop's cadence checks and the next batch's preparation. Not one sync-forcing call.
    between = {step: seen[i + 1][2] - calls for i, (step, sync, calls) in enumerate(seen[:-1]) if not sync}
    assert between and set(between.values()) == {0}, sync_calls
    # The counter works: the logging steps read the metrics back (MetricsWindow.summarize).
    assert any("summarize" in c for c in sync_calls)
