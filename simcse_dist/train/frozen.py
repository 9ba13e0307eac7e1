"""The frozen models an objective consults: the guide (loss.guide) and an online teacher
(loss.distill.teacher). Each is an `Encoder` loaded as simcse-eval loads a model, in eval mode,
under no_grad, replicated on every rank (never in the optimizer, the engine or a checkpoint);
each rank encodes its own rows, and the objective gathers the embeddings without grad, so
they are sharded like the student's. Memory and time are reported.
"""

from __future__ import annotations

import logging
import time

import torch

from simcse_dist.config import Config, resolve_model_path
from simcse_dist.data.batch import Batch
from simcse_dist.data.packing import is_packed, unpack
from simcse_dist.fsutil import human_bytes

log = logging.getLogger(__name__)


class FrozenModels:
    """{"guide": ..., "teacher": ...} as the config asks; `embed(batch)` fills batch.guide and
    batch.teacher (what precomputed teacher embeddings did not already give)."""

    def __init__(self, cfg: Config, student_tokenizer) -> None:
        """Loads the models (no collective)."""
        from simcse_dist.config import ConfigError
        from simcse_dist.data.shards import tokenizer_fingerprint
        from simcse_dist.model.encoder import quiet_transformers
        from simcse_dist.model.format import ExportError
        from simcse_dist.model.load import load_encoder

        wanted = {}
        for src in cfg.sources():
            if src.loss.guide is not None:
                wanted.setdefault("guide", (src.loss.guide.model, src.loss.guide.pooler, "loss.guide"))
            if src.loss.distill is not None and src.loss.distill.teacher is not None:
                wanted.setdefault("teacher", (src.loss.distill.teacher, src.loss.distill.pooler, "loss.distill"))
        self.models: dict[str, torch.nn.Module] = {}
        self.tokenizers: dict[str, object] = {}  # those that differ from the student's
        self.seconds = 0.0
        mine = tokenizer_fingerprint(student_tokenizer)
        for name, (path, pooler, section) in wanted.items():
            field = f"{section}.{'model' if name == 'guide' else 'teacher'}"
            try:
                with quiet_transformers():
                    encoder, tokenizer, meta = load_encoder(resolve_model_path(path), pooler)
            except (ExportError, OSError) as e:
                reason = str(e).replace("pass --pooler", f"set {section}.pooler")
                raise ConfigError(f"{field}: cannot load {path!r} as a frozen {name}: {reason}") from None
            encoder.requires_grad_(False)
            self.models[name] = encoder.eval()
            if tokenizer_fingerprint(tokenizer) != mine:
                self.tokenizers[name] = tokenizer
            params = sum(p.numel() for p in encoder.parameters())
            size = sum(p.numel() * p.element_size() for p in encoder.parameters())
            log.info(
                f"{name}: {meta['path']} (pooler {meta['pooler']}), {params / 1e6:.1f}M parameters, "
                f"{human_bytes(size)} per rank, frozen; "
                + ("its own tokenizer" if name in self.tokenizers else "the student's tokens")
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> FrozenModels:
        for model in self.models.values():
            model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def embed(self, batch: Batch, guide: bool, teacher: bool, one_text: bool) -> None:
        """Set batch.guide / batch.teacher [b, k, d'] (fp32) for the rows of `batch`; `one_text`:
        every view of a row is the same text (unsup), encoded once (a frozen model has no dropout)."""
        t0 = time.perf_counter()
        for name, wanted in (("guide", guide), ("teacher", teacher and batch.teacher is None)):
            if not wanted:
                continue
            inputs = batch.frozen_inputs.get(name, batch.inputs)
            if is_packed(inputs):  # the student's packed rows: a frozen model reads them padded
                inputs = unpack(inputs)
            views = inputs["input_ids"].shape[1]
            if one_text:
                one = {k: v[:, :1] for k, v in inputs.items()}
                emb = self.models[name](**one).float().expand(-1, views, -1)
            else:
                emb = self.models[name](**inputs).float()
            setattr(batch, name, emb)
        self.seconds += time.perf_counter() - t0
