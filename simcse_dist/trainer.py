"""The run lifecycle: build the parts, resume, loop over steps (log / eval / checkpoint), finish.

The step algorithm is step.py's; the input pipeline pipeline.py's; what is saved and when,
checkpoint.py's; the STS dev cadence and best score, evaluation.StsValidator's. Constructing a
Trainer reads files only; `setup()` runs the collectives (token cache, engine, resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as du
from .checkpoint import CheckpointManager
from .config import Config, resolve_model_path
from .engine import Engine, zero_stage
from .evaluation import StsValidator
from .export import write_best
from .loggers import MetricsLogger, truncate_jsonl
from .model import Encoder
from .pipeline import InputPipeline
from .preempt import StopRequest
from .readers import read_sts_pairs, resolve_path
from .rundir import prepare_output_dir
from .state import MetricsWindow, RngStreams
from .step import Batch, ContrastiveLoss, StepResult, forward_backward


class NonFiniteLossError(RuntimeError):
    """train/loss became NaN/Inf and train.on_nonfinite=stop."""


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


class Trainer:
    def __init__(self, cfg: Config, env: du.DistEnv, quiet: bool = False) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.env = cfg, env
        self.say = (lambda s: None) if (quiet or not env.is_main) else _write
        self.out = Path(cfg.train.output_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path), use_fast=True)
        self.data = InputPipeline(cfg, env, self.tokenizer)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.data.plan.steps_per_epoch
        dev = cfg.eval.sts_dev_file
        self.validator = StsValidator(read_sts_pairs(resolve_path(dev)), cfg.eval.every_steps,
                                      cfg.eval.batch_size) if dev else None
        self.ckpt = CheckpointManager(self.out, cfg.checkpoint, env.rank, env.world_size)
        self.loss_fn = ContrastiveLoss(cfg.model.temperature, cfg.optim.hard_negative_weight,
                                       self.data.mask_duplicates, env.rank, env.world_size)
        self.encoder: Encoder | None = None
        self.engine: Engine | None = None
        self.window: MetricsWindow | None = None
        self.start_step: int | None = None

    def setup(self) -> int:
        """Output dir, token cache, engine, resume. Returns the first step to run. collective."""
        if self.start_step is not None:
            return self.start_step
        cfg, env = self.cfg, self.env
        if env.is_main:
            prepare_output_dir(cfg, self.say)
        du.barrier()
        self.data.setup(self.say)
        latest = self.ckpt.latest() if cfg.checkpoint.resume else None
        universal = latest is not None and self.ckpt.needs_universal(latest, zero_stage(cfg))
        torch.manual_seed(cfg.train.seed)  # identical initial weights (the MLP head) on every rank
        self.encoder = Encoder.from_config(cfg.model)
        self.engine = Engine(self.encoder, cfg, env.world_size, self.total_steps, load_universal=universal)
        self.engine.train()  # from_pretrained returns eval mode: dropout (the augmentation) must be on
        torch.manual_seed(cfg.train.seed + env.rank)  # each rank draws its own dropout masks
        self.window = MetricsWindow(self.engine.device)
        self.ckpt.register("window", self.window, same_world_only=True)
        if self.validator is not None:
            self.ckpt.register("best", self.validator)
        self.ckpt.register_rng(RngStreams())
        self._announce()
        self.start_step = 0 if latest is None else self._resume(latest, universal)
        if env.is_main:
            truncate_jsonl(self.out / "metrics.jsonl", keep_through_step=self.start_step)
        return self.start_step

    def _announce(self) -> None:
        p, cfg, k = self.data.plan, self.cfg, self.data.k
        candidates = (p.global_batch_size if cfg.train.grad_cache else p.world_size * p.micro_batch_size) * (k - 1)
        self.say(f"data: {p.num_examples} examples from {cfg.data.train_file} ({self.data.blank_lines} blank lines "
                 f"skipped); {p.steps_per_epoch} steps/epoch, {p.dropped_per_epoch} examples dropped per epoch "
                 "(drop_last)")
        self.say(
            f"batch: world_size {p.world_size} x grad_accum {p.grad_accum} x micro_batch {p.micro_batch_size} "
            f"= global_batch {p.global_batch_size}; {candidates} candidates per anchor "
            f"(1 positive, {candidates - 1} negatives)"
            + ("; gradient caching: negatives from the whole global batch" if cfg.train.grad_cache else
               "; with grad_accum > 1 negatives come from one micro-step only" if p.grad_accum > 1 else "")
            + (f"; duplicate texts masked ({p.num_examples} examples hashed)" if self.data.mask_duplicates else ""))
        self.say(f"engine: ZeRO-{self.engine.zero_stage} {cfg.engine.precision}, {self.total_steps} optimizer steps, "
                 f"lr {cfg.optim.lr}, clip {cfg.engine.gradient_clipping}, device {self.engine.device}")

    def _resume(self, latest: Path, universal: bool) -> int:
        meta = self.ckpt.load(self.engine, latest, universal)
        if meta["world_size"] != self.env.world_size:
            self.say(f"resuming at world size {self.env.world_size} from a checkpoint written at world size "
                     f"{meta['world_size']} (same global batch and data order; dropout RNG streams differ, "
                     "so the losses are not bit-identical to an uninterrupted run)")
        self.say(f"resumed from step {meta['step']} ({latest})")
        if meta["step"] >= self.total_steps:
            self.say(f"nothing to train: the run in {self.out} already finished its {self.total_steps} steps "
                     "(use another train.output_dir, or train.overwrite=true with a changed config)")
        return meta["step"]

    # -- one optimizer step --------------------------------------------------------------------
    def forward_backward(self, batches: list[Batch]) -> StepResult:
        """Everything of one optimizer step but engine.step(): gradients are complete afterwards."""
        encode = lambda inputs: self.engine(**inputs)  # noqa: E731  [b, k, d], all views in one forward
        return forward_backward(batches, encode, self.engine.backward, self.loss_fn, self.cfg.train.grad_cache)

    def train_step(self, batches: list[Batch], stop: StopRequest, step: int) -> bool:
        """One optimizer step. Returns True when a stop was requested on any rank (the step is
        still completed, so the checkpoint is consistent)."""
        self.window.tokens += sum(b.tokens for b in batches)
        result = self.forward_backward(batches)
        bad = ~torch.isfinite(result.loss)
        # collective, once per step: did any rank see a non-finite loss or a stop request?
        flags = du.all_reduce_max(torch.stack([bad.float(), torch.tensor(float(stop.requested()), device=bad.device)]))
        any_bad, any_stop = (bool(x) for x in flags.tolist())  # note: a host sync point
        if any_bad:
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite train/loss at step {step + 1}; no update applied. Last checkpoint: "
                    f"{self.ckpt.latest() or 'none'}. Lower optim.lr, use fp32/bf16, or set train.on_nonfinite=skip")
            self.say(f"step {step + 1}: non-finite train/loss on some rank; step skipped (train.on_nonfinite=skip)")
            self.engine.drop_gradients()
        else:
            self.window.add(result.loss, result.masked)
        self.engine.step()
        return any_stop

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        start = self.setup()
        logger = MetricsLogger(self.cfg, self.env.is_main, self.say)
        stop = StopRequest(check_file=self.env.is_main)
        bar = self._progress_bar(start)
        stopped = False
        try:
            for step, batches in self.data.steps(start, self.total_steps, self.engine.device):
                lr = self.engine.lr()
                stopped = self.train_step(batches, stop, step)
                done = step + 1
                if done % self.cfg.log.every_steps == 0 or done == self.total_steps:
                    self._log(logger, bar, lr, done)
                if self.validator is not None and self.validator.due(done, self.total_steps):
                    self._evaluate(logger, done)
                if self.ckpt.due(done, self.total_steps, stopped):
                    self.ckpt.save(self.engine, done, {"zero_stage": self.engine.zero_stage,
                                                       "global_batch_size": self.cfg.train.global_batch_size})
                if bar is not None:
                    bar.update(1)
                if stopped:
                    stop.clear_file()
                    self.say(f"stopped at step {done} ({stop.reason()}): checkpoint saved in {self.ckpt.latest()}; "
                             "rerun the same command to resume")
                    break
            else:
                if self.validator is None and start < self.total_steps:
                    self.say("no eval.sts_dev_file: best/ holds the final model")
                    self._export_best(self.total_steps, None)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return self._finish(stopped)

    def _log(self, logger: MetricsLogger, bar, lr: float, step: int) -> None:
        metrics = self.window.summarize(lr, self.engine.grad_norm(), self.cfg.train.global_batch_size,
                                        self.data.mask_duplicates)
        logger.log(metrics, step)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")

    def _evaluate(self, logger: MetricsLogger, step: int) -> None:
        """collective: every rank encodes a share of the dev set."""
        t0 = time.perf_counter()
        metrics, improved = self.validator.run(self.engine, self.tokenizer, step)
        if improved:
            self._export_best(step, metrics["eval/stsb_spearman"])
        logger.log(metrics, step)
        self.window.t0 += time.perf_counter() - t0  # throughput excludes evaluation

    def _export_best(self, step: int, score: float | None) -> None:
        """Publish best/. collective: ZeRO gathers the full weights on every rank."""
        state = self.engine.full_state_dict()
        if self.env.is_main:
            write_best(self.out / "best", state, self.encoder, self.tokenizer,
                       {"step": step, "stsb_dev_spearman": score})
        du.barrier()

    def _finish(self, stopped: bool) -> TrainResult:
        v = self.validator
        best_score, best_step = (v.best_score, v.best_step) if v is not None else (None, self.total_steps)
        best_dir = self.out / "best"
        if not stopped and v is None:
            self.say(f"done: {self.total_steps} steps; final model in {best_dir}")
        elif not stopped:
            score = "n/a" if best_score is None else f"{best_score:.4f}"
            self.say(f"done: {self.total_steps} steps; best dev spearman {score} at step {best_step}; "
                     f"model in {best_dir}")
        return TrainResult(self.total_steps, best_score, best_step, best_dir, stopped)

    def _progress_bar(self, start: int):
        if not (self.env.is_main and self.cfg.log.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start, desc="train", dynamic_ncols=True)
