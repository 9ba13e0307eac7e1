"""The input pipeline of a run: training file -> this rank's prepared `step.Batch`es, step by step.

Construction reads the file (no collective); `setup()` builds or loads the token cache (rank 0
tokenizes while the others wait: a collective). `steps(start, total)` yields each optimizer
step's micro-batches, prepared in the step or ahead of it by DataLoader workers.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from . import distributed as du
from .config import Config
from .data import BatchPlan, Collator, GlobalBatchSampler, MicroBatch, StepBatches, StepKeys, load_examples
from .readers import detect_format, resolve_path
from .step import Batch
from .token_cache import CachedCollator, TokenCache


def text_ids(examples: list[tuple[str, ...]], k: int) -> torch.Tensor:
    """[n, k] stable 63-bit ids of each example's texts (view 0, 1[, 2]); unsup views share one.
    blake2b, not hash(): Python salts str hashes per process, and ranks must agree."""
    out = torch.empty(len(examples), k, dtype=torch.long)
    for i, ex in enumerate(examples):
        for v in range(k):
            text = ex[min(v, len(ex) - 1)]
            out[i, v] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
    return out


class InputPipeline:
    def __init__(self, cfg: Config, env: du.DistEnv, tokenizer) -> None:
        self.cfg, self.env, self.tokenizer = cfg, env, tokenizer
        self.train_path = resolve_path(cfg.data.train_file)
        self.examples, self.blank_lines = load_examples(cfg.data.train_file, cfg.data.format, cfg.train.objective)
        self.plan = BatchPlan(len(self.examples), cfg.train.global_batch_size, env.world_size,
                              cfg.train.grad_accum, cfg.data.drop_last)
        self.sampler = GlobalBatchSampler(self.plan, env.rank, cfg.train.seed, cfg.data.shuffle)
        self.k = 2 if cfg.train.objective == "unsup" else len(self.examples[0])
        cfg.check_negatives(self.k)
        md = cfg.train.mask_duplicates
        self.mask_duplicates = (cfg.train.objective == "sup") if md is None else md
        self.text_ids = text_ids(self.examples, self.k) if self.mask_duplicates else None
        self.collate: Callable[[Sequence[int]], dict[str, torch.Tensor]] | None = None

    def describe(self) -> list[str]:
        """The start-up lines: the data, and the batch arithmetic with the negatives per anchor."""
        p, cfg = self.plan, self.cfg
        candidates = cfg.negatives_per_anchor(self.k) + 1
        return [
            f"data: {p.num_examples} examples from {cfg.data.train_file} ({self.blank_lines} blank lines skipped); "
            f"{p.steps_per_epoch} steps/epoch, {p.dropped_per_epoch} examples dropped per epoch (drop_last)",
            f"batch: world_size {p.world_size} x grad_accum {p.grad_accum} x micro_batch {p.micro_batch_size} "
            f"= global_batch {p.global_batch_size}; {candidates} candidates per anchor (1 positive, {candidates - 1} "
            "negatives)" + ("; gradient caching: negatives from the whole global batch" if cfg.train.grad_cache else
                            "; with grad_accum > 1 negatives come from one micro-step only" if p.grad_accum > 1 else "")
            + (f"; duplicate texts masked ({p.num_examples} examples hashed)" if self.mask_duplicates else ""),
        ]

    def setup(self, say) -> None:
        """Example indices -> token id tensors [b, k, L]: sliced from the token cache
        (data.token_cache, built here on first use) or tokenized on the fly. collective."""
        cfg = self.cfg
        if not cfg.data.token_cache:
            collator = Collator(self.tokenizer, cfg.data.max_seq_len, cfg.train.objective)
            self.collate = lambda indices: collator([self.examples[i] for i in indices])
            return
        columns = [list(c) for c in zip(*self.examples, strict=True)]
        # The file's bytes are in the key; the reading (format, columns kept) goes in the variant.
        variant = f"{cfg.train.objective}|{cfg.data.format or detect_format(self.train_path)}|{len(columns)}"
        cache = TokenCache.build_or_load(self.train_path, columns, self.tokenizer, cfg.data.max_seq_len,
                                         cache_dir=cfg.data.cache_dir, is_main=self.env.is_main,
                                         barrier=du.barrier, variant=variant,
                                         progress=self.env.is_main and sys.stderr.isatty())
        what = f"built in {cache.meta['build_seconds']:.1f} s" if cache.tokenized else "reused"
        say(f"token cache: {cache.directory} ({what}; {cache.meta['total_tokens']} tokens)")
        self.collate = CachedCollator(cache, self.tokenizer.pad_token_id, cfg.train.objective)

    def prepare(self, mb: MicroBatch | Sequence[int]) -> Batch:
        """Host side of one micro-batch (in a DataLoader worker when data.num_workers > 0)."""
        if not isinstance(mb, MicroBatch):
            mb = MicroBatch(list(mb), len(mb))
        inputs = self.collate(mb.indices)
        # Some rank pads this micro-step: every rank takes the masked path.
        row_valid = None if mb.full else torch.arange(len(mb.indices)) < mb.valid
        ids = self.text_ids[mb.indices] if self.mask_duplicates else None
        return Batch(inputs, row_valid, ids, int(inputs["attention_mask"].sum()))

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
        loader = DataLoader(StepBatches(self.sampler, self.prepare), batch_size=None,
                            sampler=StepKeys(start, total, a), num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=4,
                            generator=torch.Generator())  # its own seed: the dropout RNG is not touched
        batches = iter(loader)
        for step in range(start, total):
            yield step, [next(batches).to(device) for _ in range(a)]
