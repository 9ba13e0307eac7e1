"""N gloo ranks through the real trainer path (DeepSpeed ZeRO 0-3, autograd gather, loss) must
produce the gradients of one process on the concatenated global batch (docs/design.md, the gradient
convention). Gradients are compared, not Adam updates, because Adam hides a uniform scale.

Covered: plain steps (N = 2, 3), gradient accumulation (negatives per micro-step), gradient
caching (N in 1-3, A in 1, 2, 4: negatives over the whole global batch), a short last batch
split 7/6 over 2 ranks, the duplicate mask on repeated premises, packing with and without token
balancing, and activation checkpointing with dropout. The cases of one world size run in one
launch (`launched`); each test reads its case's gradients and log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, GRAD_WORKER, grad_worker_args, make_tiny_decoder, randomize_lora_b, run_gloo
from reference import global_batch_indices, reference_simcse_loss
from transformers import AutoTokenizer

from simcse_dist.config import load_config
from simcse_dist.data.readers import read_train_examples
from simcse_dist.model.encoder import Encoder
from simcse_dist.model.tokenizer import load_tokenizer

SEED, TAU, HNW = 7, 0.05, 0.3
DATA = {"unsup": DEMO_DATA / "wiki-demo.txt", "sup": DEMO_DATA / "nli-demo.tsv"}


def overrides(model: Path, global_batch: int, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "model.dropout=0",
        f"loss.temperature={TAU}",
        f"train.global_batch_size={global_batch}",
        f"train.seed={SEED}",
        "train.max_steps=1",
        "engine.gradient_clipping=0",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        *extra,
    ]


def case_args(
    out: Path,
    model: Path,
    global_batch: int,
    *,
    data: dict | None = None,
    extra: tuple = (),
    **worker: str | int,
) -> list[str]:
    """grad_worker's arguments for one case: its gradients go to `out`; `worker`: stages,
    accums, objectives, step (helpers.grad_worker_args)."""
    return [*grad_worker_args(out, data or DATA, HNW, **worker), *overrides(model, global_batch, *extra)]


def launch(tmp: Path, world: int, by_name: dict[str, list[str]]) -> dict[str, str]:
    """Every case in one torchrun launch of `world` ranks (its start-up is most of a case's
    cost); returns each case's part of the log, by name."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / f"cases-{world}.json"
    spec.write_text(json.dumps(list(by_name.values())))
    log = run_gloo(GRAD_WORKER, world, ["--cases", str(spec)], timeout=1200)
    outs = {args[args.index("--out") + 1]: name for name, args in by_name.items()}
    parts = re.split(r"^case (\S+)$", log, flags=re.M)
    return {outs[out]: text for out, text in zip(parts[1::2], parts[2::2], strict=True)}


def reference_grads(
    model: Path, objective: str, data: Path, chunks: list[list[int]], mask_duplicates: bool = False
) -> dict[str, torch.Tensor]:
    """One process, plain autograd: the loss of each chunk (a micro-step's global examples),
    averaged over chunks; gradient caching and uneven batches use a single chunk."""
    cfg = load_config(None, overrides(model, 8))
    torch.manual_seed(SEED)  # the trainer builds the model (MLP head init) right after this seed
    enc = Encoder.from_config(cfg.model).train()
    tok = AutoTokenizer.from_pretrained(model)
    examples, _ = read_train_examples(str(data))
    w = HNW if objective == "sup" else 0.0
    for chunk in chunks:
        views = [(examples[i][0], examples[i][0]) if objective == "unsup" else examples[i] for i in chunk]
        k = len(views[0])
        enc_in = tok([s for v in views for s in v], padding=True, truncation=True, max_length=32, return_tensors="pt")
        z = enc(**enc_in).view(len(views), k, -1)
        loss = reference_simcse_loss(z, TAU, w, texts=views if mask_duplicates else None)
        (loss / len(chunks)).backward()
    return {n: p.grad.detach().clone() for n, p in enc.named_parameters()}


