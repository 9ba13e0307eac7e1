"""Resumable checkpoints that survive crashes, and the output-dir guard.

Layout: <output_dir>/checkpoints/step-00000040/
    engine/                DeepSpeed engine state (model, optimizer, LR schedule, loss scaler)
    rng-rank{r}.pt         each rank's RNG states (dropout is the augmentation in unsup SimCSE)
    trainer_state.json     step, best score and step, world size, the current logging window
    COMPLETE               written last; a directory without it is ignored

A checkpoint is written into `step-N.tmp/` and renamed when every rank has finished, so a
crash mid-write leaves the previous checkpoint as the newest complete one. The newest
`keep_last` are kept; `best/` (the exported best model) lives outside and is never rotated.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import distributed as du
from .config import Config, ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
UNIVERSAL_TAG = "engine_universal"
# Keys that may change between attempts of one run without changing what is trained.
_MAY_DIFFER = ("log.", "eval.every_steps", "eval.batch_size", "checkpoint.", "engine.dist_timeout_s",
               "train.overwrite", "train.on_nonfinite")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(cfg: Config, saved_path: Path) -> list[str]:
    """Keys (with old -> new values) where `cfg` differs from the config saved in a run dir."""
    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    except (OSError, yaml.YAMLError) as e:
        return [f"(unreadable {saved_path}: {e})"]
    now = _flatten(cfg.to_dict())
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith(_MAY_DIFFER):
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return diffs


def check_output_dir(cfg: Config) -> list[str]:
    """Refuse to mix two different runs in one output dir (before any process group starts).

    Returns the differences when `train.overwrite` allows starting over, else raises.
    """
    saved = Path(cfg.train.output_dir) / "config.yaml"
    if not saved.exists():
        return []
    diffs = config_differences(cfg, saved)
    if diffs and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir: {cfg.train.output_dir} holds a run with a different config "
            f"({'; '.join(diffs)}); use another output_dir, or train.overwrite=true to discard that run"
        )
    return diffs


def discard_run(out: Path) -> None:
    """What train.overwrite=true removes: the other run's checkpoints, metrics and best model."""
    for name in ("checkpoints", "best", "best.tmp", "best.old"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml", ".wandb_id"):
        (out / name).unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
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


class CheckpointManager:
    def __init__(self, out_dir: Path, keep_last: int, rank: int) -> None:
        self.root = out_dir / "checkpoints"
        self.keep_last, self.rank = keep_last, rank

    def complete(self) -> list[tuple[int, Path]]:
        found = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                m = _STEP_DIR.match(d.name)
                if m and (d / COMPLETE).exists():
                    found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        """collective: every rank calls this. Atomic: visible only once complete."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
            tmp.mkdir(parents=True)
        du.barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        du.barrier()  # every rank's shards and RNG are on disk
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            with open(tmp / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._rotate()
        du.barrier()
        return final

    def _rotate(self) -> None:
        for _, d in self.complete()[: -self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def saved_world_size(path: Path) -> int:
        return json.loads((path / "trainer_state.json").read_text())["world_size"]

    def to_universal(self, path: Path) -> None:
        """Convert the ZeRO-partitioned engine state to DeepSpeed's universal format (rank 0 runs
        deepspeed.checkpoint.ds_to_universal once), so another world size can load it.
        collective: every rank calls this."""
        target = path / UNIVERSAL_TAG
        if self.rank == 0 and not (target / COMPLETE).exists():
            tmp = path / f"{UNIVERSAL_TAG}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(path / "engine"), "--output_folder", str(tmp), "--num_extract_workers", "1",
                 "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{path}: converting to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
            (tmp / COMPLETE).write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        du.barrier()

    def load(self, engine, path: Path, world_size: int, universal: bool = False) -> dict[str, Any]:
        """collective: every rank calls this. Returns the trainer state saved with it."""
        state = json.loads((path / "trainer_state.json").read_text())
        if universal:
            self.to_universal(path)
        load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG if universal else "engine")
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the engine state")
        rng_file = path / f"rng-rank{self.rank}.pt"
        if state["world_size"] == world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state
