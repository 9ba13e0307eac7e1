"""Resumable checkpoints that survive crashes, and the output-dir guard.

Layout: <output_dir>/checkpoints/step-00000040/
    engine/                DeepSpeed engine state (model, optimizer, LR schedule, loss scaler)
    rng-rank{r}.pt         each rank's RNG states (dropout is the augmentation in unsup SimCSE)
    trainer_state.json     step, best score and step, world size, the ZeRO stage the engine was
                           built with (zero_stage_built), the current logging window
    COMPLETE               written last; a directory without it is ignored
    engine_universal/      written on resume when the layout changes (see resume_route)

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
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import distributed as du
from .config import Config, ConfigError
from .engine import built_zero_stage, param_groups

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


class CheckpointLayoutError(RuntimeError):
    """A checkpoint whose engine state cannot be converted to the layout of this run."""


class Route(str, Enum):
    """How a checkpoint's engine state is loaded (chosen by resume_route)."""

    DIRECT = "direct"            # engine.load_checkpoint of engine/ as written
    UNIVERSAL = "universal"      # ZeRO -> ZeRO: ds_to_universal, DeepSpeed's universal load
    INTO_STAGE0 = "into_stage0"  # ZeRO-1/2 -> stage 0: ds_to_universal, then fill the stage-0 optimizer from it
    FROM_STAGE0 = "from_stage0"  # stage 0 -> ZeRO-1/2: write the universal folder from the stage-0 state,
    #                              DeepSpeed's universal load
    UNSUPPORTED = "unsupported"

    @property
    def engine_loads_universal(self) -> bool:
        """Whether the engine must be built with DeepSpeed's checkpoint.load_universal."""
        return self in (Route.UNIVERSAL, Route.FROM_STAGE0)


def resume_route(saved_stage: int, stage: int, precision: str, saved_world_size: int, world_size: int) -> Route:
    """How to load a checkpoint written by an engine built with ZeRO `saved_stage` at
    `saved_world_size` into one built with `stage` at `world_size` (stages as built:
    engine.built_zero_stage, so one rank runs engine.zero_stage=1/2 as stage 0).

    Stage 0 keeps the whole optimizer state on every rank (torch AdamW in fp32; DeepSpeed's
    unfused bf16/fp16 wrapper of it otherwise), so any world size loads it as written. ZeRO 1-3
    partition it by rank: another world size or layout goes through DeepSpeed's universal format
    (one file per parameter and state). fp16 and ZeRO-3 are not converted to or from stage 0:
    the fp16 loss-scaler state has no universal form here, ZeRO-3's universal format differs,
    and neither can be exercised on the CPU test machine.
    """
    if saved_stage == stage and saved_world_size == world_size:
        return Route.DIRECT
    if saved_stage == 0 and stage == 0:
        return Route.DIRECT
    if saved_stage > 0 and stage > 0:
        return Route.UNIVERSAL
    if precision == "fp16" or 3 in (saved_stage, stage):
        return Route.UNSUPPORTED
    return Route.INTO_STAGE0 if stage == 0 else Route.FROM_STAGE0


def _layout(stage: int, precision: str, world_size: int) -> str:
    kind = "unpartitioned optimizer state" if stage == 0 else "optimizer state partitioned over the ranks"
    return f"ZeRO stage {stage} {precision} at world size {world_size} ({kind})"


# DeepSpeed's universal checkpoint format (deepspeed/checkpoint/ds_to_universal.py), as written
# by ds_to_universal and read by its ZeRO-1/2 loader: zero/optimizer_state.pt (global optimizer
# state and param_groups), zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt holding
# {"param": full tensor}, zero/<parameter name>/step.pt the step, plus the mp_rank_*_model_states.pt
# files (LR schedule, counters).
_UC_PARAM = "param"
_UC_STATES = ("exp_avg", "exp_avg_sq")


