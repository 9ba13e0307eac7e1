"""The step layer (simcse_dist/train/step.py) in-process, on one rank, with a toy torch encoder: no
Trainer, no files, no DeepSpeed, no process group. References are written out independently
(tests/reference.py: the paper's loss one anchor at a time)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from reference import reference_simcse_loss
from torch import nn

from simcse_dist.data.batch import Batch
from simcse_dist.train.objective import Objective, ObjectiveSpec
from simcse_dist.train.step import accumulate, grad_cache

TAU, HNW = 0.05, 0.3


class Toy(nn.Module):
    """Bag of embeddings -> dropout -> linear: [b, k, L] token ids -> [b, k, d]."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.drop, self.out = nn.Embedding(40, 16), nn.Dropout(dropout), nn.Linear(16, 8)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return self.out(self.drop((self.emb(inputs["input_ids"]) * mask).sum(-2) / mask.sum(-2)))


def make_rows(n: int, k: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, k, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:, :, 4:] = torch.randint(0, 2, (n, k, 2), generator=g)
    return {"input_ids": ids, "attention_mask": mask}


def chunks(rows: dict[str, torch.Tensor], sizes: list[int], ids: torch.Tensor | None = None) -> list[Batch]:
    out, start = [], 0
    for s in sizes:
        part = {key: v[start : start + s] for key, v in rows.items()}
        out.append(Batch(part, None, None if ids is None else ids[start : start + s], 0))
        start += s
    return out


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return g


def backward(loss: torch.Tensor, last: bool) -> None:
    loss.backward()


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    scale = max(r.abs().max().item() for r in ref.values())
    assert scale > 0
    for name, r in ref.items():
        assert (got[name] - r).abs().max().item() <= rtol * scale, name


@pytest.mark.parametrize("k,dropout", [(2, 0.0), (3, 0.0), (2, 0.2), (3, 0.2)])
def test_grad_cache_equals_one_batch_on_one_rank(k, dropout):
    """Four chunks through gradient caching = the written-out loss over all 16 rows at once. With
    dropout on, the reference encodes the chunks in the same RNG order (what pass (a) draws), so
    equality also checks that pass (c) replays each chunk's masks."""
    model, rows = Toy(dropout), make_rows(16, k)
    w = HNW if k == 3 else 0.0
    torch.manual_seed(5)
    z = torch.cat([model(b.inputs) for b in chunks(rows, [4, 4, 4, 4])])
    reference_simcse_loss(z, TAU, w).backward()
    ref = grads(model)
    torch.manual_seed(5)
    result = grad_cache(chunks(rows, [4, 4, 4, 4]), model, backward, Objective(ObjectiveSpec(TAU, w)))
    assert_close(grads(model), ref)
    assert result.loss.item() == pytest.approx(reference_simcse_loss(z, TAU, w).item(), rel=1e-6)


def test_plain_accumulation_takes_negatives_per_micro_step():
    """grad_accum = 2 without caching: mean of the two micro-steps' losses, each over its own rows."""
    model, rows = Toy(0.0), make_rows(12, 3)
    parts = chunks(rows, [6, 6])
    sum(reference_simcse_loss(model(b.inputs), TAU, HNW) for b in parts).div(2).backward()
    ref = grads(model)
    calls = []
    result = accumulate(
        parts, model, lambda loss, last: (calls.append(last), loss.backward()), Objective(ObjectiveSpec(TAU, HNW))
    )
    assert calls == [False, True]
    assert_close(grads(model), ref)
    whole = grad_cache(parts, model, backward, Objective(ObjectiveSpec(TAU, HNW)))  # negatives over all 12
    assert whole.loss.item() != pytest.approx(result.loss.item(), rel=1e-3)


def test_masked_loss_equals_the_written_out_formula():
    """Repeated premises and a hard negative equal to another row's positive: Objective
    with text ids = the reference that skips those candidates text by text; the count of masked
    pairs is the written-out count."""
    texts = [(f"p{i // 2}", f"e{i}", f"c{i}") for i in range(8)]  # rows 2j, 2j+1 share a premise
    texts[5] = (texts[5][0], texts[5][1], "e2")  # row 5's hard negative is row 2's positive
    # what a prepared corpus stores: the 63-bit blake2b of each text
    ids = torch.tensor(
        [
            [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1 for t in row]
            for row in texts
        ]
    )
    z = torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, masked = Objective(ObjectiveSpec(TAU, HNW, mask_duplicates=True))(z, None, ids)
    ref = reference_simcse_loss(z, TAU, HNW, texts=texts)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    expected = sum(
        1 for i in range(8) for j in range(8) if j != i and (texts[j][1] == texts[i][1] or texts[j][0] == texts[i][0])
    )
    expected += sum(1 for i in range(8) for j in range(8) if texts[j][2] == texts[i][1])
    assert int(masked) == expected == 9
    unmasked, _ = Objective(ObjectiveSpec(TAU, HNW))(z)
    assert abs(unmasked.item() - ref.item()) > 1e-3  # the masks matter here


def test_padding_rows_are_left_out_of_loss_and_candidates():
    """A short last batch: 5 real rows + 3 padding copies = the written-out loss over the 5."""
    z = torch.randn(8, 2, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z[5:] = z[0]  # padding rows are copies of a real example
    valid = torch.arange(8) < 5
    loss, _ = Objective(ObjectiveSpec(TAU))(z, valid, None)
    assert loss.item() == pytest.approx(reference_simcse_loss(z[:5], TAU).item(), rel=1e-9)
