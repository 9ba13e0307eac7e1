"""Training throughput: simcse-dist's real trainer step (ZeRO 0-3) vs a hand-tuned plain PyTorch
loop vs sentence-transformers' MultipleNegativesRankingLoss, in one process, on one machine.
Run from the repository root:

    python -m bench.throughput                       # CPU: bundled all-MiniLM-L6-v2, fp32, batch 64
    python -m bench.throughput --output bench/out.json
    python -m bench.throughput --model tiny --steps 2 --warmup 1     # smoke test (CI)

GPU mode (default when CUDA is available): bert-base from `BertConfig()` (random weights), bf16,
batch 64 and 512, plus the peak memory of each implementation.

What is timed, per implementation, is one optimizer step from a list of sentences to updated
weights, the host side of the input included (`plain` and `st-mnrl` tokenize the same 64 strings
with the same fast tokenizer, dynamic padding, truncation at --seq-len; the trainer slices its
token cache), synchronised (`cuda.synchronize`) at the end of each step. Reported: median
ms/step over --steps steps after --warmup untimed steps, and sentences/s = batch / median step
time. To cancel drift (thermal, other jobs on the machine) the implementations are
interleaved: each of --rounds rounds runs every implementation for steps/rounds steps, in an
order rotated every round, and each implementation sees the same sequence of batches.

Implementations (see docs/performance.md for why each is built the way it is):
- simcse-zN:   `Trainer.setup()`, then per step `Trainer.data.prepare` and `Trainer.train_step`
               at ZeRO stage N with the default config (the real path: prepared corpus, Encoder,
               gather, loss, DeepSpeed engine, clipping, AdamW, LR schedule). With one process
               ZeRO-1/2 are DeepSpeed's own, partitioning over one rank.
- plain:       AutoModel + [CLS] + MLP (Linear+Tanh), one forward over both views, InfoNCE with
               tau = 0.05, clip_grad_norm_(1.0), torch AdamW (fused: CUDA and CPU kernels), LambdaLR.
- st-mnrl:     sentence-transformers model (its own pooling) + MultipleNegativesRankingLoss
               (scale 20 = 1/0.05) on pairs (s, s), manual loop with the same optimizer/clipping.
Optional (--impls): plain-pretok (batches tokenized before timing), plain-unfused (the per-tensor
AdamW loop, torch's CPU default) and simcse-zN-nocache (the trainer with its prepared-corpus
collator swapped for `data.Collator`: the tokenizer in the step).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
    DROPOUT,
    TEMPERATURE,
    argv_value,
    materialize_model,
    quiet_libraries,
    set_thread_env,
    start_result,
    sync,
    write_result,
)

if __name__ == "__main__":
    set_thread_env(argv_value(sys.argv, "--threads"))  # before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_IMPLS_CPU = "simcse-z0,simcse-z1,simcse-z2,simcse-z3,plain,st-mnrl"
OPTIONAL_IMPLS = "plain-pretok,plain-unfused,simcse-z0-nocache,simcse-z0-compile"


# ---------------------------------------------------------------------------------------------
# Set-up shared by every implementation
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Setup:
    """Everything an implementation needs to be built identically to the others."""

    model_dir: str  # a local HF model directory (weights + tokenizer)
    simcse_name: str  # model.name_or_path for simcse-dist (bundled:... or model_dir)
    data: str
    batch_size: int
    seq_len: int
    precision: str  # fp32 | bf16
    device: torch.device
    total_steps: int
    work_dir: Path
    texts: list[str] = field(default_factory=list)  # the training sentences
    micro: list = field(default_factory=list)  # the trainer sampler's MicroBatch list of each step
    batches: list[list[int]] = field(default_factory=list)  # example indices of each step

    @property
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Implementations: build() once, step(i) runs optimizer step i on batch i
# ---------------------------------------------------------------------------------------------
class Impl:
    name: str

    def step(self, i: int) -> None:
        """Run optimizer step i on batch i (no host sync of its own; the caller synchronises)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SimcseImpl(Impl):
    """The real simcse-dist path: Trainer(cfg, env).setup(), then for step i the input
    pipeline's host side (`trainer.data.prepare`, what `data.steps` runs without DataLoader
    workers) and `trainer.train_step(batches, stop, i)`.

    The batches are prepared inside the timed step, as the other implementations tokenize
    inside theirs; `data.steps` on CUDA would prepare them ahead in DataLoader workers.
    """

    def __init__(self, s: Setup, stage: int, cached: bool = True, compiled: bool = False) -> None:
        from simcse_dist.config import load_config
        from simcse_dist.data.collate import Collator
        from simcse_dist.data.readers import read_train_examples
        from simcse_dist.distributed import DistEnv
        from simcse_dist.train.preempt import StopRequest
        from simcse_dist.train.trainer import Trainer

        self.name = f"simcse-z{stage}" + ("" if cached else "-nocache") + ("-compile" if compiled else "")
        overrides = [
            f"model.name_or_path={s.simcse_name}",
            f"model.dropout={DROPOUT}",
            f"loss.temperature={TEMPERATURE}",
            "model.pooler=cls",
            f"data.train_file={s.data}",
            f"data.max_seq_len={s.seq_len}",
            f"train.global_batch_size={s.batch_size}",
            f"train.max_steps={s.total_steps}",
            f"train.output_dir={s.work_dir / self.name}",
            "train.overwrite=true",
            "checkpoint.resume=false",
            "checkpoint.every_steps=0",
            f"engine.zero_stage={stage}",
            f"engine.precision={s.precision}",
            "log.wandb_mode=disabled",
            "log.progress_bar=false",
            f"data.cache_dir={s.work_dir / 'token-cache'}",
            f"engine.compile={str(compiled).lower()}",
        ]
        self.s = s
        self.trainer = Trainer(load_config(None, overrides), DistEnv.from_env())
        self.trainer.setup()  # prepared corpus, engine (collective; one rank here)
        self.stop = StopRequest(check_file=False)
        examples = [ex[:1] for ex in read_train_examples(s.data)[0]]
        if not cached:  # the tokenizer in the step, as plain and st-mnrl
            collate = Collator(self.trainer.tokenizer, s.seq_len, "unsup")
            self.trainer.data.collators[0] = lambda indices: collate([examples[i] for i in indices])
        if not s.batches:  # the data order every implementation follows
            data = self.trainer.data
            s.texts = [ex[0] for ex in examples]
            s.micro = [micro for _, micro in data.sampler.iter_steps(0, s.total_steps)]
            s.batches = [list(micro[0].indices) for micro in s.micro]

    def step(self, i: int) -> None:
        t = self.trainer
        batches = [t.data.prepare(mb).to(t.engine.device) for mb in self.s.micro[i]]
        t.train_step(batches, self.stop, i)

    def close(self) -> None:
        del self.trainer


