"""The run's resumable state, as small objects with state_dict() / load_state_dict() that the
checkpoint manager saves and restores (torchtitan's Stateful): RNG streams, the metrics window
between two logging steps, and the run's progress. The one pair of RNG helpers lives here."""

from __future__ import annotations

import random
import time
from typing import Any, Protocol

import numpy as np
import torch

from . import distributed as du


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


class MetricsWindow:
    """train/* sums between two logging steps, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self.loss = torch.zeros((), device=self.device)
        self.masked = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, masked: torch.Tensor | None) -> None:
        """One optimizer step's loss (this rank's) and masked-negative count."""
        self.loss += loss
        self.steps += 1
        if masked is not None:
            self.masked += masked

    def summarize(self, lr: float, grad_norm: float | None, global_batch_size: int, masked: bool) -> dict[str, float]:
        """train/* over the steps since the last log, then reset. collective: all-reduces loss
        and tokens (a host sync point, only on logging steps)."""
        # Each rank's loss is the mean over its local anchors, so the mean over ranks is the
        # mean over the global batch.
        stats = torch.stack([self.loss / max(self.steps, 1), torch.tensor(float(self.tokens), device=self.device),
                             self.masked.float()])
        loss = float(du.all_reduce_mean(stats[:1])[0])
        tokens, masked_sum = (float(x) for x in du.all_reduce_sum(stats[1:]))
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        metrics = {"train/loss": loss if self.steps else float("nan"), "train/lr": lr}
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics["train/sentences_per_s"] = self.steps * global_batch_size / elapsed
        metrics["train/tokens_per_s"] = tokens / elapsed
        if masked:  # (anchor, candidate) pairs masked as false negatives, per step
            metrics["train/masked_negatives"] = masked_sum / max(self.steps, 1)
        self.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "loss": float(self.loss), "masked": int(self.masked)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.tokens = state["steps"], state["tokens"]
        self.loss = torch.tensor(state["loss"], device=self.device)
        self.masked = torch.tensor(state.get("masked", 0), device=self.device)
