"""Resumable checkpoints: what is saved, when, and how it is loaded back.

Layout: <output_dir>/checkpoints/step-00000040/
    engine/              DeepSpeed's engine checkpoint (model, optimizer, LR schedule, loss scaler),
                         written and read only through engine.save_checkpoint / load_checkpoint
    rng-rank{r}.pt       each rank's RNG states (dropout is the augmentation in unsup SimCSE)
    trainer_state.json   format, step, world size, ZeRO stage, global batch, and the state_dict()
                         of every registered part (the metrics window, the best dev score, ...)
    COMPLETE             written last; a directory without it is ignored
    engine_universal/    DeepSpeed's universal checkpoint, made on resume at another world size

A checkpoint is written into `step-N.tmp/` and published (fsutil) once every rank has finished,
so a crash mid-write leaves the previous checkpoint as the newest complete one. The manager
owns the cadence (`due`): every `checkpoint.every_steps`, on a stop request, and at the end.
The newest `keep_last` are kept; `best/` lives outside and is never rotated.

Resuming at another world size: ZeRO-0 keeps the whole optimizer state on every rank, so any
world size loads it as written. ZeRO 1-3 partition it by rank; DeepSpeed's own converter
(`python -m deepspeed.checkpoint.ds_to_universal`) writes the universal format, which an engine
built with `checkpoint.load_universal` reads at any world size. Both are DeepSpeed's public,
documented universal-checkpointing route; nothing here reads DeepSpeed's files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from simcse_dist import distributed as du
from simcse_dist.config import CheckpointConfig
from simcse_dist.fsutil import WriteFailure, explain, free_bytes, human_bytes, probe_writable, publish_dir, staging_dir
from simcse_dist.train.state import Stateful

FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
UNIVERSAL_TAG = "engine_universal"


class CheckpointLayoutError(RuntimeError):
    """A checkpoint that this run cannot load; the message names it and says why."""


def read_meta(path: Path) -> dict[str, Any]:
    """trainer_state.json; a checkpoint in another format is refused (CheckpointLayoutError)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("format") != FORMAT:
        raise CheckpointLayoutError(
            f"{path}: written in checkpoint format {state.get('format')!r}, this version "
            f"reads format {FORMAT}; start a new run (another train.output_dir)"
        )
    return state


