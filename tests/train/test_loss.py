"""The SimCSE objective against the paper's formula written out and against the official code's
layout. Ranks are simulated in one process: `objective.Objective` runs as rank r of N with its two
gathers standing in for the collectives (they return every simulated rank's rows, rank-major, as
the real ones do), so the rank offsets, masks and normalisers are the production code's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import reference_simcse_loss

from simcse_dist.eval.metrics import alignment, uniformity
from simcse_dist.train import objective as objective_module
from simcse_dist.train.loss import duplicate_mask
from simcse_dist.train.objective import Objective, ObjectiveSpec


def official_layout(z1, z2, z3=None, temp=0.05, hard_negative_weight=0.0):
    """princeton-nlp/SimCSE cl_forward, single process: full (B x B[+B]) matrix, weights row-wise."""
    cos = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / temp
    if z3 is not None:
        z1_z3 = F.cosine_similarity(z1.unsqueeze(1), z3.unsqueeze(0), dim=-1) / temp
        cos = torch.cat([cos, z1_z3], 1)
        n = z1_z3.size(-1)
        weights = torch.tensor(
            [[0.0] * (cos.size(-1) - n) + [0.0] * i + [hard_negative_weight] + [0.0] * (n - i - 1) for i in range(n)]
        )
        cos = cos + weights
    return F.cross_entropy(cos, torch.arange(cos.size(0)))


def simulate_ranks(
    z: torch.Tensor,
    world: int,
    temp: float,
    w: float,
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    monkeypatch=None,
) -> torch.Tensor:
    """Mean over simulated ranks of each rank's Objective loss (the engine's gradient average)."""
    big_b, k, _ = z.shape
    b = big_b // world
    meta = None if ids is None else torch.cat([valid.long().unsqueeze(1), ids], dim=1)
    # the stand-ins: an embedding gather returns every rank's candidate views, a metadata gather
    # every rank's (valid, ids) rows
    patch = pytest.MonkeyPatch() if monkeypatch is None else monkeypatch
    patch.setattr(objective_module, "gather_with_grad", lambda x: z[:, 1:])
    patch.setattr(objective_module, "gather_no_grad", lambda x: meta)
    spec = ObjectiveSpec(temp, w, mask_duplicates=ids is not None)
    losses = []
    try:
        for r in range(world):
            rows = slice(r * b, (r + 1) * b)
            local_ids = None if ids is None else ids[rows]
            local_valid = None if valid is None else valid[rows]
            losses.append(Objective(spec, r, world)(z[rows], local_valid, local_ids)[0])
    finally:
        if monkeypatch is None:
            patch.undo()
    return torch.stack(losses).mean()


@pytest.mark.parametrize("k,w", [(2, 0.0), (3, 0.0), (3, 0.7), (3, -1.5)])
def test_matches_written_out_formula(k, w):
    torch.manual_seed(k)
    z = torch.randn(6, k, 16, dtype=torch.float64)
    got = simulate_ranks(z, 1, 0.05, w)
    ref = reference_simcse_loss(z, 0.05, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_two_sentence_example_by_hand():
    # anchors a0=(1,0), a1=(0,1); positives p0=(1,0), p1=(1,1)/sqrt2; tau=0.5
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    s = 1 / math.sqrt(2)
    l0 = -(1 / 0.5) + math.log(math.exp(1 / 0.5) + math.exp(s / 0.5))
    l1 = -(s / 0.5) + math.log(math.exp(0 / 0.5) + math.exp(s / 0.5))
    got = simulate_ranks(z, 1, 0.5, 0.0)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k,w", [(2, 0.0), (3, 0.0), (3, 1.0)])
def test_local_anchors_with_rank_offsets_equal_official_full_matrix(world, k, w):
    torch.manual_seed(world * 10 + k)
    z = torch.randn(12, k, 8, dtype=torch.float64)
    official = official_layout(z[:, 0], z[:, 1], z[:, 2] if k == 3 else None, 0.05, w)
    assert simulate_ranks(z, world, 0.05, w).item() == pytest.approx(official.item(), rel=1e-9)


def test_gradients_of_rank_sum_match_official():
    torch.manual_seed(0)
    z = torch.randn(9, 3, 8, dtype=torch.float64, requires_grad=True)
    simulate_ranks(z, 3, 0.05, 0.4).backward()
    g_ours = z.grad.clone()
    z.grad = None
    official_layout(z[:, 0], z[:, 1], z[:, 2], 0.05, 0.4).backward()
    torch.testing.assert_close(g_ours, z.grad, rtol=1e-7, atol=1e-9)


def test_logits_in_fp32_for_bf16_inputs():
    torch.manual_seed(0)
    z = torch.randn(8, 2, 16)
    ref = reference_simcse_loss(z.bfloat16().double(), 0.05)
    got = simulate_ranks(z.bfloat16(), 1, 0.05, 0.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_rank_offset_selects_own_positive(monkeypatch):
    # Rank 1's anchors equal the second half of the global positives: as rank 1 (offset 4) its loss
    # is small; the same anchors taken as rank 0 (offset 0) score other rows' positives.
    a = F.normalize(torch.randn(4, 8), dim=-1)
    positives = torch.cat([torch.randn(4, 8), a])
    monkeypatch.setattr(objective_module, "gather_with_grad", lambda x: positives.unsqueeze(1))
    local = torch.stack([a, a], dim=1)
    spec = ObjectiveSpec(0.05)
    assert Objective(spec, 1, 2)(local)[0] < Objective(spec, 0, 2)(local)[0]


def test_alignment_uniformity_written_out():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # ||x-y||^2: 2, 0, 4 -> mean 2
    assert alignment(x, y).item() == pytest.approx(2.0)
    # pairwise squared distances of x: 2, 4, 2 -> log mean exp(-2 d)
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert uniformity(x).item() == pytest.approx(expected, rel=1e-6)


def _ids(texts: list[tuple[str, ...]]) -> torch.Tensor:
    vocab: dict[str, int] = {}
    return torch.tensor([[vocab.setdefault(t, len(vocab)) for t in ex] for ex in texts])


def _ranks_with_masks(z, ids, valid, world, temp=0.05, w=0.0):
    """Simulated ranks holding equal row counts (padding included), with the padding and
    duplicate masks: the mean over ranks is what the engine's gradient average produces."""
    return simulate_ranks(z, world, temp, w, ids=ids, valid=valid)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_duplicate_premises_match_the_written_out_masked_formula(world):
    texts = [
        ("p0", "e0", "c0"),
        ("p0", "e1", "c1"),
        ("p2", "e2", "c2"),
        ("p3", "e2", "c3"),
        ("p4", "e4", "e5"),
        ("p5", "e5", "c5"),
    ]
    torch.manual_seed(world)
    z = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    ref = reference_simcse_loss(z, 0.05, 0.5, texts=texts)
    got = _ranks_with_masks(z, _ids(texts), torch.ones(6, dtype=torch.bool), world, w=0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    assert abs(ref.item() - reference_simcse_loss(z, 0.05, 0.5).item()) > 1e-6  # masking changes the loss
    (g_ref,) = torch.autograd.grad(ref, z)
    (g_got,) = torch.autograd.grad(got, z)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-7, atol=1e-10)


