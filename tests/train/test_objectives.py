"""The objective layer (train/objective.py) against its written-out formula (tests/reference.py),
each term alone and all together, and against sentence-transformers' MatryoshkaLoss and
GISTEmbedLoss on one process."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from reference import reference_objective, reference_simcse_loss

from simcse_dist.train.loss import distill_kl, guide_mask
from simcse_dist.train.objective import Objective, ObjectiveSpec

TAU = 0.05


def views(seed: int, b: int = 6, k: int = 3, d: int = 16) -> torch.Tensor:
    return torch.randn(b, k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_plain_objective_is_the_written_out_simcse_loss():
    """No Matryoshka, guide or teacher: Eq. 5 of the paper with its hard-negative weight."""
    z = views(0).requires_grad_()
    got, masked = Objective(ObjectiveSpec(TAU, 0.7))(z)
    want = reference_simcse_loss(z, TAU, 0.7)
    assert masked is None and got.item() == pytest.approx(want.item(), rel=1e-12)
    (g1,), (g2,) = torch.autograd.grad(got, z), torch.autograd.grad(want, z)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


def test_guide_mask_is_the_written_out_threshold():
    sims = torch.tensor([[0.9, 0.95, 0.5, 0.86], [0.2, -0.4, -0.46, -0.3]])
    labels = torch.tensor([0, 1])
    # absolute, margin 0.05: row 0 drops sims > 0.85 (not its label), row 1 drops > -0.45
    assert guide_mask(sims, labels, 0.05, "absolute").tolist() == [
        [False, True, False, True],
        [True, False, False, True],
    ]
    # relative, margin 0.1: row 0 threshold 0.9 - 0.09 = 0.81; row 1: -0.4 - 0.04 = -0.44
    assert guide_mask(sims, labels, 0.1, "relative").tolist() == [
        [False, True, False, True],
        [True, False, False, True],
    ]


def test_distill_kl_is_the_written_out_divergence():
    student, teacher = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    got = distill_kl(student, teacher, 0.1)
    p_t, p_s = torch.softmax(teacher / 0.1, 1), torch.softmax(student / 0.1, 1)
    assert got.item() == pytest.approx((p_t * (p_t / p_s).log()).sum(1).mean().item(), rel=1e-12)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 4] = True
    p_t, p_s = torch.softmax(teacher[:, :4] / 0.1, 1), torch.softmax(student[:, :4] / 0.1, 1)
    assert distill_kl(student, teacher, 0.1, mask).item() == pytest.approx(
        (p_t * (p_t / p_s).log()).sum(1).mean().item(), rel=1e-12
    )


@pytest.mark.parametrize("k", [2, 3])
def test_matryoshka_is_the_weighted_sum_over_prefixes(k):
    z = views(1, k=k)
    dims = [(16, 1.0), (8, 0.5), (4, 2.0)]
    got, _ = Objective(ObjectiveSpec(TAU, matryoshka=tuple(dims)))(z)
    want = sum(w * reference_simcse_loss(z[..., :dim], TAU) for dim, w in dims)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


CASES = list(itertools.product([2, 3], ["absolute", "relative"], [(False, False), (True, True), (True, False)]))


@pytest.mark.parametrize("k, strategy, contrasts", CASES)
def test_every_term_together_is_the_written_out_objective(k, strategy, contrasts):
    """Matryoshka x guide (either margin, with and without the anchor / positive blocks) x
    distillation x a hard-negative weight, loss and gradient against the reference."""
    z, guide, teacher = views(2, k=k).requires_grad_(), views(3, k=k), views(4, k=k, d=8)
    guide = 0.7 * z.detach() + 0.3 * guide  # a guide that agrees with the student often enough to mask some
    dims = ((16, 1.0), (8, 0.5))
    spec = ObjectiveSpec(
        TAU,
        0.3,
        matryoshka=dims,
        guide_margin=0.05,
        guide_strategy=strategy,
        contrast_anchors=contrasts[0],
        contrast_positives=contrasts[1],
        distill_temperature=0.1,
        distill_weight=0.7,
    )
    got, masked = Objective(spec)(z, None, None, guide, teacher)
    (grad,) = torch.autograd.grad(got, z)
    want = reference_objective(
        z, TAU, 0.3 if k == 3 else 0.0, list(dims), guide, 0.05, strategy, contrasts[0], contrasts[1], teacher, 0.1, 0.7
    )
    (want_grad,) = torch.autograd.grad(want, z)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    assert torch.allclose(grad, want_grad, rtol=1e-7, atol=1e-10)
    assert masked is not None and int(masked) > 0  # the guide masked something: the test is not vacuous


def test_the_guide_and_padding_rows_together():
    """A short batch: padding copies are left out, the guide masks among the real rows only."""
    z, guide = views(5, k=2), views(6, k=2)
    guide = 0.8 * z + 0.2 * guide
    z[4:], guide[4:] = z[0], guide[0]
    valid = torch.arange(6) < 4
    spec = ObjectiveSpec(TAU, guide_margin=0.0, contrast_anchors=True, contrast_positives=True)
    got, _ = Objective(spec)(z, valid, None, guide, None)
    want = reference_objective(z[:4], TAU, guide=guide[:4], contrast_anchors=True, contrast_positives=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_missing_or_extra_frozen_embeddings_are_an_error():
    with pytest.raises(ValueError, match="guide / teacher embeddings"):
        Objective(ObjectiveSpec(TAU, guide_margin=0.0))(views(7))
    with pytest.raises(ValueError, match="guide / teacher embeddings"):
        Objective(ObjectiveSpec(TAU))(views(7), None, None, None, views(8))


# -- the peer: sentence-transformers 6 on one process ---------------------------------------------


@pytest.fixture(scope="module")
def peer(tiny_bert, tmp_path_factory):
    """The tiny BERT as sentence-transformers and as our Encoder (the same weights, mean pooling,
    dropout off), a second random BERT as the guide, and NLI triplets."""
    from helpers import DEMO_DATA, make_tiny_bert
    from sentence_transformers import SentenceTransformer

    from simcse_dist.model.encoder import quiet_transformers
    from simcse_dist.model.export import export_model
    from simcse_dist.model.load import load_encoder

    root = tmp_path_factory.mktemp("peer")
    guide_src = make_tiny_bert(root / "guide-src", seed=7, initializer_range=0.3)
    with quiet_transformers():
        student_dir = export_model(tiny_bert, root / "student", pooler="avg")
        guide_dir = export_model(guide_src, root / "guide", pooler="avg")
        st, st_guide = (SentenceTransformer(str(d), device="cpu").eval() for d in (student_dir, guide_dir))
        ours, tokenizer, _ = load_encoder(student_dir)
        guide, _, _ = load_encoder(guide_dir)
    rows = [line.split("\t") for line in (DEMO_DATA / "nli-demo.tsv").read_text().splitlines()[1:9]]
    columns = [[r[c].strip() for r in rows] for c in range(3)]
    return {
        "st": st,
        "st_guide": st_guide,
        "ours": ours.eval(),
        "guide": guide.eval(),
        "tokenizer": tokenizer,
        "columns": columns,
    }


def ours_loss_and_grads(peer, spec: ObjectiveSpec, k: int):
    tok, encoder = peer["tokenizer"], peer["ours"]
    encoder.zero_grad()

    def embed(model):
        out = []
        for texts in peer["columns"][:k]:
            batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(model(**batch))
        return torch.stack(out, dim=1)  # [b, k, d]

    with torch.no_grad():
        guide = embed(peer["guide"]) if spec.uses_guide else None
    loss, _ = Objective(spec)(embed(encoder), None, None, guide, None)
    loss.backward()
    return loss.item(), {n.removeprefix("backbone."): p.grad.clone() for n, p in encoder.named_parameters()}


def st_loss_and_grads(peer, loss_fn, k: int):
    st = peer["st"]
    st.zero_grad()
    features = [st.tokenize(texts) for texts in peer["columns"][:k]]
    loss = loss_fn(features, None)
    loss.backward()
    prefix = "0.model."
    return loss.item(), {n.removeprefix(prefix): p.grad.clone() for n, p in st.named_parameters() if p.grad is not None}


def assert_same(ours, theirs):
    """Loss to 1e-5; the gradient (every parameter, one vector) to 1e-5 relative. The attention key
    biases' gradient is 0 in exact arithmetic (softmax ignores a shift), rounding noise in both."""
    (loss, grads), (st_loss, st_grads) = ours, theirs
    assert loss == pytest.approx(st_loss, rel=1e-5, abs=1e-6)
    names = [n for n in st_grads if not n.endswith("key.bias")]
    assert set(names) <= set(grads) and len(names) > 10
    mine, peer = torch.cat([grads[n].flatten() for n in names]), torch.cat([st_grads[n].flatten() for n in names])
    assert ((mine - peer).norm() / peer.norm()).item() < 1e-5


