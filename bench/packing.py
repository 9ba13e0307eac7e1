"""Sequence packing and the token-balanced batch: sentences/s and tokens/s of the trainer padded,
packed and packed + balanced, next to a plain padded PyTorch loop and sentence-transformers'
MultipleNegativesRankingLoss, on the same model, data and batches, in one run.

    python -m bench.packing --output bench/results/packing-cpu.json        # the full CPU table
    python -m bench.packing --cases sup-nli-32 --ranks 1 --steps 2 --warmup 1 --rounds 1   # smoke

Cases: unsup-wiki-32, unsup-wiki-64 (wiki1m sample, max_seq_len 32 / 64) and sup-nli-32 (NLI
triplets, the supervised recipe: 3 sentences per example). Rows:
- simcse-padded, simcse-packed, simcse-balanced (packed + data.balance_tokens): the real trainer
  step (Trainer.setup(), then per step `data.prepare` of every micro-batch + `train_step`,
  ZeRO-0, cls pooler + MLP, dropout 0.1), at 1 rank in this process and at 2 ranks under
  torchrun (--ranks 1,2; global batch --batch, so each rank has half). Packed rows hold
  --pack-row-tokens tokens (default: max_seq_len).
- plain: AutoModel + [CLS] + MLP, one forward over every view, InfoNCE (with the hard negatives
  as extra candidates for sup), clipping, fused AdamW, dynamic padding: the loop one would write.
- st-mnrl: sentence-transformers' model + MNRL on (s, s) pairs or (s, pos, neg) triplets.
plain and st-mnrl run at 1 rank only. Timing: median step over --steps timed steps after
--warmup, the implementations interleaved over --rounds rounds (1-rank rows); sentences/s =
sentences encoded per step (batch x views) / median step; real tokens/s counts the non-padding
tokens; `computed/real` is how many token positions the encoder ran per real token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    DROPOUT,
    REPO,
    TEMPERATURE,
    argv_value,
    materialize_model,
    quiet_libraries,
    set_thread_env,
    start_result,
    write_result,
)

if __name__ == "__main__":
    set_thread_env(argv_value(sys.argv, "--threads"))  # before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CASES = {
    "unsup-wiki-32": ("unsup", DATA / "wiki1m-sample.txt", 32),
    "unsup-wiki-64": ("unsup", DATA / "wiki1m-sample.txt", 64),
    "sup-nli-32": ("sup", DATA / "nli-sample.tsv", 32),
}
TRAINER_ROWS = {"simcse-padded": ("data.packing=false",), "simcse-packed": ("data.packing=true",)}
TRAINER_ROWS["simcse-balanced"] = (*TRAINER_ROWS["simcse-packed"], "data.balance_tokens=true")


def case_data(args, case: str) -> tuple[str, Path, int]:
    objective, data, seq = CASES[case]
    given = args.wiki if objective == "unsup" else args.nli
    return objective, Path(given) if given else data, seq


def trainer_overrides(args, case: str, work: Path, row: str) -> list[str]:
    objective, data, seq = case_data(args, case)
    return [
        f"model.name_or_path={args.simcse_name}",
        f"model.dropout={DROPOUT}",
        f"loss.temperature={TEMPERATURE}",
        "model.pooler=cls",
        f"train.objective={objective}",
        f"data.train_file={data}",
        f"data.max_seq_len={seq}",
        f"data.pack_row_tokens={args.pack_row_tokens or seq}",
        f"train.global_batch_size={args.batch}",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.output_dir={work / row}",
        "train.overwrite=true",
        "checkpoint.resume=false",
        "checkpoint.every_steps=0",
        "engine.zero_stage=0",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        f"data.cache_dir={work / 'token-cache'}",
        *TRAINER_ROWS[row],
    ]


class TrainerRow:
    def __init__(self, args, case: str, work: Path, row: str) -> None:
        from simcse_dist.config import load_config
        from simcse_dist.distributed import DistEnv
        from simcse_dist.train.preempt import StopRequest
        from simcse_dist.train.trainer import Trainer

        self.name = row
        cfg = load_config(None, trainer_overrides(args, case, work, row))
        cfg.validate(DistEnv.from_env().world_size)
        self.trainer = Trainer(cfg, DistEnv.from_env())
        self.trainer.setup()
        self.stop = StopRequest(check_file=False)
        self.micro = [m for _, m in self.trainer.data.sampler.iter_steps(0, args.warmup + args.steps)]
        self.computed = 0  # token positions the encoder ran, this rank

    def step(self, i: int) -> None:
        t = self.trainer
        batches = [t.data.prepare(mb) for mb in self.micro[i]]
        self.computed += sum(b.inputs["input_ids"].numel() for b in batches)
        t.train_step(batches, self.stop, i)


class PlainRow:
    """Padded, hand-written: every view in one forward, [CLS] + MLP, InfoNCE over the batch."""

    def __init__(self, args, texts: list[tuple[str, ...]], batches: list[list[int]], seq: int) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.name, self.texts, self.batches, self.seq = "plain", texts, batches, seq
        self.tok = AutoTokenizer.from_pretrained(args.model_dir, use_fast=True)
        config = AutoConfig.from_pretrained(
            args.model_dir, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT
        )
        torch.manual_seed(1)
        self.model = AutoModel.from_pretrained(args.model_dir, config=config, add_pooling_layer=False).train()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(config.hidden_size, config.hidden_size), torch.nn.Tanh())
        self.params = [*self.model.parameters(), *self.mlp.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=3e-5, weight_decay=0.0, fused=True)
        self.computed = 0

    def step(self, i: int) -> None:
        rows = [self.texts[j] for j in self.batches[i]]
        k = max(2, len(rows[0]))
        views = [r[0] for r in rows for _ in range(2)] if len(rows[0]) == 1 else [s for r in rows for s in r]
        enc = self.tok(views, padding=True, truncation=True, max_length=self.seq, return_tensors="pt")
        self.computed += enc["input_ids"].numel()
        z = self.mlp(self.model(**enc).last_hidden_state[:, 0]).view(len(rows), k, -1)
        z = F.normalize(z, dim=-1)
        candidates = z[:, 1:].transpose(0, 1).reshape(-1, z.shape[-1])  # positives, then hard negatives
        loss = F.cross_entropy(z[:, 0] @ candidates.T / TEMPERATURE, torch.arange(len(rows)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class STRow:
    def __init__(self, args, texts: list[tuple[str, ...]], batches: list[list[int]], seq: int) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        self.name, self.texts, self.batches = "st-mnrl", texts, batches
        torch.manual_seed(2)
        self.model = SentenceTransformer(
            args.model_dir,
            device="cpu",
            config_kwargs={"hidden_dropout_prob": DROPOUT, "attention_probs_dropout_prob": DROPOUT},
        )
        self.model.max_seq_length = seq
        self.model.train()
        self.loss = MultipleNegativesRankingLoss(self.model, scale=1.0 / TEMPERATURE)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=3e-5, weight_decay=0.0, fused=True)
        self.computed = 0

    def step(self, i: int) -> None:
        rows = [self.texts[j] for j in self.batches[i]]
        columns = [[r[0] for r in rows]] * 2 if len(rows[0]) == 1 else [list(c) for c in zip(*rows, strict=True)]
        features = [self.model.preprocess(c) for c in columns]
        self.computed += sum(f["input_ids"].numel() for f in features)
        loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def real_tokens(trainer_row: TrainerRow, steps: range) -> list[int]:
    """Non-padding tokens of each step's global batch (every view), from the prepared corpus."""
    from simcse_dist.data.packing import RowTokens

    data = trainer_row.trainer.data
    count = RowTokens(data.corpora, [s.objective for s in data.sources])
    return [int(count(*data.sampler.step_examples(s)).sum()) for s in steps]


