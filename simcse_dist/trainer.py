"""The training loop: encode -> gather -> loss -> backward -> step, plus log/eval cadence."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as du
from .config import Config, resolve_model_path, save_config
from .data import BatchPlan, Collator, GlobalBatchSampler, load_examples
from .engine import Engine
from .evaluation import sts_spearman
from .gather import gather_candidates
from .loggers import MetricsLogger
from .loss import simcse_loss
from .model import Encoder, save_encoder
from .readers import read_sts_pairs, resolve_path


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


class Trainer:
    def __init__(self, cfg: Config, env: du.DistEnv, quiet: bool = False) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.env = cfg, env
        self.say = (lambda s: None) if (quiet or not env.is_main) else _write
        self.out = Path(cfg.train.output_dir)
        self.examples, blank = load_examples(cfg.data.train_file, cfg.data.format, cfg.train.objective)
        self.plan = BatchPlan(len(self.examples), cfg.train.global_batch_size, env.world_size, cfg.train.grad_accum)
        self.sampler = GlobalBatchSampler(self.plan, env.rank, cfg.train.seed, cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.plan.steps_per_epoch
        path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        self.collate = Collator(self.tokenizer, cfg.data.max_seq_len, cfg.train.objective)
        self.dev_pairs = read_sts_pairs(resolve_path(cfg.eval.sts_dev_file)) if cfg.eval.sts_dev_file else None

        torch.manual_seed(cfg.train.seed)  # identical initial weights (the MLP head) on every rank
        self.encoder = Encoder.from_config(cfg.model)
        self.engine = Engine(self.encoder, cfg, env.world_size, self.total_steps)
        torch.manual_seed(cfg.train.seed + env.rank)  # each rank draws its own dropout masks
        self.k = 2 if cfg.train.objective == "unsup" else len(self.examples[0])
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._announce(blank)

    def _announce(self, blank: int) -> None:
        p, cfg = self.plan, self.cfg
        candidates = p.world_size * p.micro_batch_size * (self.k - 1)
        self.say(
            f"data: {p.num_examples} examples from {cfg.data.train_file} ({blank} blank lines skipped); "
            f"{p.steps_per_epoch} steps/epoch, {p.dropped_per_epoch} examples dropped per epoch (drop_last)"
        )
        self.say(
            f"batch: world_size {p.world_size} x grad_accum {p.grad_accum} x micro_batch {p.micro_batch_size} "
            f"= global_batch {p.global_batch_size}; {candidates} candidates per anchor "
            f"(1 positive, {candidates - 1} negatives)"
            + ("; with grad_accum > 1 negatives come from one micro-step only" if p.grad_accum > 1 else "")
        )
        self.say(
            f"engine: ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}, {self.total_steps} optimizer steps, "
            f"lr {cfg.optim.lr}, clip {cfg.engine.gradient_clipping}, device {self.engine.device}"
        )

    # -- one micro-step ------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Local loss of one micro-batch [b, k, L]: this rank's anchors vs the global candidates."""
        z = self.engine(**batch)  # [b, k, d], all views in one forward
        anchors, candidates = gather_candidates(z)  # [b, d], [(k-1)*N*b, d]  (collective)
        b = z.shape[0]
        return simcse_loss(z, candidates, self.env.rank * b, self.cfg.model.temperature,
                           self.cfg.optim.hard_negative_weight)

    def micro_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([self.examples[i] for i in indices])
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, log_every = self.cfg, self.cfg.log.every_steps
        self.out.mkdir(parents=True, exist_ok=True)
        if self.env.is_main:
            save_config(cfg, self.out / "config.yaml")
        logger = MetricsLogger(cfg, self.env.is_main, self.say)
        bar = self._progress_bar()
        window = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "loss": torch.zeros(())}
        step = 0
        try:
            self.engine.train()
            for step, micro_indices in self.sampler.iter_steps(0, self.total_steps):
                lr = self.engine.lr()
                for indices in micro_indices:
                    batch = self.micro_batch(indices)
                    window["tokens"] += int(batch["attention_mask"].sum())
                    loss = self.compute_loss(batch)
                    self.engine.backward(loss)
                    self.engine.step()
                    window["loss"] = window["loss"] + loss.detach().float().cpu() / len(micro_indices)
                window["steps"] += 1
                done = step + 1
                if done % log_every == 0 or done == self.total_steps:
                    metrics = self._window_metrics(window, lr)
                    logger.log(metrics, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                    window = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "loss": torch.zeros(())}
                if self.dev_pairs is not None and (done % cfg.eval.every_steps == 0 or done == self.total_steps):
                    t_eval = time.perf_counter()
                    logger.log(self.evaluate(done), done)
                    window["t0"] += time.perf_counter() - t_eval  # throughput excludes evaluation
                if bar is not None:
                    bar.update(1)
            if self.dev_pairs is None:
                self.say("no eval.sts_dev_file: best/ holds the final model")
                self._export_best()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        best_dir = self.out / "best"
        self.say(f"done: {self.total_steps} steps; best dev spearman {self.best_score} at step {self.best_step}; "
                 f"model in {best_dir}")
        return TrainResult(self.total_steps, self.best_score, self.best_step, best_dir)

    def _progress_bar(self):
        if not (self.env.is_main and self.cfg.log.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, desc="train", dynamic_ncols=True)

    def _window_metrics(self, window: dict, lr: float) -> dict[str, float]:
        """Metrics over the steps since the last log. collective: all-reduces loss and tokens."""
        # The loss is averaged over ranks: each rank's loss is the mean over b local anchors, so
        # the mean of the rank means is the mean over the global batch.
        stats = torch.stack([window["loss"] / window["steps"], torch.tensor(float(window["tokens"]))])
        loss = float(du.all_reduce_mean(stats[:1])[0])
        tokens = float(du.all_reduce_sum(stats[1:])[0])  # note: this is a host sync point
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        metrics = {"train/loss": loss, "train/lr": lr}
        norm = self.engine.grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = norm
        metrics["train/sentences_per_s"] = window["steps"] * self.cfg.train.global_batch_size / elapsed
        metrics["train/tokens_per_s"] = tokens / elapsed
        return metrics

    # -- evaluation and the best model ---------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """STS dev Spearman; keeps the best model (highest score). collective: every rank."""
        self.engine.eval()
        score = sts_spearman(self.engine, self.tokenizer, self.dev_pairs, self.engine.device,
                             self.cfg.eval.batch_size)
        self.engine.train()
        metrics = {"eval/stsb_spearman": score}
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