def max_rel_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Max over tensors of max|got - ref| / max|ref|. The attention key bias has an analytically
    zero gradient (softmax ignores a per-query constant), so its reference is rounding noise and
    it is measured against the largest gradient in the model instead."""
    assert got.keys() == ref.keys()
    global_scale = max(r.abs().max().item() for r in ref.values())
    assert global_scale > 0, "reference gradients are zero: the test would prove nothing"
    worst, where = 0.0, ""
    for name, r in ref.items():
        scale = global_scale if name.endswith("attention.self.key.bias") else r.abs().max().item()
        rel = (got[name] - r).abs().max().item() / scale
        if rel > worst:
            worst, where = rel, name
    return worst, where


def check(tmp_path: Path, objective: str, stages: str, accum: int, ref: dict, label: str) -> None:
    for stage in map(int, stages.split(",")):
        got = torch.load(tmp_path / f"grads-{objective}-z{stage}-a{accum}.pt")["grads"]
        rel, where = max_rel_diff(got, ref)
        assert rel <= 1e-5, f"{label} {objective} ZeRO-{stage} A={accum}: max rel diff {rel:.2e} at {where}"


def n_examples(path: Path) -> int:
    return len(read_train_examples(str(path))[0])


DROPOUT_PADDED = ("model.dropout=0.1", "data.packing=false")
GRAD_CACHE = "train.grad_cache=true"


def packed(balance: bool) -> tuple[str, ...]:
    return ("data.packing=true", f"data.balance_tokens={str(balance).lower()}")


def subset(root: Path, n: int) -> dict[str, Path]:
    """The first n examples of each demo file (written to `root`)."""
    out = {}
    for objective, path in DATA.items():
        lines = path.read_text().splitlines()
        header = lines[:1] if objective == "sup" else []
        out[objective] = root / f"{objective}-{n}{path.suffix}"
        out[objective].write_text("\n".join(header + lines[len(header) : len(header) + n]) + "\n")
    return out


def repeated_premises(root: Path) -> dict[str, Path]:
    """24 NLI rows where every third row repeats the previous row's premise (written to `root`)."""
    rows = DATA["sup"].read_text().splitlines()
    header, body = rows[0], rows[1:25]
    fields = [r.split("\t") for r in body]
    for i in range(1, 24, 3):
        fields[i][0] = fields[i - 1][0]
    sup = root / "dup.tsv"
    sup.write_text("\n".join([header, *("\t".join(f) for f in fields)]) + "\n")
    return {"unsup": DATA["unsup"], "sup": sup}


