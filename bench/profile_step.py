"""Where the time of one training step goes: simcse-dist's trainer step vs the plain loop.
Run from the repository root:

    python -m bench.profile_step                          # CPU, bundled MiniLM, batch 64
    python -m bench.profile_step --impls simcse-z0,plain --steps 6 --output bench/profile.json

Two views, both from the implementations of bench/throughput.py (same model, batch, data):
1. Phases, by wrapping the seams one step calls (instrumentation only, no code changed):
   trainer: collate (`trainer.data.prepare`: token-cache slice or tokenizer, + the copy to the
   device), forward (the DeepSpeed engine's forward), loss (`trainer.loss_fn`: gather +
   InfoNCE), backward (`Engine.backward`: autograd, DeepSpeed's epilogue and, at ZeRO-0 fp32,
   the one gradient clip), step (`Engine.step`: AdamW, schedule; DeepSpeed's clipping at
   ZeRO-1-3), rest (flags all-reduce, bookkeeping). Plain loop: the same phases from its own
   code (`plain`: fused AdamW, as in bench/throughput.py; `plain-unfused`: the per-tensor loop).
2. torch.profiler over --profile-steps steps: the top operators by self CPU time, printed and saved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import (
    DEFAULT_DATA,
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
    set_thread_env(argv_value(sys.argv, "--threads") or os.environ.get("OMP_NUM_THREADS"))  # before torch

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.throughput import PlainImpl, Setup, SimcseImpl, build  # noqa: E402


class Phases:
    """Accumulates wall time per named phase of the current step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - t0

        return timed

    def end_step(self, total: float) -> None:
        row = dict(self.current)
        row["rest"] = total - sum(row.values())
        row["total"] = total
        self.steps.append(row)
        self.current = defaultdict(float)

    def medians(self) -> dict[str, float]:
        keys = self.steps[0].keys()
        return {k: 1000 * statistics.median(s.get(k, 0.0) for s in self.steps) for k in keys}


def instrument_trainer(impl: SimcseImpl, ph: Phases) -> None:
    """Wrap the trainer's seams; each is looked up at call time, so an instance attribute wins.
    SimcseImpl.step calls `t.data.prepare(mb).to(device)`: the collate phase times prepare;
    the copy (a no-op on CPU) falls into rest."""
    t = impl.trainer
    t.data.prepare = ph.wrap("collate", t.data.prepare)
    t.loss_fn = ph.wrap("loss", t.loss_fn)  # a frozen dataclass: replace it, do not patch it
    ds = t.engine.engine
    ds.forward = ph.wrap("forward", ds.forward)  # nn.Module.__call__ calls self.forward
    t.engine.backward = ph.wrap("backward", t.engine.backward)
    t.engine.step = ph.wrap("step", t.engine.step)


class PlainPhases(PlainImpl):
    """The plain loop with the same phase names (its step, split at the same boundaries)."""

    def __init__(self, s: Setup, ph: Phases, fused: bool = True) -> None:
        super().__init__(s, fused=fused)
        self.ph = ph

    def step(self, i: int) -> None:
        s, ph = self.s, self.ph
        t0 = time.perf_counter()
        batch = {k: v.to(s.device) for k, v in self._tokenize(s.batches[i]).items()}
        t1 = time.perf_counter()
        with s.autocast:
            z = self.mlp(self.model(**batch).last_hidden_state[:, 0]).float()
        t2 = time.perf_counter()
        b = s.batch_size
        loss = F.cross_entropy(F.normalize(z[:b], dim=-1) @ F.normalize(z[b:], dim=-1).T / TEMPERATURE, self.labels)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        for name, dt in zip(
            ("collate", "forward", "loss", "backward", "step"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
            strict=True,
        ):
            ph.current[name] += dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="simcse-z0,simcse-z2,plain")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="phase-timed steps per implementation (interleaved)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=None, help="OMP/intra-op threads (default: all cores)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    from simcse_dist.distributed import DistEnv, init_distributed

    init_distributed(DistEnv.from_env(), 600)
    device = torch.device("cpu")
    names = args.impls.split(",")
    total = args.warmup + args.steps + args.profile_steps
    result = start_result(args)
    result["impls"] = {}
    with tempfile.TemporaryDirectory(prefix="simcse-prof-") as tmp:
        model_dir, simcse_name = materialize_model(args.model, Path(tmp))
        s = Setup(
            model_dir=model_dir,
            simcse_name=simcse_name,
            data=args.data,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            precision="fp32",
            device=device,
            total_steps=total,
            work_dir=Path(tmp),
        )
        impls, phases = {}, {}
        for name in sorted(names, key=lambda n: not n.startswith("simcse")):
            ph = Phases()
            if name in ("plain", "plain-unfused"):
                impl = PlainPhases(s, ph, fused=name == "plain")
            else:
                impl = build(name, s)
            if isinstance(impl, SimcseImpl):
                instrument_trainer(impl, ph)
            impls[name], phases[name] = impl, ph
        cursor = dict.fromkeys(names, 0)

        def one(name: str, record: bool) -> None:
            ph = phases[name]
            sync(device)
            t0 = time.perf_counter()
            impls[name].step(cursor[name])
            sync(device)
            if record:
                ph.end_step(time.perf_counter() - t0)
            else:
                ph.current.clear()
            cursor[name] += 1

        for name in names:
            for _ in range(args.warmup):
                one(name, record=False)
        for _ in range(args.steps):  # interleaved, one step each
            for name in names:
                one(name, record=True)
        print(f"\nphase medians over {args.steps} steps (ms); load {os.getloadavg()[0]:.2f}")
        cols = ["collate", "forward", "loss", "backward", "step", "rest", "total"]
        print(f"{'impl':<18}" + "".join(f"{c:>10}" for c in cols))
        for name in names:
            med = phases[name].medians()
            result["impls"][name] = {"phases_ms": med}
            print(f"{name:<18}" + "".join(f"{med.get(c, 0.0):>10.1f}" for c in cols))

        from torch.profiler import ProfilerActivity, profile

        for name in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    one(name, record=False)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(f"\n== torch.profiler, {name}, {args.profile_steps} steps, top self CPU time ==\n{table}")
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:40]
            result["impls"][name]["top_ops"] = [
                {
                    "op": e.key,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / args.profile_steps,
                    "calls_per_step": e.count / args.profile_steps,
                }
                for e in events
            ]
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
