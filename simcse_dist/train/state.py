"""The run's resumable state, as small objects with state_dict() / load_state_dict() that the
checkpoint manager saves and restores (torchtitan's Stateful): RNG streams, the metrics window
between two logging steps, and the run's progress. The one pair of RNG helpers lives here."""

from __future__ import annotations

import random
import time
from typing import Any, Protocol

import numpy as np
import torch

from simcse_dist import distributed as du


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state() -> dict[str, Any]:
    """Every generator this process draws from: torch (dropout), CUDA, Python, numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngStreams:
    """This rank's generators: dropout is SimCSE's augmentation, so an exact resume restores them.
    Saved per rank (binary); restored only at the world size that wrote them."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class NonFiniteLossError(RuntimeError):
    """train/loss became NaN/Inf and train.on_nonfinite=stop."""


class StepFlags:
    """Did any rank see a non-finite loss, or get a stop request? Agreed every step without a host
    sync: the all-reduce runs on the device and its result is copied into pinned host memory
    behind an event, to be read one step later (the copy has long finished) or at once on a step
    that syncs anyway (log, eval, checkpoint). The first non-finite step is kept on the device,
    so a lagged read still names it."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._host = torch.tensor([0, 0, -1], dtype=torch.long, pin_memory=cuda)  # bad, stop, first bad step
        self._view = self._host.numpy()  # reads the host buffer without a torch sync call
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._event = torch.cuda.Event() if cuda else None

    def post(self, loss: torch.Tensor, stop: bool, step: int) -> None:
        """Enqueue this step's agreement. collective."""
        bad = (~torch.isfinite(loss)).long()
        flags = du.all_reduce_max(torch.stack([bad, bad.new_full((), int(stop))]))
        self._first_bad = torch.where((self._first_bad < 0) & (flags[0] > 0), step, self._first_bad)
        self._host.copy_(torch.cat([flags, self._first_bad.view(1)]), non_blocking=True)
        if self._event is not None:
            self._event.record()

    def read(self) -> tuple[bool, bool, int | None]:
        """(the last posted step was non-finite on some rank, some rank asked to stop, the first
        non-finite step or None), as of the last `post`."""
        if self._event is not None:
            self._event.synchronize()  # waits for that point of the stream only
        bad, stop, first = (int(x) for x in self._view)
        return bool(bad), bool(stop), (None if first < 0 else first)


class MetricsWindow:
    """train/* sums between two logging steps, kept on the device (no host sync per step). With
    several training sources (`names`), also train/loss/<name> and data/steps/<name>, the steps
    drawn from each source since step 0 (`drawn`, set from the schedule when the run starts)."""

    def __init__(self, device: torch.device, names: list[str] | None = None) -> None:
        self.device, self.names = device, names or []
        self.num_sources = max(1, len(self.names))
        self.drawn = [0] * self.num_sources
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.source_steps = [0] * self.num_sources
        self.tokens = 0
        self.loss = torch.zeros(self.num_sources, device=self.device)
        self.masked = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, masked: torch.Tensor | None, source: int = 0) -> None:
        """One optimizer step's loss (this rank's) and masked-negative count."""
        self.loss[source] += loss
        self.steps += 1
        self.source_steps[source] += 1
        if masked is not None:
            self.masked += masked

    def summarize(self, lr: float, grad_norm: float | None, global_batch_size: int, masked: bool) -> dict[str, float]:
        """train/* over the steps since the last log, then reset. collective: all-reduces loss
        and tokens (a host sync point, only on logging steps)."""
        # Each rank's loss is the mean over its local anchors, so the mean over ranks is the
        # mean over the global batch.
        counts = torch.tensor([max(self.steps, 1), *(max(n, 1) for n in self.source_steps)], dtype=torch.float)
        means = torch.cat([self.loss.sum().view(1), self.loss]) / counts.to(self.device)
        stats = torch.cat([means, torch.tensor([float(self.tokens)], device=self.device), self.masked.float().view(1)])
        losses = du.all_reduce_mean(stats[:-2]).tolist()
        tokens, masked_sum = du.all_reduce_sum(stats[-2:]).tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        metrics = {"train/loss": losses[0] if self.steps else float("nan"), "train/lr": lr}
        for name, n, value, drawn in zip(self.names, self.source_steps, losses[1:], self.drawn, strict=False):
            metrics[f"data/steps/{name}"] = drawn
            if n:
                metrics[f"train/loss/{name}"] = value
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics["train/sentences_per_s"] = self.steps * global_batch_size / elapsed
        metrics["train/tokens_per_s"] = tokens / elapsed
        if masked:  # (anchor, candidate) pairs masked as false negatives, per step
            metrics["train/masked_negatives"] = masked_sum / max(self.steps, 1)
        self.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "source_steps": self.source_steps,
            "tokens": self.tokens,
            "loss": self.loss.tolist(),
            "masked": int(self.masked),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.tokens = state["steps"], state["tokens"]
        self.source_steps = list(state["source_steps"])
        self.loss = torch.tensor(state["loss"], device=self.device)
        self.masked = torch.tensor(state["masked"], device=self.device)
