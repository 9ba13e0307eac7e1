"""The input pipeline of a run: training sources -> this rank's `Batch`es, step by step.

Construction resolves the sources only; `setup()` opens each source's prepared corpus
(prepare.py builds it on first use, every rank taking its share of the work: a collective) and
builds the batch plan and sampler from the row counts in the manifests. `steps(start, total)`
yields each optimizer step's micro-batches, prepared in the step or ahead of it by DataLoader
workers. Per rank the data costs memory maps and O(sources) Python objects, never O(rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from simcse_dist import distributed as du
from simcse_dist.config import Config, ConfigError, Source
from simcse_dist.data.batch import Batch
from simcse_dist.data.collate import CorpusCollator, prompt_length
from simcse_dist.data.corpus import PreparedCorpus
from simcse_dist.data.inputs import describe
from simcse_dist.data.packing import RowTokens, pack
from simcse_dist.data.prepare import default_workers, open_or_prepare
from simcse_dist.data.readers import resolve_path
from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler, MicroBatch, StepBatches, StepKeys


class InputPipeline:
    def __init__(self, cfg: Config, env: du.DistEnv, tokenizer, frozen_tokenizers: dict | None = None) -> None:
        """frozen_tokenizers: {name: tokenizer} of frozen models (the guide, a teacher) whose
        tokenizer is not the student's: their own prepared copy of every source is opened too."""
        self.cfg, self.env, self.tokenizer = cfg, env, tokenizer
        self.frozen_tokenizers = frozen_tokenizers or {}
        self.sources: list[Source] = cfg.sources()
        self.corpora: list[PreparedCorpus] = []
        self.collators: list[CorpusCollator] = []
        self.frozen_collators: list[dict[str, CorpusCollator]] = []  # per source: {frozen model: collator}
        self.teacher_embeddings: list[np.ndarray | None] = []  # per source: precomputed [rows, (k,) d]
        self.views: list[int] = []  # k per source: 2 (unsup, pairs) or 3 (triplets)
        self.mask_duplicates: list[bool] = []
        self.prompt_lengths: list[dict[str, torch.Tensor] | None] = []  # per source: {"" (student) | frozen: [k]}
        self.plan: BatchPlan | None = None
        self.sampler: GlobalBatchSampler | None = None
        self.packing = False  # set by enable_packing: micro-batches are packed

    def _open(self, src: Source, tokenizer) -> PreparedCorpus:
        """The source's corpus prepared for `tokenizer`, every rank taking its share of the work
        when it is not prepared yet (prepare.py). collective."""
        cfg = self.cfg
        return open_or_prepare(
            src.path,
            src.format,
            src.objective,
            tokenizer,
            cfg.data.max_seq_len,
            cache_dir=cfg.data.cache_dir,
            workers=cfg.data.prepare_workers or default_workers(),
            progress=True,
            every_s=min(2.0, cfg.engine.dist_timeout_s / 4),
            prompts=src.prompts,
        )

    def setup(self) -> None:
        """Open (or prepare) every source's corpus, then the plan and the sampler. collective:
        every rank prepares its share of a corpus that is not prepared yet (prepare.py)."""
        cfg, env = self.cfg, self.env
        for i, src in enumerate(self.sources):
            corpus = self._open(src, self.tokenizer)
            k = 2 if src.objective == "unsup" else corpus.num_columns
            cfg.check_negatives(k)
            md = src.loss.mask_duplicates
            self.corpora.append(corpus)
            self.collators.append(CorpusCollator(corpus, self.tokenizer.pad_token_id, src.objective))
            self.frozen_collators.append(
                {
                    name: CorpusCollator(self._open(src, tok), tok.pad_token_id, src.objective)
                    for name, tok in self.frozen_tokenizers.items()
                }
            )
            self.teacher_embeddings.append(self._teacher_embeddings(i, src, corpus))
            self.views.append(k)
            self.prompt_lengths.append(self._prompt_lengths(src, k))
            self.mask_duplicates.append((src.objective == "sup") if md is None else md)
        self.plan = BatchPlan(
            tuple(c.num_rows for c in self.corpora),
            cfg.train.global_batch_size,
            env.world_size,
            cfg.train.grad_accum,
            cfg.data.drop_last,
        )
        self.sampler = GlobalBatchSampler(
            self.plan,
            env.rank,
            cfg.train.seed,
            cfg.data.shuffle,
            [s.weight for s in self.sources],
            [describe(s.path) for s in self.sources],
            RowTokens(self.corpora, [s.objective for s in self.sources]) if cfg.data.balance_tokens else None,
            cfg.train.grad_cache,
        )

    def enable_packing(self) -> None:
        """Pack every micro-batch from now on (data.packing, for a model that can be packed)."""
        self.packing = True

    def fingerprints(self) -> dict[str, dict]:
        """{source name: corpus.fingerprint} of the inputs, as hashed when prepared."""
        return {s.name: c.fingerprint for s, c in zip(self.sources, self.corpora, strict=True)}

    def describe(self) -> list[str]:
        """The start-up lines: the data, and the batch arithmetic with the negatives per anchor."""
        p, cfg = self.plan, self.cfg
        shares = self.sampler.mixture.shares
        lines = []
        for i, (src, corpus) in enumerate(zip(self.sources, self.corpora, strict=True)):
            where = f"{src.name}: " if len(self.sources) > 1 else ""
            mix = (
                (
                    f"; {src.objective}, weight {src.weight:g}: {shares[i]} of {p.steps_per_epoch} steps per epoch"
                    + (" (no steps: raise its weight)" if shares[i] == 0 else "")
                )
                if len(self.sources) > 1
                else ""
            )
            lines.append(
                f"data: {where}{corpus.num_rows} examples from {describe(src.path)} ({corpus.blank_lines} blank lines "
                f"skipped; prepared in {corpus.directory}){mix}"
            )
        lines.append(
            f"data: {p.steps_per_epoch} steps/epoch, {p.dropped_per_epoch} examples dropped per epoch (drop_last)"
        )
        candidates = sorted({cfg.negatives_per_anchor(k) + 1 for k in self.views})
        lines.append(
            f"batch: world_size {p.world_size} x grad_accum {p.grad_accum} x micro_batch {p.micro_batch_size} "
            f"= global_batch {p.global_batch_size}; {' or '.join(map(str, candidates))} candidates per anchor "
            f"(1 positive, the rest negatives)"
            + (
                "; gradient caching: negatives from the whole global batch"
                if cfg.train.grad_cache
                else "; with grad_accum > 1 negatives come from one micro-step only"
                if p.grad_accum > 1
                else ""
            )
            + ("; duplicate texts masked" if any(self.mask_duplicates) else "")
        )
        if self.packing:
            lines.append(f"data: packed into rows of {cfg.data.pack_row_tokens or cfg.data.max_seq_len} tokens")
        if cfg.data.balance_tokens:
            over = "ranks and micro-steps" if cfg.train.grad_cache or p.grad_accum == 1 else "ranks"
            lines.append(f"data: each step's rows balanced by tokens over {over}")
        return lines

    def prepare(self, mb: MicroBatch | Sequence[int]) -> Batch:
        """Host side of one micro-batch (in a DataLoader worker when data.num_workers > 0)."""
        if not isinstance(mb, MicroBatch):
            mb = MicroBatch(list(mb), len(mb))
        inputs = self.collators[mb.source](mb.indices)
        # Some rank pads this micro-step: every rank takes the masked path.
        row_valid = None if mb.full else torch.arange(len(mb.indices)) < mb.valid
        ids = None
        if self.mask_duplicates[mb.source]:
            hashes = self.corpora[mb.source].hashes(np.asarray(mb.indices, dtype=np.int64))
            # unsup: both dropout views are the same text, so they share column 0's id
            columns = [0, 0] if self.sources[mb.source].objective == "unsup" else list(range(self.views[mb.source]))
            ids = torch.from_numpy(np.ascontiguousarray(hashes[:, columns]))
        tokens = int(inputs["attention_mask"].numpy().sum())  # a CPU tensor: no device sync
        if self.packing:
            inputs = pack(inputs, self.cfg.data.pack_row_tokens or self.cfg.data.max_seq_len)
        frozen = {name: collate(mb.indices) for name, collate in self.frozen_collators[mb.source].items()}
        if (lengths := self.prompt_lengths[mb.source]) is not None:  # each encoder decides whether to use them
            b = len(mb.indices)
            inputs["prompt_lengths"] = lengths[""].expand(b, -1).contiguous()
            for name in frozen:
                frozen[name]["prompt_lengths"] = lengths[name].expand(b, -1).contiguous()
        teacher = None
        if (table := self.teacher_embeddings[mb.source]) is not None:
            rows = torch.from_numpy(np.asarray(table[np.asarray(mb.indices)], dtype=np.float32))
            teacher = rows.unsqueeze(1).expand(-1, self.views[mb.source], -1) if rows.ndim == 2 else rows
        return Batch(inputs, row_valid, ids, tokens, mb.source, frozen, teacher=teacher)

    def _prompt_lengths(self, src: Source, k: int) -> dict[str, torch.Tensor] | None:
        """[k] prompt tokens per view, for the student's tokenizer ("") and each frozen one."""
        if not any(src.prompts):
            return None
        views = [src.prompts[0]] * 2 if src.objective == "unsup" else [src.prompts[min(c, 1)] for c in range(k)]
        tokenizers = {"": self.tokenizer, **self.frozen_tokenizers}
        return {
            name: torch.tensor([prompt_length(tok, p) for p in views], dtype=torch.long)
            for name, tok in tokenizers.items()
        }

    def _teacher_embeddings(self, i: int, src: Source, corpus: PreparedCorpus) -> np.ndarray | None:
        """A source's precomputed teacher embeddings (loss.distill.embeddings), memory-mapped and
        checked against the corpus: one row per example, one text (unsup) or every column."""
        distill = src.loss.distill
        if distill is None or distill.embeddings is None:
            return None
        field = "loss.distill.embeddings" if not self.cfg.data.sources else f"data.sources[{i}].loss.distill.embeddings"
        try:
            table = np.load(resolve_path(distill.embeddings), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}: cannot read {distill.embeddings} as a .npy array: {e}") from None
        want = "[rows, d]" if src.objective == "unsup" else f"[rows, {corpus.num_columns}, d] or [rows, d]"
        if table.shape[0] != corpus.num_rows:
            raise ConfigError(
                f"{field}: {distill.embeddings} has {table.shape[0]} rows, {describe(src.path)} has "
                f"{corpus.num_rows} examples: one embedding per example, in its order ({want})"
            )
        if (
            table.ndim == 3
            and (src.objective == "unsup" or table.shape[1] != corpus.num_columns)
            or table.ndim not in (2, 3)
        ):
            raise ConfigError(f"{field}: {distill.embeddings} has the shape {tuple(table.shape)}; expected {want}")
        return table

    def num_workers(self, device: torch.device) -> int:
        w = self.cfg.data.num_workers
        return w if w is not None else (2 if device.type == "cuda" else 0)

    def steps(self, start: int, total: int, device: torch.device) -> Iterator[tuple[int, list[Batch]]]:
        """(step, one Batch per micro-step, on `device`) for steps start..total-1. With
        DataLoader workers the batches are prepared ahead (pinned on CUDA: the copy does not block)."""
        workers = self.num_workers(device)
        if workers == 0:
            for step, micro in self.sampler.iter_steps(start, total):
                yield step, [self.prepare(mb).to(device) for mb in micro]
            return
        from torch.utils.data import DataLoader

        a = self.plan.grad_accum
        loader = DataLoader(
            StepBatches(self.sampler, self.prepare),
            batch_size=None,
            sampler=StepKeys(start, total, a),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4,
            generator=torch.Generator(),
        )  # its own seed: the dropout RNG is not touched
        batches = iter(loader)
        for step in range(start, total):
            yield step, [next(batches).to(device) for _ in range(a)]
