"""One run per output directory: refuse a different config, discard on train.overwrite, and
write the resolved config. Runs before any process group exists (the CLI) and on rank 0."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from simcse_dist.config import Config, ConfigError, save_config
from simcse_dist.data.order import SAMPLER_VERSION

log = logging.getLogger(__name__)

# Keys that may change between attempts of one run without changing what is trained.
# train.max_steps / train.epochs: raising them extends a run (the trainer says how the LR
# schedule continues); data.allow_changed_data is checked against the data itself on resume.
_MAY_DIFFER = (
    "log.",
    "eval.every_steps",
    "eval.batch_size",
    "checkpoint.",
    "engine.dist_timeout_s",
    "train.overwrite",
    "train.on_nonfinite",
    "train.max_steps",
    "train.epochs",
    "data.allow_changed_data",
    "data.num_workers",
    "data.cache_dir",
    "data.prepare_workers",
    "train.output_dir",
)  # a moved run dir resumes


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


def check_same_run(cfg: Config) -> list[str]:
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


def prepare_output_dir(cfg: Config) -> Path:
    """Rank 0, before training: discard a different run if told to, create the directory and
    write the resolved config.yaml."""
    out = Path(cfg.train.output_dir)
    if cfg.train.overwrite and check_same_run(cfg):
        log.info(f"train.overwrite: discarding the different run in {out}")
        discard_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


class RunLocked(RuntimeError):
    """Another live run holds the output directory."""


LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _process_start(pid: int) -> float | None:
    import psutil  # a dependency of deepspeed

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class RunLock:
    """One run per output directory: `<output_dir>/.lock` holds the owner's host, pid, process
    start time and Slurm job id, and its mtime is a heartbeat (touched every 30 s).

    A lock is taken over when it is stale: on this host its process is gone (or the pid was
    reused), or it belongs to the same Slurm job (a requeue), or its heartbeat is older than
    5 minutes (another host that died). Limits, on shared file systems: the lock is a file
    created with O_EXCL, which NFSv3+ and Lustre honour; two runs starting within the same
    instant on different hosts after a stale lock could both take it over (the second
    rename wins; the loser's heartbeat check then notices and stops)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.mine = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()

    def _stale(self, other: dict) -> str | None:
        """Why the lock `other` may be taken over, or None when its owner may be alive."""
        if other.get("slurm_job") and other.get("slurm_job") == self.mine["slurm_job"]:
            return "the same Slurm job (requeued)"
        if other.get("host") == self.mine["host"]:
            start = _process_start(int(other.get("pid", -1)))
            if start is None or (other.get("start") is not None and abs(start - other["start"]) > 1):
                return f"process {other.get('pid')} is gone"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "the lock vanished"
        return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_S else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.mine) + "\n"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except FileExistsError:
            try:
                other = json.loads(self.path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                other = {}
            why = self._stale(other)
            if why is None:
                raise RunLocked(
                    f"train.output_dir: {self.path.parent} is in use by another run (host {other.get('host')}, pid "
                    f"{other.get('pid')}, started {other.get('started')}); wait for it, use another output_dir, or "
                    f"delete {self.path} if that run is gone"
                ) from None
            log.info(f"taking over the lock of a run that is gone ({why}): {self.path}")
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(self.path)
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self.mine["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


class DataChanged(RuntimeError):
    """A training file differs from the one the checkpoint was trained on."""


def data_changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> str | None:
    """How the sources differ from the fingerprints saved with a checkpoint ({name: {path, size,
    sha256}}, computed when each file was prepared), or None."""
    if set(saved) != set(now):
        return f"the training sources changed from {sorted(saved)} to {sorted(now)} since the checkpoint"
    for name, old in saved.items():
        new, path = now[name], now[name]["path"]
        if new["size"] != old["size"]:
            return f"{path}: size changed from {old['size']} to {new['size']} bytes since the checkpoint"
        if new["sha256"] != old["sha256"]:
            return f"{path}: content changed since the checkpoint (sha256 {old['sha256'][:12]}... -> {new['sha256'][:12]}...)"
    return None


def check_data(meta: dict[str, Any], now: dict[str, dict[str, Any]], checkpoint: Path, allow: bool) -> None:
    """Refuse to resume `checkpoint` in another data order (order.SAMPLER_VERSION) or when a
    training source changed (unless data.allow_changed_data)."""
    version = meta.get("sampler")
    if version != SAMPLER_VERSION:
        raise DataChanged(
            f"{checkpoint} was written with the data order {version!r}; this version draws batches in "
            f"the order {SAMPLER_VERSION!r}, so resuming would repeat and skip examples. Finish that "
            "run with the simcse-dist version that started it, or start a new train.output_dir"
        )
    saved = meta.get("data")
    change = saved and data_changes(saved, now)
    if change and not allow:
        raise DataChanged(
            f"{change}; refusing to resume {checkpoint} on other data (start a new train.output_dir, "
            "or set data.allow_changed_data=true to resume anyway)"
        )
    if change:
        log.warning(f"{change}; resuming anyway (data.allow_changed_data=true)")
