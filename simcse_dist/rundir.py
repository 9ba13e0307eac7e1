"""One run per output directory: refuse a different config, discard on train.overwrite, and
write the resolved config. Runs before any process group exists (the CLI) and on rank 0."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, save_config

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
    for path in [out / "checkpoints", out / "best", *out.glob("best.tmp*"), out / "best.old"]:
        shutil.rmtree(path, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml", ".wandb_id"):
        (out / name).unlink(missing_ok=True)


def prepare_output_dir(cfg: Config, say) -> Path:
    """Rank 0, before training: discard a different run if told to, create the directory and
    write the resolved config.yaml."""
    out = Path(cfg.train.output_dir)
    if cfg.train.overwrite and check_output_dir(cfg):
        say(f"train.overwrite: discarding the different run in {out}")
        discard_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out
