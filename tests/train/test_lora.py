"""LoRA (peft) on a tiny random Qwen2 decoder with last-token pooling, through the real trainer
path: N gloo ranks at ZeRO 0 and 3, with and without gradient caching, give the gradients (hence
the update and the grad norm) and the loss of an independent reference: a plain single-process
peft model on AutoModel, last-token pooling written out, EOS appended by hand, and the written-out
SimCSE loss over the global batch (tests/reference.py). Only the adapters train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, GRAD_WORKER, grad_worker_args, make_tiny_decoder, randomize_lora_b, run_gloo
from reference import global_batch_indices, reference_simcse_loss

from simcse_dist.data.readers import read_train_examples

SEED, TAU, HNW, MAX_LEN, BATCH = 7, 0.05, 0.3, 32, 8
R, ALPHA, TARGETS = 4, 8.0, ["q_proj", "v_proj"]
DATA = {"unsup": DEMO_DATA / "wiki-demo.txt", "sup": DEMO_DATA / "nli-demo.tsv"}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


def lora_overrides(model: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "model.pooler=last_token",
        "model.dropout=0",
        f"model.lora.r={R}",
        f"model.lora.alpha={ALPHA}",
        "model.lora.dropout=0",
        f"model.lora.target_modules=[{','.join(TARGETS)}]",
        f"data.max_seq_len={MAX_LEN}",
        f"loss.temperature={TAU}",
        f"train.global_batch_size={BATCH}",
        f"train.seed={SEED}",
        "train.max_steps=1",
        "engine.gradient_clipping=0",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
    ]


def reference(model: Path, objective: str) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of the adapters and the loss over the whole global batch, on one process."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(SEED)  # the trainer seeds before it builds the model (the adapters' A init)
    base = AutoModel.from_pretrained(model)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    net = randomize_lora_b(get_peft_model(base, lora)).train()
    tok = AutoTokenizer.from_pretrained(model)
    examples, _ = read_train_examples(str(DATA[objective]))
    rows = [examples[i] for i in global_batch_indices(len(examples), BATCH, SEED)]
    views = [(r[0], r[0]) if objective == "unsup" else tuple(r) for r in rows]
    texts = [t for v in views for t in v]
    ids = [tok(t, truncation=True, max_length=MAX_LEN - 1)["input_ids"] + [tok.eos_token_id] for t in texts]
    length = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (length - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])
    hidden = net(input_ids=input_ids, attention_mask=mask).last_hidden_state
    z = hidden[torch.arange(len(ids)), mask.sum(1) - 1].view(len(views), len(views[0]), -1)
    loss = reference_simcse_loss(z, TAU, HNW if objective == "sup" else 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    return grads, float(loss.detach())


def run_worker(tmp_path: Path, world: int, model: Path, accums: str, *extra: str) -> None:
    args = grad_worker_args(tmp_path, DATA, HNW, stages="0,3", accums=accums)
    run_gloo(GRAD_WORKER, world, ["--random-lora-b", *args, *lora_overrides(model), *extra], timeout=900)


def norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("grad_cache", [False, True])
def test_lora_n_ranks_match_plain_peft(tiny_qwen2, tmp_path, world, grad_cache):
    accums = "1,2" if grad_cache else "1"
    run_worker(tmp_path, world, tiny_qwen2, accums, *(["train.grad_cache=true"] if grad_cache else []))
    for objective in ("unsup", "sup"):
        ref, ref_loss = reference(tiny_qwen2, objective)
        assert ref and all(g.abs().max() > 0 for g in ref.values()), "an adapter without gradient proves nothing"
        for stage in (0, 3):
            for accum in map(int, accums.split(",")):
                saved = torch.load(tmp_path / f"grads-{objective}-z{stage}-a{accum}.pt")
                got = {k.removeprefix("backbone."): v for k, v in saved["grads"].items()}
                label = f"{objective} world {world} ZeRO-{stage} A={accum} grad_cache={grad_cache}"
                assert got.keys() == ref.keys(), f"{label}: trainable parameters differ from the adapters"
                for name, r in ref.items():
                    rel = (got[name] - r).abs().max().item() / r.abs().max().item()
                    assert rel <= 1e-5, f"{label}: {name} max rel diff {rel:.2e}"
                assert abs(saved["loss"] - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), label
                assert abs(norm(got) - norm(ref)) <= 1e-5 * norm(ref), label