def check_base(meta: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a LoRA checkpoint on another frozen base (or with other LoRA settings), a
    full fine-tuning checkpoint with LoRA, or the reverse: the checkpoint holds only what trained."""
    saved_lora, lora = meta.get("lora"), now.get("lora")
    if saved_lora != lora:
        what = lambda s: f"LoRA {s}" if s else "full fine-tuning"  # noqa: E731
        raise CheckpointLayoutError(
            f"{checkpoint}: written by {what(saved_lora)}, this run is {what(lora)} (model.lora); resume with "
            "the settings that wrote it, or start a new run (another train.output_dir)"
        )
    saved, base = meta.get("base"), now.get("base")
    if saved and base and saved["sha256"] != base["sha256"]:
        raise CheckpointLayoutError(
            f"{checkpoint}: its LoRA adapters were trained on the base model {saved['path']} (sha256 "
            f"{saved['sha256'][:12]}), but model.name_or_path {base['path']} has sha256 {base['sha256'][:12]}; "
            "resume on the base that wrote it, or start a new run (another train.output_dir)"
        )


class CheckpointManager:
    def __init__(self, out_dir: Path, cfg: CheckpointConfig, rank: int, world_size: int) -> None:
        self.root = out_dir / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.parts: dict[str, Stateful] = {}
        self._same_world_only: set[str] = set()
        self.rng: Stateful | None = None

    def register(self, name: str, part: Stateful, same_world_only: bool = False) -> None:
        """Save `part.state_dict()` in trainer_state.json and restore it on resume; with
        `same_world_only` only when the world size is unchanged (per-rank sums, e.g. the
        metrics window)."""
        self.parts[name] = part
        if same_world_only:
            self._same_world_only.add(name)

    def register_rng(self, rng: Stateful) -> None:
        """This rank's RNG streams: one binary file per rank, restored at the same world size."""
        self.rng = rng

    # -- cadence -------------------------------------------------------------------------------
    def due(self, step: int, total_steps: int, stopping: bool) -> bool:
        """Save after optimizer step `step`? Every checkpoint.every_steps, on a stop, at the end."""
        every = self.cfg.every_steps
        return stopping or step == total_steps or bool(every and step % every == 0)

    # -- what exists ---------------------------------------------------------------------------
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

    # -- saving --------------------------------------------------------------------------------
    def _room_for(self, final: Path) -> None:
        """Rank 0, before a checkpoint: the directory takes a file and has room for one more
        checkpoint of the last one's size (a full disk would fail deep inside torch.save, with
        the peers waiting in DeepSpeed's barrier)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        error = probe_writable(final.parent)
        if error is not None:
            raise error
        last = self.latest()
        if last is not None:
            need = self.size(last)
            free = free_bytes(final.parent)
            if free < need:
                raise OSError(
                    errno.ENOSPC, f"~{human_bytes(need)} needed (the size of {last.name}), {human_bytes(free)} free"
                )
        staging_dir(final)

    def save(self, engine, step: int, meta: dict[str, Any]) -> Path:
        """collective: every rank calls this. Visible only once complete; on a write failure the
        previous checkpoint stays the newest complete one and the half-written one is removed.
        Raises fsutil.WriteFailure (on the rank that failed) naming the path and the cause."""
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")

        def failure(error: BaseException) -> WriteFailure:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest()
            return WriteFailure(
                f"cannot write checkpoint {explain(tmp, error)}. "
                + (f"The previous checkpoint {kept} is intact." if kept else "No checkpoint was kept.")
            )

        du.agreed(lambda: self._room_for(final) if self.rank == 0 else None, failure)
        try:  # DeepSpeed's own barriers are inside: a rank failing here cannot reach an agreement
            engine.save_checkpoint(str(tmp), tag="engine")
        except (OSError, RuntimeError) as e:
            raise failure(e) from e

        def finish() -> None:
            if self.rng is not None:
                torch.save(self.rng.state_dict(), tmp / f"rng-rank{self.rank}.pt")

        du.agreed(finish, failure)  # every rank's shards and RNG are on disk

        def publish() -> None:
            if self.rank != 0:
                return
            state = {
                "format": FORMAT,
                "step": step,
                "world_size": self.world_size,
                **meta,
                "parts": {name: part.state_dict() for name, part in self.parts.items()},
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            with open(tmp / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            publish_dir(tmp, final)
            for _, old in self.complete()[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

        du.agreed(publish, failure)
        return final

    @staticmethod
    def size(path: Path) -> int:
        """Bytes of a checkpoint as written (without a universal copy made on resume)."""
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and UNIVERSAL_TAG not in f.parts)

    # -- loading -------------------------------------------------------------------------------
    def needs_universal(self, path: Path, zero_stage: int) -> bool:
        """Whether resuming `path` in an engine built with `zero_stage` at this world size goes
        through DeepSpeed's universal format (decided before the engine is built: the engine
        needs checkpoint.load_universal). Raises CheckpointLayoutError when it cannot resume."""
        meta = read_meta(path)
        saved_stage, saved_world = meta["zero_stage"], meta["world_size"]
        if saved_stage != zero_stage:
            raise CheckpointLayoutError(
                f"{path}: written by an engine built with ZeRO stage {saved_stage}, this run builds stage "
                f"{zero_stage}; resume with the engine.zero_stage that wrote it, or start a new run (another "
                "train.output_dir)"
            )
        return zero_stage > 0 and saved_world != self.world_size

    def _to_universal(self, path: Path) -> None:
        """Rank 0 runs DeepSpeed's converter once per checkpoint while the others wait; a failure
        ends every rank at once (distributed.agreed). collective: every rank calls this."""
        target = path / UNIVERSAL_TAG

        def convert() -> None:
            if self.rank != 0 or (target / COMPLETE).exists():
                return
            tmp = staging_dir(target)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(path / "engine"),
                    "--output_folder",
                    str(tmp),
                    "--num_extract_workers",
                    "1",
                    "--num_merge_workers",
                    "1",
                    "--inject_missing_state",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise CheckpointLayoutError(
                    f"{path}: converting to a universal checkpoint failed:\n{proc.stderr[-3000:]}"
                )
            (tmp / COMPLETE).write_text("ok\n")
            publish_dir(tmp, target)

        du.agreed(convert)

    def load(self, engine, path: Path, universal: bool) -> dict[str, Any]:
        """Restore the engine, every part and (at the same world size) this rank's RNG.
        Returns the checkpoint's metadata. collective: every rank calls this."""
        meta = read_meta(path)
        tag = "engine"
        if universal:
            self._to_universal(path)
            tag = UNIVERSAL_TAG
        load_path, _ = engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise CheckpointLayoutError(f"{path}: DeepSpeed could not load the engine state")
        same_world = meta["world_size"] == self.world_size
        for name, part in self.parts.items():
            if name in meta["parts"] and (same_world or name not in self._same_world_only):
                part.load_state_dict(meta["parts"][name])
        rng_file = path / f"rng-rank{self.rank}.pt"
        if same_world and rng_file.exists() and self.rng is not None:
            self.rng.load_state_dict(torch.load(rng_file, weights_only=False))
        return meta
