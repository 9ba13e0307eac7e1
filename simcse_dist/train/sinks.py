"""Metric sinks behind log(metrics, step) / close(): the console, metrics.jsonl, wandb (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

from simcse_dist.config import Config
from simcse_dist.fsutil import write_text_atomic

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


class ConsoleSink:
    """`step N: key=value ...` through the `simcse_dist` loggers (logs.py)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        log.info(f"step {step}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per logged step, with a `step` field; flushed per line (crash-safe)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, **clean}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop rows after `keep_through_step` (a resumed run writes them again); atomic rewrite."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_through_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class WandbLogger:
    def __init__(self, cfg: Config, mode: str) -> None:
        import wandb  # lazy: slow import, and optional at run time

        out = Path(cfg.train.output_dir)
        os.environ.setdefault("WANDB_DIR", str(out))
        id_file = out / ".wandb_id"  # a resumed run continues the same wandb run
        out.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            name=cfg.log.run_name or out.name,
            id=run_id,
            config=cfg.to_dict(),
            mode=mode,
            dir=str(out),
            resume="allow",
            settings=wandb.Settings(silent=True),  # one line from us instead of wandb's banner and summary
        )
        where = self.run.url if mode == "online" else f"{self.run.dir.removesuffix('/files')} (upload: wandb sync)"
        self.line = f"wandb: {mode} run {run_id} in {where}"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans out to every sink on rank 0; a no-op elsewhere."""

    def __init__(self, cfg: Config, is_main: bool) -> None:
        self.sinks: list[Any] = []
        if not is_main:
            return
        self.sinks = [ConsoleSink(), JsonlLogger(Path(cfg.train.output_dir) / "metrics.jsonl")]
        mode = cfg.log.wandb_mode
        if mode == "online" and not wandb_has_key():
            log.info("wandb: no API key found (WANDB_API_KEY or ~/.netrc); logging offline instead")
            mode = "offline"
        if mode != "disabled":
            self.sinks.append(WandbLogger(cfg, mode))
            log.info(self.sinks[-1].line)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