def _optimizer_names(module: torch.nn.Module) -> list[list[str]]:
    """Parameter names in the order of our AdamW's param groups (engine.param_groups, empty
    groups dropped as DeepSpeed does): the order of a stage-0 optimizer state_dict's indices."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(module, 0.0) if g["params"]]


def _stage0_groups(optimizer) -> tuple[torch.optim.Optimizer, list[list[torch.nn.Parameter]], list[list[torch.Tensor]]]:
    """(torch optimizer, model parameters, their fp32 masters) of a stage-0 engine: torch AdamW
    on the model parameters in fp32; DeepSpeed's unfused bf16 wrapper keeps fp32 copies."""
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = [list(g["params"]) for g in optimizer.param_groups]
        return optimizer, groups, groups
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        return optimizer.optimizer, optimizer.fp16_groups, optimizer.fp32_groups
    raise CheckpointLayoutError(f"cannot set the state of a stage-0 {type(optimizer).__name__} from a universal checkpoint")


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

    @staticmethod
    def saved_zero_stage(path: Path, cfg: Config) -> int:
        """The ZeRO stage the checkpoint's engine was built with: trainer_state.json's
        zero_stage_built, or for checkpoints written before it was recorded, from the files.

        Not built_zero_stage(cfg, saved world size): code before that function built
        engine.zero_stage at every world size, so a 1-rank ZeRO-2 checkpoint may be either layout.
        ZeRO 1-3 write per-rank *zero_pp_rank_*_optim_states.pt files, stage 0 none; until stage
        0 was substituted, the built stage was engine.zero_stage.
        """
        state = json.loads((path / "trainer_state.json").read_text())
        if "zero_stage_built" in state:
            return int(state["zero_stage_built"])
        partitioned = any((path / "engine").glob("*zero_pp_rank_*_optim_states.pt"))
        return cfg.engine.zero_stage if partitioned else 0

    def route(self, path: Path, cfg: Config, world_size: int) -> Route:
        """How this run loads the checkpoint in `path` (resume_route); raises
        CheckpointLayoutError naming the directory and both layouts when it cannot."""
        saved_world, saved_stage = self.saved_world_size(path), self.saved_zero_stage(path, cfg)
        stage, precision = built_zero_stage(cfg, world_size), cfg.engine.precision
        route = resume_route(saved_stage, stage, precision, saved_world, world_size)
        if route is Route.UNSUPPORTED:
            raise CheckpointLayoutError(
                f"{path}: cannot resume a checkpoint written with {_layout(saved_stage, precision, saved_world)} "
                f"in an engine built with {_layout(stage, precision, world_size)}; resume at world size "
                f"{saved_world}, or start a new run (another train.output_dir)")
        return route

    def to_universal(self, path: Path) -> None:
        """Convert the ZeRO-partitioned engine state to DeepSpeed's universal format (rank 0 runs
        deepspeed.checkpoint.ds_to_universal once), so another world size can load it.
        collective: every rank calls this."""

        def convert(tmp: Path) -> None:
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(path / "engine"), "--output_folder", str(tmp), "--num_extract_workers", "1",
                 "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{path}: converting to a universal checkpoint failed:\n{proc.stderr[-3000:]}")

        self._write_universal(path, convert)

    def _write_universal(self, path: Path, write) -> None:
        """`write(tmp)` fills `<path>/engine_universal.tmp/` on rank 0, once per checkpoint; it is
        marked COMPLETE and renamed to engine_universal/, so a crash leaves no half folder that a
        later resume would trust. collective: the other ranks wait in a barrier."""
        target = path / UNIVERSAL_TAG
        if self.rank == 0 and not (target / COMPLETE).exists():
            tmp = path / f"{UNIVERSAL_TAG}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        du.barrier()

    def stage0_to_universal(self, path: Path, module: torch.nn.Module) -> None:
        """Write the universal folder of a stage-0 checkpoint (the whole AdamW state in
        engine/mp_rank_00_model_states.pt), so that a ZeRO-1/2 engine loads it with DeepSpeed's
        universal loader. `module`: the model, for the parameter order of the saved optimizer.
        collective: every rank calls this (rank 0 writes)."""

        def write(tmp: Path) -> None:
            (tmp / "zero").mkdir(parents=True)
            model_file = path / "engine" / "mp_rank_00_model_states.pt"
            sd = torch.load(model_file, map_location="cpu", weights_only=False)
            saved = sd.get("optimizer")
            if not isinstance(saved, dict):
                raise CheckpointLayoutError(f"{model_file}: no stage-0 optimizer state (field 'optimizer')")
            inner = saved.get("optimizer_state_dict", saved)  # bf16/fp16 wrap the torch state_dict
            names = _optimizer_names(module)
            sizes = [len(g["params"]) for g in inner["param_groups"]]
            if sizes != [len(g) for g in names]:
                raise CheckpointLayoutError(
                    f"{model_file}: optimizer param groups of sizes {sizes}, this model's are {[len(g) for g in names]}")
            flat = [n for g in names for n in g]
            masters = [t for g in saved["fp32_groups"] for t in g] if "fp32_groups" in saved else None
            steps = [st["step"] for st in inner["state"].values() if "step" in st]
            step = steps[0] if steps else torch.tensor(0.0)  # no state yet: a fresh optimizer
            for i, name in enumerate(flat):
                fp32 = (masters[i] if masters is not None else sd["module"][name]).detach().float().cpu()
                st = inner["state"].get(i, {})
                d = tmp / "zero" / name
                d.mkdir()
                torch.save({_UC_PARAM: fp32}, d / "fp32.pt")
                for key in _UC_STATES:
                    value = st.get(key, torch.zeros_like(fp32))
                    if value.shape != fp32.shape:
                        raise CheckpointLayoutError(
                            f"{model_file}: optimizer state {key} of parameter {i} has shape {tuple(value.shape)}, "
                            f"{name} has {tuple(fp32.shape)}")
                    torch.save({_UC_PARAM: value.float()}, d / f"{key}.pt")
                torch.save(st.get("step", step), d / "step.pt")
            groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
            # No loss_scaler / clip_grad: the ZeRO optimizer keeps its own (fp32 and bf16 scale by 1).
            torch.save({"param_groups": groups, "ds_version": sd.get("ds_version", "0")},
                       tmp / "zero" / "optimizer_state.pt")
            shutil.copy2(model_file, tmp / model_file.name)  # LR schedule and step counters

        self._write_universal(path, write)

    @staticmethod
    def universal_into_stage0(engine, folder: Path) -> None:
        """Set a stage-0 engine's fp32 weights and AdamW state (moments, step, param-group
        hyperparameters) from a universal folder; the LR schedule comes from engine/ as usual."""
        optimizer, model_groups, master_groups = _stage0_groups(engine.optimizer)
        saved_groups = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
        if len(saved_groups) != len(master_groups):
            raise CheckpointLayoutError(f"{folder / 'zero' / 'optimizer_state.pt'}: {len(saved_groups)} param groups, "
                                        f"this optimizer has {len(master_groups)}")
        names = {p: n for n, p in engine.module.named_parameters()}
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups, i = [], 0
        for saved, params, masters in zip(saved_groups, model_groups, master_groups, strict=True):
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(i, i + len(params)))})
            for p, master in zip(params, masters, strict=True):
                d = folder / "zero" / names[p]
                if not (d / "fp32.pt").exists():
                    raise CheckpointLayoutError(f"{d}: missing (parameter {names[p]} not in the universal checkpoint)")
                fp32 = torch.load(d / "fp32.pt", weights_only=False)[_UC_PARAM]
                with torch.no_grad():
                    master.copy_(fp32.view_as(master))
                    if p is not master:
                        p.copy_(fp32.view_as(p))
                st = {k: torch.load(d / f"{k}.pt", weights_only=False)[_UC_PARAM].view_as(master) for k in _UC_STATES}
                st["step"] = torch.load(d / "step.pt", weights_only=False)
                state[i] = st
                i += 1
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def load(self, engine, path: Path, world_size: int, route: Route = Route.DIRECT) -> dict[str, Any]:
        """collective: every rank calls this. Returns the trainer state saved with it.
        `route`: from route(), decided before the engine was built."""
        state = json.loads((path / "trainer_state.json").read_text())
        tag, optimizer_states = "engine", True
        if route is Route.UNIVERSAL:
            self.to_universal(path)
            tag = UNIVERSAL_TAG
        elif route is Route.FROM_STAGE0:
            self.stage0_to_universal(path, engine.module)
            tag = UNIVERSAL_TAG
        elif route is Route.INTO_STAGE0:
            self.to_universal(path)
            optimizer_states = False  # module, LR schedule and counters from engine/; the rest below
        elif route is not Route.DIRECT:
            raise CheckpointLayoutError(f"{path}: no way to load this checkpoint ({route.value})")
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=optimizer_states)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the engine state")
        if route is Route.INTO_STAGE0:
            self.universal_into_stage0(engine, path / UNIVERSAL_TAG)
        rng_file = path / f"rng-rank{self.rank}.pt"
        if state["world_size"] == world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state
