"""The run lifecycle: build the parts, resume, loop over steps (log / eval / checkpoint), finish.

The step algorithm is step.py's; the input pipeline data/pipeline.py's; what is saved and
when, checkpoint.py's; the STS dev cadence and best score, eval/validator.py's. Constructing a
Trainer reads files only; `setup()` runs the collectives (data preparation, engine, resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from simcse_dist import distributed as du
from simcse_dist import logs
from simcse_dist.config import Config, resolve_model_path
from simcse_dist.data.batch import Batch
from simcse_dist.data.order import SAMPLER_VERSION
from simcse_dist.data.pipeline import InputPipeline
from simcse_dist.data.readers import resolve_path
from simcse_dist.engine import Engine, zero_stage
from simcse_dist.eval.sts import read_pair_file
from simcse_dist.eval.validator import StsValidator
from simcse_dist.fsutil import WriteFailure, explain, human_bytes
from simcse_dist.model import packing
from simcse_dist.model.encoder import Encoder
from simcse_dist.model.export import write_best
from simcse_dist.model.lora import base_fingerprint
from simcse_dist.model.tokenizer import load_tokenizer
from simcse_dist.train.checkpoint import CheckpointManager, check_base, read_meta
from simcse_dist.train.frozen import FrozenModels
from simcse_dist.train.objective import Objective, ObjectiveSpec
from simcse_dist.train.preempt import StopRequest
from simcse_dist.train.rundir import RunLock, check_data, prepare_output_dir
from simcse_dist.train.sinks import MetricsLogger, truncate_jsonl
from simcse_dist.train.state import MetricsWindow, NonFiniteLossError, RngStreams, StepFlags
from simcse_dist.train.step import StepResult, forward_backward

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    steps: int  # optimizer steps done when the run ended (fewer than planned after a stop)
    best_score: float | None
    best_step: int | None
    best_dir: Path
    stopped: bool = False


class Trainer:
    def __init__(self, cfg: Config, env: du.DistEnv, stop: StopRequest | None = None) -> None:
        """`stop`: the process's stop request (simcse-train installs it before its imports); by
        default the trainer installs its own while it trains."""
        self.cfg, self.env = cfg, env
        self.stop, self._own_stop = stop or StopRequest(check_file=env.is_main), stop is None
        self.out = Path(cfg.train.output_dir)
        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.pooler)
        online = any(s.loss.guide or (s.loss.distill and s.loss.distill.teacher) for s in cfg.sources())
        self.frozen = FrozenModels(cfg, self.tokenizer) if online else None
        self.data = InputPipeline(cfg, env, self.tokenizer, self.frozen.tokenizers if self.frozen else None)
        self.total_steps = 0  # known once setup() has the row counts
        dev = cfg.eval.sts_dev_file
        serving = cfg.serving()
        prompt = serving["prompts"].get(serving["default_prompt_name"] or "", "")
        self.validator = (
            StsValidator(read_pair_file(resolve_path(dev)), cfg.eval.every_steps, cfg.eval.batch_size, prompt)
            if dev
            else None
        )
        self.ckpt = CheckpointManager(self.out, cfg.checkpoint, env.rank, env.world_size)
        self.loss_fns: list[Objective] = []  # one per source
        self.encoder: Encoder | None = None
        self.engine: Engine | None = None
        self.window: MetricsWindow | None = None
        self.flags: StepFlags | None = None
        self.start_step: int | None = None
        self.step = 0  # optimizer steps done
        self.finished = False  # the run had already finished and published everything (setup)
        self.lock = RunLock(self.out) if env.is_main else None
        self.base: dict | None = None  # LoRA's frozen base: path and sha256 (rank 0, setup)

    def close(self) -> None:
        """Release the output directory (rank 0)."""
        if self.lock is not None:
            self.lock.release()

    def setup(self) -> int:
        """Output dir, prepared data, engine, resume. Returns the first step to run. collective."""
        if self.start_step is not None:
            return self.start_step
        cfg, env = self.cfg, self.env

        def claim() -> None:  # rank 0: one run per output dir, then config.yaml
            self.lock.acquire()
            prepare_output_dir(cfg)

        du.agreed(claim if env.is_main else lambda: None)
        self.data.setup()
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.data.plan.steps_per_epoch
        self.loss_fns = [
            Objective(ObjectiveSpec.of(src.loss, md), env.rank, env.world_size)
            for src, md in zip(self.data.sources, self.data.mask_duplicates, strict=True)
        ]
        latest = self.ckpt.latest() if cfg.checkpoint.resume else None
        if latest is not None:
            meta = read_meta(latest)

            du.agreed(
                lambda: (
                    check_data(meta, self.data.fingerprints(), latest, cfg.data.allow_changed_data)
                    if env.is_main
                    else None
                )
            )
            if meta["step"] >= self.total_steps and self._published(meta):
                log.info(
                    f"nothing to train: the run in {self.out} finished its {meta['step']} steps and its model is "
                    f"in {self.out / 'best'}; to train on, raise train.max_steps (or train.epochs) and rerun"
                )
                self.start_step = self.step = meta["step"]
                self.finished = True
                if self.validator is not None and "best" in meta["parts"]:
                    self.validator.load_state_dict(meta["parts"]["best"])
                return self.start_step
        universal = latest is not None and self.ckpt.needs_universal(latest, zero_stage(cfg))
        torch.manual_seed(cfg.train.seed)  # identical initial weights (the MLP head) on every rank
        attention = packing.preferred_attention(cfg.model.attn_implementation, cfg.data.packing, cfg.engine.precision)
        self.encoder = Encoder.from_config(cfg.model, prefer_attention=attention)
        if cfg.data.packing:
            reason = packing.unsupported(self.encoder.backbone, cfg.model.pooler)
            if reason is None and not cfg.model.include_prompt and any(any(s.prompts) for s in self.data.sources):
                reason = "model.include_prompt false leaves prompt tokens out of a padded mean only"
            if reason is None:
                self.data.enable_packing()
                if self.validator is not None:
                    self.validator.pack_tokens = cfg.data.pack_row_tokens or cfg.data.max_seq_len
            else:
                log.info(f"data.packing: {reason}; training padded")

        def check_lora() -> None:  # rank 0, once the base's files are all here (a Hub id: downloaded)
            if env.is_main and cfg.model.lora.enabled:
                self.base = base_fingerprint(cfg.model.name_or_path)
            if env.is_main and latest is not None:
                check_base(read_meta(latest), self._base_meta(), latest)

        du.agreed(check_lora)
        if cfg.engine.activation_checkpointing:
            self.encoder.checkpoint_activations()
        self.engine = Engine(self.encoder, cfg, env.world_size, self.total_steps, load_universal=universal)
        self.engine.train()  # from_pretrained returns eval mode: dropout (the augmentation) must be on
        if self.frozen is not None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision, torch.float32)
            self.frozen.to(self.engine.device, dtype)
        torch.manual_seed(cfg.train.seed + env.rank)  # each rank draws its own dropout masks
        names = [s.name for s in self.data.sources]
        self.window = MetricsWindow(self.engine.device, names if len(names) > 1 else None)
        self.flags = StepFlags(self.engine.device)
        self.ckpt.register("window", self.window, same_world_only=True)
        if self.validator is not None:
            self.ckpt.register("best", self.validator)
        self.ckpt.register_rng(RngStreams())
        self._announce()
        self.start_step = self.step = 0 if latest is None else self._resume(latest, universal)
        self.window.drawn = self.data.sampler.mixture.steps_before(self.start_step)
        if env.is_main:
            truncate_jsonl(self.out / "metrics.jsonl", keep_through_step=self.start_step)
        return self.start_step

    def _announce(self) -> None:
        cfg = self.cfg
        for line in [
            *self.data.describe(),
            f"engine: ZeRO-{self.engine.zero_stage} {cfg.engine.precision}, "
            f"{self.total_steps} optimizer steps, lr {cfg.optim.lr}, clip {cfg.engine.gradient_clipping}, "
            f"device {self.engine.device}",
        ]:
            log.info(line)

    def _resume(self, latest: Path, universal: bool) -> int:
        meta = self.ckpt.load(self.engine, latest, universal)
        lr, saved_total = self.engine.sync_lr(), meta.get("total_steps", self.total_steps)
        if saved_total != self.total_steps and meta["step"] < self.total_steps:
            how = "extending" if self.total_steps > saved_total else "shortening"
            log.info(
                f"{how} the run from {saved_total} to {self.total_steps} steps: the linear LR schedule is "
                f"recomputed for {self.total_steps} steps: lr {lr:.3g} at step {meta['step']}, 0 at step "
                f"{self.total_steps}"
            )
        if meta["world_size"] != self.env.world_size:
            log.info(
                f"resuming at world size {self.env.world_size} from a checkpoint written at world size "
                f"{meta['world_size']} (same global batch and data order; dropout RNG streams differ, "
                "so the losses are not bit-identical to an uninterrupted run)"
            )
        log.info(f"resumed from step {meta['step']} ({latest})")
        if meta["step"] >= self.total_steps:
            log.info(
                f"the run finished its {meta['step']} steps but did not publish its final model: writing "
                f"{self.out / 'best'}"
            )
        return meta["step"]

    def _published(self, meta: dict) -> bool:
        """Whether best/ holds what the run at checkpoint `meta` publishes: the best dev model
        (its step recorded by the validator), or the final model when there is no dev set."""
        try:
            info = json.loads((self.out / "best" / "best_info.json").read_text())
        except (OSError, ValueError):
            return False
        want = meta["parts"].get("best", {}).get("step") if self.validator is not None else meta["step"]
        return self.validator is not None and want is None or info.get("step") == want

    # -- one optimizer step --------------------------------------------------------------------
    def forward_backward(self, batches: list[Batch]) -> StepResult:
        """Everything of one optimizer step but engine.step(): gradients are complete afterwards."""
        encode = lambda inputs: self.engine(**inputs)  # noqa: E731  [b, k, d], all views in one forward
        loss_fn = self.loss_fns[batches[0].source]  # a step's batches all come from one source
        if self.frozen is not None:  # the guide's and the teacher's embeddings of the same rows
            one_text = self.data.sources[batches[0].source].objective == "unsup"
            for batch in batches:
                self.frozen.embed(batch, loss_fn.spec.uses_guide, loss_fn.spec.uses_teacher, one_text)
        return forward_backward(batches, encode, self.engine.backward, loss_fn, self.cfg.train.grad_cache)

    def train_step(self, batches: list[Batch], stop: StopRequest, step: int, sync: bool = True) -> bool:
        """One optimizer step; True when a stop was requested on any rank (the step is still
        completed, so the checkpoint is consistent). The ranks' agreement on non-finite losses and
        stops (state.StepFlags) is read for this step when `sync` (it logs, evaluates or saves;
        every step under on_nonfinite=skip), else for the previous one, without a host sync."""
        self.window.tokens += sum(b.tokens for b in batches)
        result = self.forward_backward(batches)
        skip = self.cfg.train.on_nonfinite == "skip"
        _, any_stop, first_bad = self.flags.read()  # the previous step's
        self.flags.post(result.loss, stop.requested(), step)
        if sync or skip or any_stop:  # a stop saves a checkpoint: this step must be known finite
            bad, any_stop, first_bad = self.flags.read()
        if skip and bad:
            log.info(f"step {step + 1}: non-finite train/loss on some rank; step skipped (train.on_nonfinite=skip)")
            self.engine.drop_gradients()
        elif first_bad is not None and not skip:
            raise NonFiniteLossError(
                f"non-finite train/loss at step {first_bad + 1}; nothing after step {first_bad} is saved. Last "
                f"checkpoint: {self.ckpt.latest() or 'none'}. Lower optim.lr, use fp32/bf16, or set "
                "train.on_nonfinite=skip"
            )
        else:
            self.window.add(result.loss, result.masked, batches[0].source)
        self.engine.step()
        self.window.drawn[batches[0].source] += 1
        return any_stop

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        stopped = False
        try:
            start = self.setup()
            if not self.finished:
                stopped = self._loop(start)
        finally:
            self.close()
        return self._finish(stopped)

    def _loop(self, start: int) -> bool:
        """Steps start..total_steps-1, then the final export. Returns whether it stopped on request."""
        logger = bar = None
        stop, stopped = self.stop, False
        if self._own_stop:
            stop.install()
        try:
            stop.training(check_file=self.env.is_main)
            logger = MetricsLogger(self.cfg, self.env.is_main)
            bar = logs.progress(
                self.env.is_main and self.cfg.log.progress_bar, total=self.total_steps, initial=start, desc="train"
            )
            for step, batches in self.data.steps(start, self.total_steps, self.engine.device):
                lr, done = self.engine.lr(), step + 1
                due_log = done % self.cfg.log.every_steps == 0 or done == self.total_steps
                evaluate = self.validator is not None and self.validator.due(done, self.total_steps)
                sync = due_log or evaluate or self.ckpt.due(done, self.total_steps, False)
                stopped = self.train_step(batches, stop, step, sync)
                self.step = done
                if due_log:
                    self._log(logger, bar, lr, done)
                if evaluate:
                    self._evaluate(logger, done)
                if self.ckpt.due(done, self.total_steps, stopped):
                    self.ckpt.save(self.engine, done, self._checkpoint_meta())
                if bar is not None:
                    bar.update(1)
                if stopped:
                    stop.clear_file()
                    log.info(
                        f"stopped at step {done} ({stop.reason()}): checkpoint saved in {self.ckpt.latest()}; "
                        "rerun the same command to resume"
                    )
                    return True
            stop.finishing()
            if self.validator is None and not self._published({"step": self.total_steps}):
                log.info("no eval.sts_dev_file: best/ holds the final model")
                self._export_best(self.total_steps, None)
            return False
        finally:
            for part in (bar, logger):
                if part is not None:
                    part.close()
            if self._own_stop:
                stop.close()

    def _checkpoint_meta(self) -> dict:
        return {
            "zero_stage": self.engine.zero_stage,
            "total_steps": self.total_steps,
            "sampler": SAMPLER_VERSION,
            "data": self.data.fingerprints(),
            "global_batch_size": self.cfg.train.global_batch_size,
            **self._base_meta(),
        }

    def _base_meta(self) -> dict:
        """What a LoRA checkpoint trains on (rank 0): its settings and the frozen base's path and hash."""
        if not self.cfg.model.lora.enabled:
            return {}
        return {"lora": dataclasses.asdict(self.cfg.model.lora), "base": self.base}

    def _log(self, logger: MetricsLogger, bar, lr: float, step: int) -> None:
        masking = any(self.data.mask_duplicates) or any(f.spec.uses_guide for f in self.loss_fns)
        steps = self.window.steps
        metrics = self.window.summarize(lr, self.engine.grad_norm(), self.cfg.train.global_batch_size, masking)
        if self.frozen is not None:  # host seconds per step in the frozen models
            metrics["train/frozen_s_per_step"] = self.frozen.seconds / max(1, steps)
            self.frozen.seconds = 0.0
        self._log_rows(logger, metrics, step)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")

    def _evaluate(self, logger: MetricsLogger, step: int) -> None:
        """collective: every rank encodes a share of the dev set."""
        t0 = time.perf_counter()
        metrics, improved = self.validator.run(self.engine, self.tokenizer, step)
        if improved:
            self._export_best(step, metrics["eval/stsb_spearman"])
        self._log_rows(logger, metrics, step)
        self.window.t0 += time.perf_counter() - t0  # throughput excludes evaluation

    def _log_rows(self, logger: MetricsLogger, metrics: dict, step: int) -> None:
        """collective: a failed write of metrics.jsonl on rank 0 stops every rank."""
        du.agreed(
            lambda: logger.log(metrics, step),
            lambda e: WriteFailure(f"cannot write metrics {explain(self.out / 'metrics.jsonl', e)}"),
        )

    def _export_best(self, step: int, score: float | None) -> None:
        """Publish best/. collective: ZeRO gathers the full weights on every rank."""
        state = self.engine.full_state_dict(dst_rank=0, trainable_only=self.cfg.model.lora.enabled)
        best = self.out / "best"
        du.agreed(
            lambda: (
                write_best(
                    best,
                    state,
                    self.encoder,
                    self.tokenizer,
                    {"step": step, "stsb_dev_spearman": score},
                    self.cfg.to_dict(),
                    self.cfg.serving(),
                )
                if self.env.is_main
                else None
            ),
            lambda e: WriteFailure(
                f"cannot write the best model {explain(best, e)}; "
                + ("the previous best/ is intact" if best.exists() else "no best/ was written")
            ),
        )

    def _finish(self, stopped: bool) -> TrainResult:
        v, best_dir, last = self.validator, self.out / "best", self.ckpt.latest()
        best_score, best_step = (v.best_score, v.best_step) if v is not None else (None, self.total_steps)
        score = "n/a" if best_score is None else f"{best_score:.4f}"
        what = "final model" if v is None else f"best dev spearman {score} at step {best_step}; model"
        where = f"in {best_dir}" if best_dir.is_dir() else f"not written ({best_dir} does not exist)"
        if not stopped:
            log.info(
                f"done: {self.total_steps} steps; {what} {where}"
                + (f"; last checkpoint {last} ({human_bytes(self.ckpt.size(last))})" if last else "")
            )
        return TrainResult(self.step, best_score, best_step, best_dir, stopped)
