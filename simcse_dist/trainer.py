"""The training loop: encode -> gather -> loss -> backward -> step, plus log/eval/checkpoint cadence."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as du
from .checkpoint import CheckpointManager, check_output_dir, discard_run
from .config import Config, resolve_model_path, save_config
from .data import BatchPlan, Collator, GlobalBatchSampler, MicroBatch, StepBatches, StepKeys, load_examples
from .engine import Engine
from .evaluation import align_uniform, pair_embeddings, sts_correlation
from .gather import gather_candidates, gather_no_grad
from .loggers import MetricsLogger, truncate_jsonl
from .loss import duplicate_mask, padding_mask, simcse_loss
from .model import Encoder, save_encoder
from .preempt import StopRequest
from .readers import detect_format, read_sts_pairs, resolve_path
from .token_cache import CachedCollator, TokenCache


class NonFiniteLossError(RuntimeError):
    """train/loss became NaN/Inf and train.on_nonfinite=stop."""


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def text_ids(examples: list[tuple[str, ...]], k: int) -> torch.Tensor:
    """[n, k] stable 63-bit ids of each example's texts (view 0, 1[, 2]); unsup views share one.
    blake2b, not hash(): Python salts str hashes per process, and ranks must agree."""
    out = torch.empty(len(examples), k, dtype=torch.long)
    for i, ex in enumerate(examples):
        for v in range(k):
            text = ex[min(v, len(ex) - 1)]
            out[i, v] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
    return out


def _write(line: str) -> None:
    """Print above the tqdm bar instead of through it."""
    from tqdm.auto import tqdm

    tqdm.write(line)


@dataclass(slots=True)
class TrainResult:
    steps: int
    best_score: float | None
    best_step: int | None
    best_dir: Path
    stopped: bool = False


class Window:
    """Metrics accumulated between two logging steps, kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self.loss = torch.zeros((), device=self.device)
        self.masked = torch.zeros((), dtype=torch.long, device=self.device)

    def state(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "loss": float(self.loss), "masked": int(self.masked)}

    def load(self, state: dict) -> None:
        self.steps, self.tokens = state["steps"], state["tokens"]
        self.loss = torch.tensor(state["loss"], device=self.device)
        self.masked = torch.tensor(state.get("masked", 0), device=self.device)


