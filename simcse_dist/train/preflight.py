"""Checks before any heavy work (model load, tokenization, process group): the output directory
can be written, the disk holds a checkpoint, the model id resolves. Each failure is a
ConfigError naming the field and the fix."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from simcse_dist.config import Config, ConfigError, resolve_model_path
from simcse_dist.fsutil import free_bytes, human_bytes, probe_writable

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10


def checkpoint_bytes(cfg: Config, num_params: int) -> tuple[int, int]:
    """(weights, optimizer state) bytes of one checkpoint: weights in the training dtype;
    optimizer = AdamW's two fp32 moments, plus an fp32 master copy in bf16/fp16 and at ZeRO 1-3
    (whose optimizer keeps its own fp32 partition even in fp32)."""
    weight = 4 if cfg.engine.precision == "fp32" else 2
    master = cfg.engine.precision != "fp32" or cfg.engine.zero_stage > 0
    optimizer = 8 + (4 if master else 0)
    return num_params * weight, num_params * optimizer


def count_parameters(model_path: str) -> int:
    """Parameters of the encoder (plus the MLP head), built on the meta device: no weights read."""
    import torch
    from transformers import AutoConfig, AutoModel

    hf = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModel.from_config(hf)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pooler."))
    return backbone + hf.hidden_size * (hf.hidden_size + 1)


def resolve_model(name: str, timeout_s: float = HUB_TIMEOUT_S) -> str:
    """A local directory as is; a Hub id must give its config within `timeout_s` (cache or
    network), else a ConfigError naming model.name_or_path and the fix."""
    path = resolve_model_path(name)
    if Path(path).expanduser().is_dir():
        return path
    result: dict = {}

    def fetch() -> None:
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # one error below, not a line per retry
            result["file"] = hf_hub_download(path, "config.json", etag_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - reported below, whatever the hub client raised
            result["error"] = e

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "file" in result:
        return path
    why = (
        f"{type(result['error']).__name__}: {str(result['error']).splitlines()[0]}"
        if "error" in result
        else f"no answer from the Hugging Face Hub in {timeout_s:.0f} s"
    )
    raise ConfigError(
        f"model.name_or_path: {name!r} is not a local directory and could not be fetched ({why}). "
        f"Download it where there is network (`huggingface-cli download {name} --local-dir DIR`) and pass "
        "model.name_or_path=DIR, or fix the id"
    )


def probe_output_dir(out: Path) -> None:
    """Create train.output_dir and write a probe file in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot create {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a directory")
    error = probe_writable(out)
    if error is not None:
        raise ConfigError(f"train.output_dir: cannot write in {out}: {error.strerror or error}") from None


def check_space(cfg: Config, num_params: int) -> None:
    """Refuse to start when one checkpoint does not fit; warn when keep_last + 1 do not (a
    checkpoint is written before the oldest is removed)."""
    out = Path(cfg.train.output_dir)
    weights, optimizer = checkpoint_bytes(cfg, num_params)
    one, free = weights + optimizer, free_bytes(out)
    size = (
        f"a checkpoint takes ~{human_bytes(one)} (weights {human_bytes(weights)} + optimizer state "
        f"{human_bytes(optimizer)})"
    )
    if free < one:
        raise ConfigError(
            f"train.output_dir: {size}, but only {human_bytes(free)} is free in {out}; free space "
            "or choose another train.output_dir"
        )
    need = one * (cfg.checkpoint.keep_last + 1)
    if free < need:
        log.warning(
            f"{size}; keeping checkpoint.keep_last={cfg.checkpoint.keep_last} needs ~{human_bytes(need)}, "
            f"{human_bytes(free)} is free in {out}"
        )


def check_objectives(cfg: Config, model_path: str) -> None:
    """Matryoshka dims within the embedding; the guide and the teacher resolve (as the model does)."""
    from transformers import AutoConfig

    size = AutoConfig.from_pretrained(model_path).hidden_size
    for i, src in enumerate(cfg.sources()):
        where = "loss" if not cfg.data.sources else f"data.sources[{i}].loss"
        too_big = [d for d in src.loss.matryoshka_dims if d > size]
        if too_big:
            raise ConfigError(f"{where}.matryoshka_dims: {too_big[0]} is larger than the model's embedding size {size}")
        for field, name in (
            ("guide.model", src.loss.guide and src.loss.guide.model),
            ("distill.teacher", src.loss.distill and src.loss.distill.teacher),
        ):
            if name:
                try:
                    resolve_model(name)
                except ConfigError as e:
                    raise ConfigError(str(e).replace("model.name_or_path", f"{where}.{field}", 1)) from None


def preflight(cfg: Config, is_main: bool) -> None:
    """Every rank resolves the model and checks the objective against it; rank 0 checks the
    output directory and the disk."""
    from simcse_dist.engine import select_accelerator

    select_accelerator()
    path = resolve_model(cfg.model.name_or_path)
    check_objectives(cfg, path)
    if is_main:
        probe_output_dir(Path(cfg.train.output_dir))
        check_space(cfg, count_parameters(path))