def interleaved(rows: list, steps: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Warm every row up, then time its steps in `rounds` rounds in a rotated order."""
    for r in rows:
        for i in range(warmup):
            r.step(i)
    times = {r.name: [] for r in rows}
    per = max(1, -(-steps // rounds))
    for k in range(rounds):
        for r in rows[k % len(rows) :] + rows[: k % len(rows)]:
            for _ in range(min(per, steps - len(times[r.name]))):
                t0 = time.perf_counter()
                r.step(warmup + len(times[r.name]))
                times[r.name].append(time.perf_counter() - t0)
    return times


def summarize(name: str, ranks: int, times: list[float], views: int, args, tokens: list[int], computed: int) -> dict:
    med = statistics.median(times)
    real = statistics.mean(tokens) if tokens else float("nan")
    return {
        "impl": name,
        "ranks": ranks,
        "ms_per_step": 1000 * med,
        "examples_per_s": args.batch / med,
        "sentences_per_s": args.batch * views / med,
        "real_tokens_per_s": real / med,
        "computed_per_real": computed / (sum(tokens) or 1),
        "ms_all": [round(1000 * t, 2) for t in times],
    }


def run_case(args, case: str, work: Path, ranks: int) -> list[dict]:
    """collective at ranks > 1: every rank builds the trainer rows and steps them together."""
    objective, data, seq = case_data(args, case)
    trainers = [TrainerRow(args, case, work, row) for row in args.rows]
    views = trainers[0].trainer.data.views[0]
    if trainers[0].trainer.env.world_size == 1 and args.peers:
        from simcse_dist.data.readers import read_train_examples

        texts = [tuple(ex) for ex in read_train_examples(str(data))[0]]
        batches = [m[0].indices for m in trainers[0].micro]
        peers = [{"plain": PlainRow, "st-mnrl": STRow}[p](args, texts, batches, seq) for p in args.peers]
    else:
        peers = []
    rows = trainers + peers
    times = interleaved(rows, args.steps, args.warmup, args.rounds if ranks == 1 else 1)
    timed = range(args.warmup, args.warmup + args.steps)
    tokens = real_tokens(trainers[0], range(args.warmup + args.steps))
    out = []
    for r in rows:
        computed = r.computed * ranks  # every rank ran about the same (ranks > 1: rank 0's count)
        row = summarize(r.name, ranks, times[r.name], views, args, tokens, computed)
        row["real_tokens_per_s"] = statistics.mean(tokens[i] for i in timed) / (row["ms_per_step"] / 1000)
        row["case"] = case
        out.append(row)
    return out


def padding_share(args, case: str, steps: int = 50) -> list[dict]:
    """Token positions computed per real token, padded vs packed into rows of 1-4 x max_seq_len,
    over the first `steps` batches of the data order (no model: the count is deterministic)."""
    from transformers import AutoTokenizer

    from simcse_dist.data.collate import Collator
    from simcse_dist.data.packing import pack
    from simcse_dist.data.readers import read_train_examples
    from simcse_dist.data.sampler import BatchPlan, GlobalBatchSampler

    objective, data, seq = case_data(args, case)
    examples = read_train_examples(str(data))[0]
    collate = Collator(AutoTokenizer.from_pretrained(args.model_dir), seq, objective)
    sampler = GlobalBatchSampler(BatchPlan((len(examples),), args.batch, 1, 1), 0, 42)
    batches = [collate([examples[i] for i in sampler.step_examples(s)[1]]) for s in range(steps)]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    out = [{"case": case, "layout": "padded", "computed_per_real": sum(b["input_ids"].numel() for b in batches) / real}]
    for mult in (1, 2, 4):
        computed = sum(pack(b, mult * seq)["input_ids"].numel() for b in batches)
        out.append({"case": case, "layout": f"packed, rows of {mult * seq}", "computed_per_real": computed / real})
    return out


def table(rows: list[dict]) -> str:
    head = f"{'case':<14} {'ranks':>5} {'implementation':<16} {'sent/s':>8} {'tok/s':>9} {'ms/step':>9} {'comp/real':>9} {'vs plain':>9}"
    lines = [head, "-" * len(head)]
    plain = {r["case"]: r for r in rows if r["impl"] == "plain"}
    for r in rows:
        ref = plain.get(r["case"])
        ratio = f"{r['sentences_per_s'] / ref['sentences_per_s']:.2f}x" if ref else "-"
        lines.append(
            f"{r['case']:<14} {r['ranks']:>5} {r['impl']:<16} {r['sentences_per_s']:>8.1f} "
            f"{r['real_tokens_per_s']:>9.0f} {r['ms_per_step']:>9.1f} {r['computed_per_real']:>9.2f} {ratio:>9}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--ranks", default="1,2", help="1 in this process; N > 1 under torchrun (trainer rows)")
    p.add_argument("--model", default="minilm", help="minilm (the bundled all-MiniLM-L6-v2) | tiny | a model dir")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--wiki", default=None, help="the unsup cases' file (default: the shared wiki1m sample)")
    p.add_argument("--nli", default=None, help="the sup case's file (default: the shared NLI sample)")
    p.add_argument("--pack-row-tokens", type=int, default=None, help="tokens per packed row (default max_seq_len)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", default=",".join(TRAINER_ROWS))
    p.add_argument("--peers", default="plain,st-mnrl")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--padding-only", action="store_true", help="only count computed/real tokens (no model runs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a torchrun rank: its JSON goes here
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; from {', '.join(CASES)}")
    args.ranks = [int(x) for x in args.ranks.split(",")]
    args.rows = [r for r in args.rows.split(",") if r]
    args.peers = [r for r in args.peers.split(",") if r]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from simcse_dist.distributed import DistEnv, init_distributed, teardown

    env = DistEnv.from_env()
    init_distributed(env, 600)
    with tempfile.TemporaryDirectory(prefix="simcse-bench-packing-") as tmp:
        work = Path(args.worker).parent if args.worker else Path(tmp)  # the ranks share the parent's
        args.model_dir, args.simcse_name = materialize_model(args.model, work)
        if args.worker:  # a rank of an N-rank run: the trainer rows only
            args.peers = []
            ws = env.world_size
            rows = [r for case in args.cases for r in run_case(args, case, work / f"{case}-{ws}", ws)]
            if env.is_main:
                Path(args.worker).write_text(json.dumps(rows))
            teardown(together=True)
            return 0
        result, rows = start_result(args), []
        if args.padding_only:
            rows = [r for case in args.cases for r in padding_share(args, case)]
            for r in rows:
                print(f"{r['case']:<14} {r['layout']:<20} computed/real {r['computed_per_real']:.3f}")
            result["padding"] = rows
            write_result(result, args.output)
            return 0
        for ranks in args.ranks:
            for case in args.cases:
                print(f"{case}, {ranks} rank(s) ...", flush=True)
                if ranks == 1:
                    rows += run_case(args, case, Path(tmp) / case, 1)
                else:
                    rows += spawn(argv if argv is not None else sys.argv[1:], case, ranks, Path(tmp))
        print("\n" + table(rows))
        result["results"] = rows
        write_result(result, args.output)
    return 0


def spawn(argv: list[str], case: str, ranks: int, tmp: Path) -> list[dict]:
    """The trainer rows of `case` at `ranks` ranks under torchrun (gloo, one thread per rank)."""
    out = tmp / f"{case}-{ranks}.json"
    drop = {"--cases", "--ranks", "--output", "--threads"}
    rest = [a for i, a in enumerate(argv) if a.split("=")[0] not in drop and (i == 0 or argv[i - 1] not in drop)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd += ["-m", "bench.packing", *rest, "--cases", case, "--worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return json.loads(out.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