class MLPHead(nn.Module):
    """SimCSE's MLPLayer (Linear + Tanh), as in the paper's cls pooler."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def linear_decay(total: int) -> Callable[[int], float]:
    return lambda step: max(0.0, (total - step) / max(1, total))


class PlainImpl(Impl):
    """The hand-tuned reference: what one would write without any framework."""

    def __init__(self, s: Setup, pretokenized: bool = False, fused: bool = True) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.name = ("plain-pretok" if pretokenized else "plain") + ("" if fused else "-unfused")
        self.s = s
        self.tok = AutoTokenizer.from_pretrained(s.model_dir, use_fast=True)
        config = AutoConfig.from_pretrained(
            s.model_dir, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT
        )
        torch.manual_seed(1)
        self.model = AutoModel.from_pretrained(s.model_dir, config=config, add_pooling_layer=False).to(s.device)
        self.mlp = MLPHead(config.hidden_size).to(s.device)
        self.model.train()
        self.params = [*self.model.parameters(), *self.mlp.parameters()]
        # weight_decay 0: the trainer's default (optim.weight_decay), not torch's 0.01
        self.opt = torch.optim.AdamW(
            self.params, lr=3e-5, weight_decay=0.0, fused=fused
        )  # hand-tuned: fused kernel on CPU too
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, linear_decay(s.total_steps))
        self.labels = torch.arange(s.batch_size, device=s.device)
        self.pretok: list[dict[str, torch.Tensor]] | None = None
        if pretokenized:
            self.pretok = [self._tokenize(b) for b in s.batches]

    def _tokenize(self, indices: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.s.texts[i] for i in indices]
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.s.seq_len, return_tensors="pt")
        return {k: v.repeat(2, 1) for k, v in enc.items()}  # [2b, L]: both views in one forward

    def step(self, i: int) -> None:
        s = self.s
        batch = self.pretok[i] if self.pretok is not None else self._tokenize(s.batches[i])
        batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
        with s.autocast:
            cls = self.model(**batch).last_hidden_state[:, 0]  # [2b, d]
            z = self.mlp(cls).float()
        b = s.batch_size
        a, p = F.normalize(z[:b], dim=-1), F.normalize(z[b:], dim=-1)
        loss = F.cross_entropy(a @ p.T / TEMPERATURE, self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


class STImpl(Impl):
    """The peer: sentence-transformers' model and MultipleNegativesRankingLoss on pairs (s, s).

    A manual loop over its model + loss (no SentenceTransformerTrainer, whose datasets/HF Trainer
    machinery would only add overhead to the peer), same optimizer, clipping and schedule.
    """

    def __init__(self, s: Setup) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        self.name = "st-mnrl"
        self.s = s
        torch.manual_seed(2)
        self.model = SentenceTransformer(
            s.model_dir,
            device=str(s.device),
            config_kwargs={"hidden_dropout_prob": DROPOUT, "attention_probs_dropout_prob": DROPOUT},
        )
        self.model.max_seq_length = s.seq_len
        self.model.train()
        self.loss = MultipleNegativesRankingLoss(self.model, scale=1.0 / TEMPERATURE)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=3e-5, weight_decay=0.0, fused=True)  # as plain and the trainer
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, linear_decay(s.total_steps))

    def step(self, i: int) -> None:
        s = self.s
        texts = [s.texts[j] for j in s.batches[i]]
        features = self.model.preprocess(texts)
        features = {k: v.to(s.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in features.items()}
        with s.autocast:
            loss = self.loss([features, dict(features)], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def known(name: str) -> bool:
    """simcse-zN[-nocache][-compile] (N in 0-3), plain, plain-pretok, plain-unfused or st-mnrl."""
    if name.startswith("simcse-z"):
        return name.removeprefix("simcse-z").removesuffix("-compile").removesuffix("-nocache") in ("0", "1", "2", "3")
    return name in ("plain", "plain-pretok", "plain-unfused", "st-mnrl")


def build(name: str, s: Setup) -> Impl:
    if not known(name):
        raise SystemExit(f"--impls: unknown implementation {name!r}")
    if name.startswith("simcse-z"):
        flags = name.removeprefix("simcse-z").split("-")
        return SimcseImpl(s, int(flags[0]), cached="nocache" not in flags, compiled="compile" in flags)
    if name == "plain":
        return PlainImpl(s)
    if name == "plain-unfused":
        return PlainImpl(s, fused=False)
    if name == "plain-pretok":
        return PlainImpl(s, pretokenized=True)
    return STImpl(s)


def dropout_of(impl: Impl) -> set[float]:
    """Dropout probabilities of every nn.Dropout and attention config: the check that all
    implementations train with the same augmentation."""
    module = {"SimcseImpl": lambda m: m.trainer.encoder, "PlainImpl": lambda m: m.model, "STImpl": lambda m: m.model}[
        type(impl).__name__
    ](impl)
    ps = {float(m.p) for m in module.modules() if isinstance(m, nn.Dropout)}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attention_probs_dropout_prob"):
            ps.add(float(cfg.attention_probs_dropout_prob))
    return ps


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def param_count(impl: Impl) -> int:
    module = impl.trainer.encoder if isinstance(impl, SimcseImpl) else impl.model
    n = sum(p.numel() for p in module.parameters())
    if isinstance(impl, PlainImpl):
        n += sum(p.numel() for p in impl.mlp.parameters())
    return n


def measure(s: Setup, names: list[str], steps: int, warmup: int, rounds: int, log: Callable[[str], None]) -> list[dict]:
    """Build and warm up every implementation, then run `rounds` interleaved timed rounds.

    GPU memory of an implementation = what it keeps between steps (weights, grads, optimizer
    state: allocated after its warm-up minus allocated before it was built) + the largest
    transient of its timed steps (peak minus allocated at the start of its run).
    """
    cuda = s.device.type == "cuda"
    impls: list[Impl] = []
    kept: dict[str, int] = {}
    cursor: dict[str, int] = {}  # next batch index of each implementation
    times: dict[str, list[float]] = {}
    round_of: dict[str, list[int]] = {}  # the round each timed step ran in (for paired ratios)
    transient: dict[str, int] = {}
    current_round = 0

    def run(impl: Impl, n: int, timed: bool) -> None:
        sync(s.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(s.device)
            base = torch.cuda.memory_allocated(s.device)
        for _ in range(n):
            i = cursor[impl.name]
            sync(s.device)
            t0 = time.perf_counter()
            impl.step(i)
            sync(s.device)  # note: the timed region ends when the device is done
            dt = time.perf_counter() - t0
            cursor[impl.name] = i + 1
            if timed:
                times[impl.name].append(dt)
                round_of[impl.name].append(current_round)
        if cuda and timed:
            transient[impl.name] = max(transient.get(impl.name, 0), torch.cuda.max_memory_allocated(s.device) - base)

    # simcse first: its sampler defines the batches every implementation follows.
    for name in sorted(names, key=lambda n: not n.startswith("simcse")):
        if not s.batches and not name.startswith("simcse"):
            s.batches, s.texts = _fallback_batches(s)
        before = torch.cuda.memory_allocated(s.device) if cuda else 0
        t0 = time.perf_counter()
        impl = build(name, s)
        cursor[impl.name], times[impl.name], round_of[impl.name] = 0, [], []
        run(impl, warmup, timed=False)  # allocator, lazily created optimizer state, autotuning
        if cuda:
            kept[impl.name] = torch.cuda.memory_allocated(s.device) - before
        impls.append(impl)
        log(f"  built and warmed up {name} in {time.perf_counter() - t0:.1f}s (dropout p {sorted(dropout_of(impl))})")
    per_round = max(1, math.ceil(steps / rounds))
    loads = []
    for r in range(rounds):
        current_round = r
        k = r % len(impls)
        for impl in impls[k:] + impls[:k]:  # rotated order: no implementation always runs first
            left = steps - len(times[impl.name])
            if left > 0:
                run(impl, min(per_round, left), timed=True)
        loads.append(round(os.getloadavg()[0], 2))
        log(
            f"  round {r + 1}/{rounds}: load {loads[-1]:.2f}; median so far: "
            + ", ".join(f"{n} {1000 * statistics.median(t):.0f}ms" for n, t in times.items() if t)
        )
    rows = []
    for impl in impls:
        t = sorted(times[impl.name])
        med = statistics.median(t)
        row = {
            "impl": impl.name,
            "batch_size": s.batch_size,
            "steps_timed": len(t),
            "ms_per_step": 1000 * med,
            "sentences_per_s": s.batch_size / med,
            "ms_p10": 1000 * t[int(0.1 * (len(t) - 1))],
            "ms_p90": 1000 * t[int(0.9 * (len(t) - 1))],
            "ms_all": [round(1000 * x, 2) for x in times[impl.name]],
            "round_of_step": round_of[impl.name],
            "params": param_count(impl),
            "load_avg_per_round": loads,
        }
        if cuda:
            row["peak_mem_gib"] = (kept[impl.name] + transient.get(impl.name, 0)) / 2**30
        rows.append(row)
    for impl in impls:
        impl.close()
    del impls
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _fallback_batches(s: Setup) -> tuple[list[list[int]], list[str]]:
    """Batches when no simcse implementation was requested: the same sampler, built directly."""
    from simcse_dist.data.readers import load_examples
    from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler

    examples, _ = load_examples(s.data, None, "unsup")
    sampler = GlobalBatchSampler(BatchPlan(len(examples), s.batch_size, 1, 1), 0, 42, True)
    batches = [list(micro[0].indices) for _, micro in sampler.iter_steps(0, s.total_steps)]
    return batches, [ex[0] for ex in examples]


def paired_ratio(row: dict, ref: dict) -> float | None:
    """Median over rounds of (ref's median step time / row's median step time) in the same round:
    both ran within one round of each other, so load that changes between rounds cancels."""
    ratios = []
    for r in sorted(set(row["round_of_step"]) & set(ref["round_of_step"])):
        mine = [t for t, q in zip(row["ms_all"], row["round_of_step"], strict=True) if q == r]
        theirs = [t for t, q in zip(ref["ms_all"], ref["round_of_step"], strict=True) if q == r]
        ratios.append(statistics.median(theirs) / statistics.median(mine))
    return statistics.median(ratios) if ratios else None


def add_ratios(rows: list[dict]) -> None:
    """Sentences/s ratios to the plain loop and to sentence-transformers: of the overall medians
    (vs_plain, vs_st) and paired by round (vs_plain_paired, vs_st_paired)."""
    by = {(r["batch_size"], r["impl"]): r for r in rows}
    for r in rows:
        for ref, key in (("plain", "vs_plain"), ("st-mnrl", "vs_st")):
            other = by.get((r["batch_size"], ref))
            if other:
                r[key] = r["sentences_per_s"] / other["sentences_per_s"]
                r[f"{key}_paired"] = paired_ratio(r, other)


def table(rows: list[dict]) -> str:
    """Ratios: of the overall medians, and (in brackets) the median of per-round paired ratios."""
    mem = any("peak_mem_gib" in r for r in rows)

    def ratio(r: dict, key: str) -> str:
        if key not in r:
            return f"{'-':>17}"
        paired = r.get(f"{key}_paired")
        return f"{r[key]:>7.3f}x ({paired:.3f}x)" if paired is not None else f"{r[key]:>7.3f}x {'':9}"

    head = (
        f"{'batch':>5} {'implementation':<28} {'sent/s':>8} {'ms/step':>9} {'p10-p90 ms':>17} "
        f"{'vs plain (paired)':>19} {'vs st (paired)':>19}" + (f" {'peak GiB':>9}" if mem else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['batch_size']:>5} {r['impl']:<28} {r['sentences_per_s']:>8.1f} {r['ms_per_step']:>9.1f} "
            f"{r['ms_p10']:>8.1f}-{r['ms_p90']:<8.1f} {ratio(r, 'vs_plain'):>19} {ratio(r, 'vs_st'):>19}"
        )
        if mem:
            line += f" {r.get('peak_mem_gib', float('nan')):>9.2f}"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--model",
        default=None,
        help="minilm (CPU default) | bert-base (GPU default, random weights) | tiny | a model dir",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="CPU default fp32, GPU bf16")
    p.add_argument("--batch-sizes", default=None, help="comma-separated; CPU default 64, GPU 64,512")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the timed steps are split into")
    p.add_argument(
        "--impls",
        default=DEFAULT_IMPLS_CPU,
        help=f"comma-separated from {DEFAULT_IMPLS_CPU},{OPTIONAL_IMPLS} (any simcse-zN-nocache)",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=None, help="OMP/intra-op threads (default: all cores)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and cuda)
    args.device = "cuda" if use_cuda else "cpu"
    args.model = args.model or ("bert-base" if use_cuda else "minilm")
    args.precision = args.precision or ("bf16" if use_cuda else "fp32")
    args.batch_sizes = [int(x) for x in (args.batch_sizes or ("64,512" if use_cuda else "64")).split(",")]
    args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    unknown = [x for x in args.impls if not known(x)]
    if unknown:
        p.error(
            f"--impls: unknown {unknown}; simcse-zN[-nocache] (N 0-3), plain, plain-pretok, plain-unfused, "
            "st-mnrl (with one rank simcse-zN is DeepSpeed's own ZeRO-N: what `+partition` measured)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    from simcse_dist.distributed import DistEnv, init_distributed

    env = DistEnv.from_env()
    if env.world_size != 1:
        raise SystemExit("python -m bench.throughput measures one process; run it without a launcher")
    init_distributed(env, 600)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    log = lambda line: print(line, flush=True)  # noqa: E731
    result = start_result(args)
    info = result["machine"]
    log(
        f"machine: {info.get('cpu_model')} x{info['cpu_count']}, torch threads {info['torch_threads']}"
        + (f", {info['gpu']}" if "gpu" in info else "")
        + f"; load {os.getloadavg()[0]:.2f}"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="simcse-bench-") as tmp:
        model_dir, simcse_name = materialize_model(args.model, Path(tmp))
        for bs in args.batch_sizes:
            setup = Setup(
                model_dir=model_dir,
                simcse_name=simcse_name,
                data=args.data,
                batch_size=bs,
                seq_len=args.seq_len,
                precision=args.precision,
                device=device,
                total_steps=args.warmup + args.steps,
                work_dir=Path(tmp) / f"b{bs}",
            )
            log(
                f"batch {bs}: model {args.model}, {args.precision}, seq {args.seq_len}, {args.device}, "
                f"{args.steps} timed steps in {args.rounds} rounds after {args.warmup} warm-up"
            )
            rows += measure(setup, args.impls, args.steps, args.warmup, args.rounds, log)
    add_ratios(rows)
    log("")
    log(table(rows))
    result["results"] = rows
    write_result(result, args.output, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