class Trainer:
    def __init__(self, cfg: Config, env: du.DistEnv, quiet: bool = False) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.env = cfg, env
        self.say = (lambda s: None) if (quiet or not env.is_main) else _write
        self.out = Path(cfg.train.output_dir)
        self.train_path = resolve_path(cfg.data.train_file)
        self.examples, blank = load_examples(cfg.data.train_file, cfg.data.format, cfg.train.objective)
        self.plan = BatchPlan(len(self.examples), cfg.train.global_batch_size, env.world_size,
                              cfg.train.grad_accum, cfg.data.drop_last)
        self.sampler = GlobalBatchSampler(self.plan, env.rank, cfg.train.seed, cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.plan.steps_per_epoch
        path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        self.collate = self._make_collate()
        self.dev_pairs = read_sts_pairs(resolve_path(cfg.eval.sts_dev_file)) if cfg.eval.sts_dev_file else None

        self.ckpt = CheckpointManager(self.out, cfg.checkpoint.keep_last, env.rank)
        self.resume_from = self._prepare_output_dir()
        # The checkpoint layout follows the ZeRO stage as built, which depends on the world size
        # (engine.built_zero_stage): checkpoint.resume_route picks how to load another layout.
        self.resume_route = None if self.resume_from is None else self.ckpt.route(self.resume_from, cfg, env.world_size)
        self.universal = self.resume_route is not None and self.resume_route.engine_loads_universal
        torch.manual_seed(cfg.train.seed)  # identical initial weights (the MLP head) on every rank
        self.encoder = Encoder.from_config(cfg.model)
        self.engine = Engine(self.encoder, cfg, env.world_size, self.total_steps, load_universal=self.universal)
        self.engine.train()  # from_pretrained returns eval mode: dropout (the augmentation) must be on
        torch.manual_seed(cfg.train.seed + env.rank)  # each rank draws its own dropout masks
        self.k = 2 if cfg.train.objective == "unsup" else len(self.examples[0])
        md = cfg.train.mask_duplicates
        self.mask_duplicates = (cfg.train.objective == "sup") if md is None else md
        self.text_ids = text_ids(self.examples, self.k) if self.mask_duplicates else None
        self.window = Window(self.engine.device)
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._announce(blank)

    def _announce(self, blank: int) -> None:
        p, cfg = self.plan, self.cfg
        pool = p.global_batch_size if cfg.train.grad_cache else p.world_size * p.micro_batch_size
        candidates = pool * (self.k - 1)
        self.say(
            f"data: {p.num_examples} examples from {cfg.data.train_file} ({blank} blank lines skipped); "
            f"{p.steps_per_epoch} steps/epoch, {p.dropped_per_epoch} examples dropped per epoch (drop_last)"
        )
        self.say(
            f"batch: world_size {p.world_size} x grad_accum {p.grad_accum} x micro_batch {p.micro_batch_size} "
            f"= global_batch {p.global_batch_size}; {candidates} candidates per anchor "
            f"(1 positive, {candidates - 1} negatives)"
            + ("; gradient caching: negatives from the whole global batch" if cfg.train.grad_cache else
               "; with grad_accum > 1 negatives come from one micro-step only" if p.grad_accum > 1 else "")
            + (f"; duplicate texts masked ({self.text_ids.shape[0]} examples hashed)" if self.mask_duplicates else "")
        )
        self.say(
            f"engine: ZeRO-{cfg.engine.zero_stage}"
            + (f" (built as stage {self.engine.zero_stage}: one rank, nothing to partition)"
               if self.engine.zero_stage != cfg.engine.zero_stage else "")
            + f" {cfg.engine.precision}, {self.total_steps} optimizer steps, "
            f"lr {cfg.optim.lr}, clip {cfg.engine.gradient_clipping}, device {self.engine.device}"
        )

    # -- input pipeline ------------------------------------------------------------------------
    def _make_collate(self) -> Callable[[Sequence[int]], dict[str, torch.Tensor]]:
        """Example indices -> token id tensors [b, k, L]: sliced from the token cache
        (data.token_cache, built here on first use) or tokenized on the fly. collective."""
        cfg = self.cfg
        if not cfg.data.token_cache:
            collator = Collator(self.tokenizer, cfg.data.max_seq_len, cfg.train.objective)
            return lambda indices: collator([self.examples[i] for i in indices])
        columns = [list(c) for c in zip(*self.examples, strict=True)]
        # The file's bytes are in the key; the reading (format, columns kept) goes in the variant.
        variant = f"{cfg.train.objective}|{cfg.data.format or detect_format(self.train_path)}|{len(columns)}"
        cache = TokenCache.build_or_load(self.train_path, columns, self.tokenizer, cfg.data.max_seq_len,
                                         cache_dir=cfg.data.cache_dir, is_main=self.env.is_main,
                                         barrier=du.barrier, variant=variant, progress=self.env.is_main)
        what = f"built in {cache.meta['build_seconds']:.1f} s" if cache.tokenized else "reused"
        self.say(f"token cache: {cache.directory} ({what}; {cache.meta['total_tokens']} tokens)")
        return CachedCollator(cache, self.tokenizer.pad_token_id, cfg.train.objective)

    def num_workers(self) -> int:
        w = self.cfg.data.num_workers
        return w if w is not None else (2 if self.engine.device.type == "cuda" else 0)

    def prepare(self, mb: MicroBatch | Sequence[int]) -> dict[str, torch.Tensor]:
        """Host side of one micro-batch (in a DataLoader worker when data.num_workers > 0): token
        ids [b, k, L], plus `row_valid` [b] when some rank pads this micro-step (False for padding
        rows of a short last batch) and `ids` [b, k] (text ids) when duplicates are masked."""
        if not isinstance(mb, MicroBatch):
            mb = MicroBatch(list(mb), len(mb))
        batch = self.collate(mb.indices)
        if not mb.full:  # some rank pads this micro-step: every rank takes the masked path
            batch["row_valid"] = torch.arange(len(mb.indices)) < mb.valid
        if self.mask_duplicates:
            batch["ids"] = self.text_ids[mb.indices]
        return batch

    def steps(self, start: int) -> Iterator[tuple[int, list[MicroBatch] | list[dict[str, torch.Tensor]]]]:
        """(step, one item per micro-step) for steps start..total-1: MicroBatches that
        `micro_batch` prepares in the step, or, with DataLoader workers, host batches prepared
        ahead of it (pinned on CUDA, so the copy to the device does not block)."""
        workers = self.num_workers()
        if workers == 0:
            yield from self.sampler.iter_steps(start, self.total_steps)
            return
        from torch.utils.data import DataLoader

        a = self.plan.grad_accum
        loader = DataLoader(StepBatches(self.sampler, self.prepare), batch_size=None,
                            sampler=StepKeys(start, self.total_steps, a), num_workers=workers,
                            pin_memory=self.engine.device.type == "cuda", prefetch_factor=4,
                            generator=torch.Generator())  # its own seed: the dropout RNG is not touched
        batches = iter(loader)
        for step in range(start, self.total_steps):
            yield step, [next(batches) for _ in range(a)]

    # -- one micro-step ------------------------------------------------------------------------
    def micro_batch(self, mb: MicroBatch | Sequence[int] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One micro-batch on the engine's device (see `prepare`); `mb` may be prepared already."""
        batch = mb if isinstance(mb, dict) else self.prepare(mb)
        self.window.tokens += int(batch["attention_mask"].sum())  # on the host tensor: no device sync
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Local loss of one micro-batch [b, k, L]: this rank's anchors vs the global candidates."""
        extras = {k: batch.pop(k) for k in ("row_valid", "ids") if k in batch}
        z = self.engine(**batch)  # [b, k, d], all views in one forward
        return self.loss_from_embeddings(z, **extras)

    def loss_from_embeddings(self, z: torch.Tensor, row_valid: torch.Tensor | None = None,
                             ids: torch.Tensor | None = None) -> torch.Tensor:
        """Contrastive loss of local views z [b, k, d]. collective: every rank calls this."""
        b, k = z.shape[:2]
        anchors, candidates = gather_candidates(z)  # [b, d], [(k-1)*N*b, d]  (collective)
        offset, cfg = self.env.rank * b, self.cfg
        if row_valid is None and ids is None:  # the common case: no masks, no extra collective
            return simcse_loss(z, candidates, offset, cfg.model.temperature, cfg.optim.hard_negative_weight)
        if row_valid is None:
            row_valid = torch.ones(b, dtype=torch.bool, device=z.device)
        if ids is None:
            ids = torch.zeros(b, k, dtype=torch.long, device=z.device)
        # Padding rows and text ids of every rank, in one small collective.
        meta = gather_no_grad(torch.cat([row_valid.long().unsqueeze(1), ids], dim=1))  # [N*b, 1+k]
        valid, global_ids = meta[:, 0].bool(), meta[:, 1:]
        mask = padding_mask(valid, k - 1, b)
        if self.mask_duplicates:
            dup = duplicate_mask(global_ids, offset, b) & ~mask & row_valid.unsqueeze(1)
            self.window.masked += dup.sum()
            mask = mask | dup
        normalizer = valid.sum() / self.env.world_size  # mean over the real anchors of all ranks
        return simcse_loss(z, candidates, offset, cfg.model.temperature, cfg.optim.hard_negative_weight,
                           mask, row_valid, normalizer)

    def _accumulated_losses(self, micro: list[MicroBatch]) -> torch.Tensor:
        """Plain accumulation: forward + backward per micro-step; negatives from that micro-step."""
        step_loss = torch.zeros((), device=self.engine.device)
        for i, mb in enumerate(micro):
            batch = self.micro_batch(mb)
            loss = self.compute_loss(batch)
            self.engine.backward(loss)
            step_loss = step_loss + loss.detach().float() / len(micro)
            if i < len(micro) - 1:
                self.engine.step()  # non-boundary: DeepSpeed only counts the micro-step
        return step_loss

    def _grad_cache_loss(self, micro: list[MicroBatch]) -> torch.Tensor:
        """Gradient caching (Gao et al. 2021, arXiv 2101.06983): the loss over the whole global
        batch with the memory of one chunk. collective: every rank, same number of forwards."""
        batches = [self.micro_batch(mb) for mb in micro]
        extras = [{k: b.pop(k) for k in ("row_valid", "ids") if k in b} for b in batches]
        states, cached = [], []
        with torch.no_grad():  # (a) encode every chunk without a graph, remembering its RNG state
            for batch in batches:
                states.append(_rng_state())
                cached.append(self.engine(**batch))
        z = torch.cat(cached).detach().requires_grad_()  # [A*b, k, d]
        row_valid = ids = None  # (b, c) gather every rank's whole step, loss over all of it
        if any("row_valid" in e for e in extras):
            row_valid = torch.cat([e.get("row_valid", torch.ones(c.shape[0], dtype=torch.bool, device=c.device))
                                   for e, c in zip(extras, cached, strict=True)])
        if self.mask_duplicates:
            ids = torch.cat([e["ids"] for e in extras])
        loss = self.loss_from_embeddings(z, row_valid, ids)
        loss.backward()  # d loss / d z only: z is a leaf; the gather's backward is a collective
        grads = z.grad.split([c.shape[0] for c in cached])
        for i, (batch, grad, state) in enumerate(zip(batches, grads, states, strict=True)):
            _set_rng_state(state)  # (d) same dropout masks as in (a)
            z_i = self.engine(**batch)
            self.engine.backward((z_i * grad.to(z_i.dtype)).sum(), scale_wrt_gas=False)
            if i < len(batches) - 1:
                self.engine.step()  # non-boundary
        return loss.detach().float()

    def forward_backward(self, micro: list[MicroBatch]) -> torch.Tensor:
        """Everything of one optimizer step but the final engine.step(): gradients are then
        complete (and, at ZeRO 1-3, reduced). Returns this rank's loss for the step."""
        return self._grad_cache_loss(micro) if self.cfg.train.grad_cache else self._accumulated_losses(micro)

    def train_step(self, micro: list[MicroBatch], stop: StopRequest, step: int) -> bool:
        """One optimizer step over `grad_accum` micro-batches. Returns True when a stop was
        requested on any rank (the step is still completed, so the checkpoint is consistent)."""
        step_loss = self.forward_backward(micro)
        bad = ~torch.isfinite(step_loss)
        # collective, once per step: did any rank see a non-finite loss or a stop request?
        flags = du.all_reduce_max(torch.stack([bad.float(), torch.tensor(float(stop.requested()),
                                                                          device=bad.device)]))
        any_bad, any_stop = (bool(x) for x in flags.tolist())  # note: a host sync point
        if any_bad:
            latest = self.ckpt.latest()
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite train/loss at step {step + 1}; no update applied. Last checkpoint: "
                    f"{latest or 'none'}. Lower optim.lr, use fp32/bf16, or set train.on_nonfinite=skip")
            self.say(f"step {step + 1}: non-finite train/loss on some rank; step skipped (train.on_nonfinite=skip)")
            self.engine.drop_gradients()
        else:
            self.window.loss += step_loss
            self.window.steps += 1
        self.engine.step()
        return any_stop

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        start = self._start_or_resume()
        logger = MetricsLogger(cfg, self.env.is_main, self.say)
        stop = StopRequest(check_file=self.env.is_main)
        bar = self._progress_bar(start)
        stopped = False
        try:
            self.engine.train()
            for step, micro_indices in self.steps(start):
                lr = self.engine.lr()
                stopped = self.train_step(micro_indices, stop, step)
                done = step + 1
                if done % cfg.log.every_steps == 0 or done == self.total_steps:
                    metrics = self._window_metrics(lr)
                    logger.log(metrics, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                if self.dev_pairs is not None and (done % cfg.eval.every_steps == 0 or done == self.total_steps):
                    t_eval = time.perf_counter()
                    logger.log(self.evaluate(done), done)
                    self.window.t0 += time.perf_counter() - t_eval  # throughput excludes evaluation
                every = cfg.checkpoint.every_steps
                if stopped or done == self.total_steps or (every and done % every == 0):
                    self.save_checkpoint(done)
                if bar is not None:
                    bar.update(1)
                if stopped:
                    stop.clear_file()
                    self.say(f"stopped at step {done} ({stop.reason()}): checkpoint saved in {self.ckpt.latest()}; "
                             "rerun the same command to resume")
                    break
            else:
                if self.dev_pairs is None and start < self.total_steps:
                    self.say("no eval.sts_dev_file: best/ holds the final model")
                    self.best_step = self.total_steps
                    self._export_best()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        best_dir = self.out / "best"
        if not stopped and self.dev_pairs is None:
            self.say(f"done: {self.total_steps} steps; final model in {best_dir}")
        elif not stopped:
            score = "n/a" if self.best_score is None else f"{self.best_score:.4f}"
            self.say(f"done: {self.total_steps} steps; best dev spearman {score} at step {self.best_step}; "
                     f"model in {best_dir}")
        return TrainResult(self.total_steps, self.best_score, self.best_step, best_dir, stopped)

    def _prepare_output_dir(self) -> Path | None:
        """Discard a different run if told to, write config.yaml; return the checkpoint to resume
        from, if any. collective: every rank."""
        cfg = self.cfg
        if self.env.is_main:
            if cfg.train.overwrite and check_output_dir(cfg):
                self.say(f"train.overwrite: discarding the different run in {self.out}")
                discard_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        du.barrier()
        return self.ckpt.latest() if cfg.checkpoint.resume else None

    def _start_or_resume(self) -> int:
        """Load the checkpoint found at start (engine, RNG, counters). Returns the first step to
        run. collective: every rank."""
        latest = self.resume_from
        if latest is None:
            if self.env.is_main:
                truncate_jsonl(self.out / "metrics.jsonl", keep_through_step=0)
            return 0
        state = self.ckpt.load(self.engine, latest, self.env.world_size, route=self.resume_route)
        step = state["step"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        if state["world_size"] == self.env.world_size:
            self.window.load(state["window"])
        else:
            self.say(f"resuming at world size {self.env.world_size} from a checkpoint written at world size "
                     f"{state['world_size']} (same global batch and data order; dropout RNG streams differ, "
                     "so the losses are not bit-identical to an uninterrupted run)")
        if self.env.is_main:
            truncate_jsonl(self.out / "metrics.jsonl", keep_through_step=step)
        self.say(f"resumed from step {step} ({latest})")
        if step >= self.total_steps:
            self.say(f"nothing to train: the run in {self.out} already finished its {self.total_steps} steps "
                     "(use another train.output_dir, or train.overwrite=true with a changed config)")
        return step

    def save_checkpoint(self, step: int) -> None:
        """collective: every rank calls this."""
        state = {"step": step, "best_score": self.best_score, "best_step": self.best_step,
                 "world_size": self.env.world_size, "zero_stage_built": self.engine.zero_stage,
                 "window": self.window.state(), "global_batch_size": self.cfg.train.global_batch_size}
        self.ckpt.save(self.engine, step, state)

    def _progress_bar(self, start: int):
        if not (self.env.is_main and self.cfg.log.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start, desc="train", dynamic_ncols=True)

    def _window_metrics(self, lr: float) -> dict[str, float]:
        """Metrics over the steps since the last log. collective: all-reduces loss and tokens."""
        w = self.window
        # Each rank's loss is the mean over its b local anchors, so the mean over ranks is the
        # mean over the global batch.
        stats = torch.stack([w.loss / max(w.steps, 1), torch.tensor(float(w.tokens), device=w.loss.device),
                             w.masked.float()])
        loss = float(du.all_reduce_mean(stats[:1])[0])  # note: this is a host sync point
        tokens, masked = (float(x) for x in du.all_reduce_sum(stats[1:]))
        elapsed = max(time.perf_counter() - w.t0, 1e-9)
        metrics = {"train/loss": loss if w.steps else float("nan"), "train/lr": lr}
        norm = self.engine.grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = norm
        metrics["train/sentences_per_s"] = w.steps * self.cfg.train.global_batch_size / elapsed
        metrics["train/tokens_per_s"] = tokens / elapsed
        if self.mask_duplicates:  # (anchor, candidate) pairs masked as false negatives, per step
            metrics["train/masked_negatives"] = masked / max(w.steps, 1)
        w.reset()
        return metrics

    # -- evaluation and the best model ---------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """STS dev Spearman; keeps the best model (highest score). collective: every rank."""
        self.engine.eval()
        s1, s2, gold = self.dev_pairs
        e1, e2 = pair_embeddings(self.engine, self.tokenizer, s1, s2, self.engine.device, self.cfg.eval.batch_size)
        self.engine.train()
        score = sts_correlation(e1, e2, gold)
        metrics = {"eval/stsb_spearman": score}
        if max(gold) > 4.0:  # Wang & Isola's alignment needs positives (gold > 4), as the paper's Fig. 2
            au = align_uniform(e1, e2, gold)
            metrics.update({"eval/align": au["align"], "eval/uniform": au["uniform"]})
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, step
            self._export_best()
            metrics["eval/best_stsb_spearman"] = score
        return metrics

    def _export_best(self) -> None:
        """Write best/ in Hugging Face format, atomically. collective: ZeRO gathers on every rank."""
        state = self.engine.full_state_dict()
        if self.env.is_main:
            backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")} or None
            final, tmp = self.out / "best", self.out / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_encoder(tmp, backbone, mlp, self.encoder, self.tokenizer)
            info = {"step": self.best_step, "stsb_dev_spearman": self.best_score}
            (tmp / "best_info.json").write_text(json.dumps(info, indent=2) + "\n")
            old = self.out / "best.old"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        du.barrier()