@pytest.mark.parametrize("k", [2, 3])
def test_matryoshka_equals_sentence_transformers(peer, k):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    st_fn = MatryoshkaLoss(
        peer["st"], MultipleNegativesRankingLoss(peer["st"], scale=1 / TAU), [32, 16, 8], [1, 0.5, 2]
    )
    spec = ObjectiveSpec(TAU, matryoshka=((32, 1.0), (16, 0.5), (8, 2.0)))
    assert_same(ours_loss_and_grads(peer, spec, k), st_loss_and_grads(peer, st_fn, k))


@pytest.mark.parametrize("strategy, margin", [("absolute", 0.0), ("absolute", 0.01), ("relative", 0.02)])
@pytest.mark.parametrize("k", [2, 3])
def test_guided_filtering_equals_gistembed(peer, strategy, margin, k):
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    st_fn = GISTEmbedLoss(peer["st"], peer["st_guide"], temperature=TAU, margin_strategy=strategy, margin=margin)
    spec = ObjectiveSpec(
        TAU, guide_margin=margin, guide_strategy=strategy, contrast_anchors=True, contrast_positives=True
    )
    assert_same(ours_loss_and_grads(peer, spec, k), st_loss_and_grads(peer, st_fn, k))


@pytest.mark.slow
def test_a_guide_flagged_pair_across_ranks_is_masked_and_two_ranks_equal_one(tmp_path):
    """Rank 1's row 4 is, to the guide, rank 0's anchor 0's own positive: rank 0 masks it; the
    two ranks' losses average to the one-process objective, and their view gradients are the
    one-process gradient times the world size (the engine then averages over ranks)."""
    import sys

    from helpers import REPO, run_gloo

    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from objective_worker import SPEC, batch

    run_gloo(REPO / "tests" / "workers" / "objective_worker.py", 2, [str(tmp_path / "out.pt")], timeout=120)
    got = torch.load(tmp_path / "out.pt")
    z, guide = batch()
    z.requires_grad_()
    teacher = z.detach() * 0.5 + 0.1
    dims = list(SPEC.matryoshka)
    want = reference_objective(
        z,
        SPEC.temperature,
        0.0,
        dims,
        guide,
        SPEC.guide_margin,
        "absolute",
        True,
        True,
        teacher,
        SPEC.distill_temperature,
    )
    (want_grad,) = torch.autograd.grad(want, z)
    assert got[:, 0].mean().item() == pytest.approx(want.item(), rel=1e-9)
    assert torch.allclose(got[:, 2:].reshape(6, 3, 16) / 2, want_grad, rtol=1e-7, atol=1e-12)
    unflagged = guide.clone()
    unflagged[4, 1] = torch.randn(8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    without = reference_objective(
        z,
        SPEC.temperature,
        0.0,
        dims,
        unflagged,
        SPEC.guide_margin,
        "absolute",
        True,
        True,
        teacher,
        SPEC.distill_temperature,
    )
    assert abs(without.item() - want.item()) > 1e-6  # the cross-rank pair mattered
    assert got[0, 1] >= 1  # rank 0 masked it


@pytest.fixture(scope="module")
def frozen_models(tmp_path_factory):
    from helpers import make_tiny_bert

    root = tmp_path_factory.mktemp("frozen")
    return make_tiny_bert(root / "guide", seed=7, initializer_range=0.3), make_tiny_bert(
        root / "teacher", seed=8, initializer_range=0.3
    )


def all_objectives(model, guide, teacher) -> list[str]:
    from helpers import DEMO_DATA

    return [
        f"model.name_or_path={model}",
        "model.dropout=0",
        "model.pooler=avg",
        "model.include_prompt=false",
        f"data.train_file={DEMO_DATA / 'nli-demo.tsv'}",
        "data.prompt={query: 'query: ', document: 'passage: '}",
        "train.objective=sup",
        "train.global_batch_size=8",
        "train.max_steps=3",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "log.progress_bar=false",
        "optim.lr=1e-3",
        "checkpoint.every_steps=0",
        "loss.matryoshka_dims=[32,16,8]",
        "loss.matryoshka_weights=[1,0.5,0.25]",
        "loss.hard_negative_weight=0.5",
        f"loss.guide={{model: {guide}, pooler: avg, margin: 0.01}}",
        f"loss.distill={{teacher: {teacher}, pooler: avg, temperature: 0.1, weight: 0.5}}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("grad_cache", [False, True])
def test_one_rank_equals_two_with_every_objective(tiny_bert, frozen_models, tmp_path, grad_cache):
    """Matryoshka, the guide, a teacher, prompts left out of pooling and duplicate masking
    together, ZeRO 0 and 3: the same
    train/loss and grad norm on 1 and 2 ranks (one torchrun job per world size runs both stages)."""
    from helpers import REPO, read_jsonl, run_gloo

    common = all_objectives(tiny_bert, *frozen_models)
    if grad_cache:
        common += ["train.grad_cache=true", "train.grad_accum=2"]
    for n in (1, 2):
        run_gloo(
            REPO / "tests" / "workers" / "train_worker.py",
            n,
            ["--out", str(tmp_path / f"n{n}"), "--stages", "0,3", *common],
            timeout=600,
        )
    for stage in (0, 3):
        one, two = (read_jsonl(tmp_path / f"n{n}" / f"z{stage}" / "metrics.jsonl") for n in (1, 2))
        assert len(one) == len(two) == 3
        for a, b in zip(one, two, strict=True):
            for key in ("train/loss", "train/grad_norm", "train/masked_negatives"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (stage, key, a, b)
        assert one[0]["train/masked_negatives"] > 0


def _teacher_table(teacher, texts: list[list[str]], max_len: int, prompts=("", "")) -> np.ndarray:
    """[rows, columns, d]: the teacher's embedding of every column of every row, encoded here
    with the model alone (eval mode, the run's truncation), in the training file's order."""
    from simcse_dist.eval.encode import encode
    from simcse_dist.model.load import load_encoder

    encoder, tokenizer, _ = load_encoder(teacher, "avg")
    columns = [
        encode(encoder, tokenizer, [row[c] for row in texts], torch.device("cpu"), max_length=max_len, prompt=p)
        for c, p in enumerate((prompts[0], prompts[1], prompts[1]))
    ]
    return torch.stack(columns, dim=1).numpy()


def test_precomputed_teacher_embeddings_train_as_the_online_teacher(tiny_bert, frozen_models, tmp_path):
    """loss.distill.embeddings (a .npy of the teacher's embeddings, written here) gives the same
    losses and gradients as the teacher run online; a table of the wrong length is refused."""
    from helpers import DEMO_DATA, cli, read_jsonl

    _, teacher = frozen_models
    nli = DEMO_DATA / "nli-demo.tsv"
    texts = [line.split("\t") for line in nli.read_text().splitlines()[1:] if line]
    table = tmp_path / "teacher.npy"
    np.save(table, _teacher_table(teacher, texts, 32))
    common = [
        f"model.name_or_path={tiny_bert}",
        "model.dropout=0",
        f"data.train_file={nli}",
        "train.objective=sup",
        "train.global_batch_size=8",
        "train.max_steps=3",
        "log.every_steps=1",
        "log.wandb_mode=disabled",
        "checkpoint.every_steps=0",
        "optim.lr=1e-3",
    ]
    online = [f"loss.distill={{teacher: {teacher}, pooler: avg, temperature: 0.1, weight: 0.5}}"]
    offline = [f"loss.distill={{embeddings: {table}, temperature: 0.1, weight: 0.5}}"]
    for name, extra in (("online", online), ("offline", offline)):
        proc = cli([*common, *extra, f"train.output_dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("online", "offline"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (key, x, y)
    short = tmp_path / "short.npy"
    np.save(short, np.load(table)[:-1])
    proc = cli([*common, f"loss.distill={{embeddings: {short}}}", f"train.output_dir={tmp_path / 'short'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"loss.distill.embeddings: {short} has {len(texts) - 1} rows" in proc.stderr, proc.stderr[-2000:]