def test_masked_pair_count_of_a_known_batch():
    texts = [("p0", "e0", "c0"), ("p0", "e1", "c1"), ("p2", "e0", "c2")]
    mask = duplicate_mask(_ids(texts), 0, 3)
    # anchor 0: e1 (same premise p0), e0 of row 2 (= its positive); anchor 1: e0 (same premise);
    # anchor 2: e0 of row 0 (= its positive). No hard negative equals a positive.
    assert mask.tolist() == [
        [False, True, True, False, False, False],
        [True, False, False, False, False, False],
        [True, False, False, False, False, False],
    ]


@pytest.mark.parametrize("k", [2, 3])
def test_uneven_ranks_seven_and_six_equal_one_process_on_thirteen(k):
    torch.manual_seed(k)
    real = torch.randn(13, k, 8, dtype=torch.float64)
    # rank 0 holds rows 0-6, rank 1 rows 7-12 plus one padding row (a copy, as the sampler does)
    padded = torch.cat([real[:7], real[7:], real[7:8]]).requires_grad_()
    valid = torch.tensor([True] * 13 + [False])
    got = _ranks_with_masks(padded, torch.arange(14 * k).view(14, k), valid, world=2)
    leaf = real.clone().requires_grad_()
    ref = reference_simcse_loss(leaf, 0.05)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    (g_got,) = torch.autograd.grad(got, padded)
    (g_ref,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(g_got[:13], g_ref, rtol=1e-7, atol=1e-10)
    assert g_got[13].abs().max() == 0  # the padding row gets no gradient