def cases(root: Path, model: Path, world: int) -> dict[str, list[str]]:
    """Every case of this file that runs at `world` ranks, by name; case X writes to root / X.
    The tests below say what each one checks."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"grad-cache": case_args(root / "grad-cache", model, 24, accums="1,2,4", extra=(GRAD_CACHE,))}
    if world > 1:
        out["n-12-1"] = case_args(root / "n-12-1", model, 12)
    if world == 2:
        out["n-16-2"] = case_args(root / "n-16-2", model, 16, accums="2", stages="0,2")
        out["grad-cache-dropout"] = case_args(
            root / "grad-cache-dropout", model, 24, accums="2", stages="0,3", extra=(GRAD_CACHE, *DROPOUT_PADDED)
        )
        for grad_cache in (False, True):
            out[f"uneven-{grad_cache}"] = case_args(
                root / f"uneven-{grad_cache}",
                model,
                16,
                accums="2" if grad_cache else "1",
                data=subset(root, 29),
                step=1,
                extra=("data.drop_last=false", f"train.grad_cache={str(grad_cache).lower()}"),
            )
        out["duplicates"] = case_args(
            root / "duplicates", model, 24, data=repeated_premises(root), stages="0,3", objectives="sup"
        )
        out["checkpointing-bert"] = case_args(
            root / "checkpointing-bert",
            model,
            24,
            accums="2",
            stages="0,3",
            extra=(GRAD_CACHE, *DROPOUT_PADDED, "engine.activation_checkpointing=true"),
        )
    for balance in {1: (True,), 2: (False, True)}.get(world, ()):
        out[f"packed-{balance}"] = case_args(
            root / f"packed-{balance}", model, 12, stages="0,3" if world == 2 else "0", extra=packed(balance)
        )
        out[f"packed-grad-cache-{balance}"] = case_args(
            root / f"packed-grad-cache-{balance}",
            model,
            24,
            accums="2",
            stages="0",
            extra=(*packed(balance), GRAD_CACHE, "data.pack_row_tokens=64"),
        )
    return out


@pytest.fixture(scope="module")
def launched(tiny_bert, tmp_path_factory):
    """world -> (the directory of its cases, each case's log): all cases of one world size run
    in one launch, the first time a test asks for that world size."""
    root, done = tmp_path_factory.mktemp("grad-cases"), {}

    def get(world: int) -> tuple[Path, dict[str, str]]:
        if world not in done:
            done[world] = launch(root / f"w{world}", world, cases(root / f"w{world}", tiny_bert, world))
        return root / f"w{world}", done[world]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("world,global_batch,grad_accum", [(2, 12, 1), (3, 12, 1), (2, 16, 2)])
def test_n_ranks_match_one_process(tiny_bert, launched, world, global_batch, grad_accum):
    out = launched(world)[0] / f"n-{global_batch}-{grad_accum}"
    stages = "0,1,2,3" if grad_accum == 1 else "0,2"
    for objective in ("unsup", "sup"):
        idx = global_batch_indices(n_examples(DATA[objective]), global_batch, SEED)
        per_micro = global_batch // grad_accum  # plain accumulation: negatives per micro-step
        chunks = [idx[a * per_micro : (a + 1) * per_micro] for a in range(grad_accum)]
        check(
            out,
            objective,
            stages,
            grad_accum,
            reference_grads(tiny_bert, objective, DATA[objective], chunks),
            f"world {world}",
        )


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_grad_cache_equals_whole_global_batch(tiny_bert, launched, world):
    """A chunks per rank, N ranks, every ZeRO stage: the gradient of the loss over all 24."""
    out = launched(world)[0] / "grad-cache"
    for objective in ("unsup", "sup"):
        ref = reference_grads(
            tiny_bert, objective, DATA[objective], [global_batch_indices(n_examples(DATA[objective]), 24, SEED)]
        )
        for accum in (1, 2, 4):
            check(out, objective, "0,1,2,3", accum, ref, f"grad_cache world {world}")


def reference_grads_dropout(
    model: Path, objective: str, data: Path, idx: list[int], world: int, accum: int, extra: tuple = ()
) -> dict[str, torch.Tensor]:
    """Dropout on: the written-out loss over the whole global batch, each rank's rows encoded
    chunk by chunk from that rank's seed (train.seed + rank) in the trainer's order, so the
    dropout masks are the ones the ranks draw. Masks are drawn over the padded [rows, length]
    layout, so the runs compared with it train padded (DROPOUT_PADDED). No activation
    checkpointing here. `extra`: model overrides (LoRA: its B factors drawn as the worker's
    --random-lora-b does)."""
    cfg = load_config(None, overrides(model, 8, "model.dropout=0.1", *extra))
    torch.manual_seed(SEED)
    enc = Encoder.from_config(cfg.model).train()
    if cfg.model.lora.enabled:
        randomize_lora_b(enc)
    tok = load_tokenizer(str(model), cfg.model.pooler)
    examples, _ = read_train_examples(str(data))
    per_chunk = len(idx) // accum
    per_rank = per_chunk // world
    zs = []
    for r in range(world):
        torch.manual_seed(SEED + r)
        for a in range(accum):
            rows = idx[a * per_chunk + r * per_rank : a * per_chunk + (r + 1) * per_rank]
            views = [(examples[i][0], examples[i][0]) if objective == "unsup" else examples[i] for i in rows]
            enc_in = tok(
                [s for v in views for s in v], padding=True, truncation=True, max_length=32, return_tensors="pt"
            )
            zs.append(enc(**enc_in).view(len(views), len(views[0]), -1))
    reference_simcse_loss(torch.cat(zs), TAU, HNW if objective == "sup" else 0.0).backward()
    return {n: p.grad.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_grad_cache_with_dropout_equals_whole_global_batch(tiny_bert, launched):
    """Dropout on (the augmentation): 2 ranks x 2 chunks re-encode with each chunk's own masks."""
    out = launched(2)[0] / "grad-cache-dropout"
    for objective in ("unsup", "sup"):
        idx = global_batch_indices(n_examples(DATA[objective]), 24, SEED)
        ref = reference_grads_dropout(tiny_bert, objective, DATA[objective], idx, 2, 2)
        check(out, objective, "0,3", 2, ref, "grad_cache dropout")


@pytest.mark.slow
@pytest.mark.parametrize("grad_cache", [False, True])
def test_uneven_last_batch_seven_and_six(tiny_bert, launched, grad_cache):
    """29 examples, global batch 16, drop_last=false: step 1 holds 13, split 7/6 over 2 ranks
    (with grad_cache and A=2: chunks of 7 and 6, each split again); padding is masked out."""
    root = launched(2)[0]
    data = subset(root, 29)
    for objective in ("unsup", "sup"):
        last = global_batch_indices(29, 29, SEED)[16:]
        assert len(last) == 13
        check(
            root / f"uneven-{grad_cache}",
            objective,
            "0,1,2,3",
            2 if grad_cache else 1,
            reference_grads(tiny_bert, objective, data[objective], [last]),
            "uneven",
        )


@pytest.mark.slow
def test_duplicate_premises_are_not_negatives(tiny_bert, launched):
    """NLI-style batch where premises repeat: the distributed masked loss equals the written-out
    masked formula (loss.mask_duplicates, on by default for sup)."""
    root = launched(2)[0]
    sup = repeated_premises(root)["sup"]
    ref = reference_grads(tiny_bert, "sup", sup, [global_batch_indices(24, 24, SEED)], mask_duplicates=True)
    unmasked = reference_grads(tiny_bert, "sup", sup, [global_batch_indices(24, 24, SEED)])
    assert max_rel_diff(unmasked, ref)[0] > 1e-3  # the mask changes the gradient
    check(root / "duplicates", "sup", "0,3", 1, ref, "duplicates")


@pytest.mark.slow
def test_reference_detects_dropped_cross_rank_terms(tiny_bert, tmp_path):
    """Sanity of the comparison itself: 2 ranks with the official code's no-grad gather (each
    rank's gradient reaches only its own rows) fail it by far."""
    run_gloo(GRAD_WORKER, 2, ["--no-grad-gather", *case_args(tmp_path, tiny_bert, 12, stages="0", objectives="sup")])
    ref = reference_grads(tiny_bert, "sup", DATA["sup"], [global_batch_indices(n_examples(DATA["sup"]), 12, SEED)])
    got = torch.load(tmp_path / "grads-sup-z0-a1.pt")["grads"]
    rel, _ = max_rel_diff(got, ref)
    assert rel > 0.1, rel


@pytest.mark.slow
@pytest.mark.parametrize("world,balance", [(1, True), (2, False), (2, True)])
def test_packed_and_balanced_match_one_process(tiny_bert, launched, world, balance):
    """data.packing (rows of 32 and 64 tokens), with and without data.balance_tokens: N ranks
    make the written-out padded single-process gradient, plain (A = 1) and with gradient caching
    (A = 2, rows balanced across micro-steps too), so the balanced update is the unbalanced one."""
    root, logs = launched(world)
    for name in (f"packed-{balance}", f"packed-grad-cache-{balance}"):
        assert "data: packed into rows of" in logs[name]  # packing was on, not the padded fallback
        assert ("balanced by tokens" in logs[name]) == balance
    for objective in ("unsup", "sup"):
        n = n_examples(DATA[objective])
        ref12 = reference_grads(tiny_bert, objective, DATA[objective], [global_batch_indices(n, 12, SEED)])
        stages = "0,3" if world == 2 else "0"
        check(root / f"packed-{balance}", objective, stages, 1, ref12, f"packed world {world}")
        ref24 = reference_grads(tiny_bert, objective, DATA[objective], [global_batch_indices(n, 24, SEED)])
        check(root / f"packed-grad-cache-{balance}", objective, "0", 2, ref24, f"packed grad_cache world {world}")


LORA_DROPOUT = (
    "model.pooler=last_token",
    "model.lora.r=4",
    "model.lora.target_modules=[q_proj,v_proj]",
    "model.lora.dropout=0.1",
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "qwen2-lora"])
def test_grad_cache_with_activation_checkpointing_and_dropout(tiny_bert, launched, tmp_path_factory, tmp_path, kind):
    """engine.activation_checkpointing recomputes every layer in the backward of the re-encode:
    the recompute must draw the masks of the forward, which drew those of the cached pass
    (the GritLM #28 trap). 2 ranks x 2 chunks, dropout 0.1 (and LoRA dropout 0.1), ZeRO 0 and 3."""
    if kind == "bert":
        model, extra, out = tiny_bert, (), launched(2)[0] / "checkpointing-bert"
    else:
        model, extra, out = (
            make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2"),
            LORA_DROPOUT,
            tmp_path,
        )
        settings = (GRAD_CACHE, *DROPOUT_PADDED, "engine.activation_checkpointing=true", *extra)
        args = case_args(out, model, 24, accums="2", stages="0,3", extra=settings)
        run_gloo(GRAD_WORKER, 2, ["--random-lora-b", *args], timeout=900)
    for objective in ("unsup", "sup"):
        idx = global_batch_indices(n_examples(DATA[objective]), 24, SEED)
        ref = reference_grads_dropout(model, objective, DATA[objective], idx, 2, 2, extra)
        check(out, objective, "0,3", 2, ref, f"grad_cache + activation checkpointing, dropout, {kind}")
