"""The GPU-path risks that a CPU can show.

Risk 6, best/ from the fp32 master weights: at bf16 the module holds bf16 copies, the optimizer
the fp32 masters; a small update changes the masters but not their bf16 rounding. The reference
is torch's AdamW first step written out (m = (1-b1) g, v = (1-b2) g^2, bias-corrected:
w - lr * g / (|g| + eps)) from the bf16 gradient captured by a tensor hook, not DeepSpeed's state;
it also holds DeepSpeed's ZeRO-0 bf16/fp16 optimizer to torch's first step (its construction-time
zero-gradient step made the first update 0.74x, engine._undo_init_step). Under ZeRO-3 only the
rank that writes keeps a full copy (2 gloo ranks).

Risk 7, collectives: every tensor our code hands torch.distributed is contiguous and on the
engine's device, including the padding rows of a short last batch, at ZeRO-2 and 3 (2 gloo
ranks, collectives wrapped). What needs CUDA (nccl refusing a CPU tensor) is shown on the "meta"
device: our loss, gradient cache and agreement run with fake collectives on meta tensors, so any
tensor our code makes without the input's device would arrive on CPU. bf16 gradients are reduced
in fp32 (the generated DeepSpeed config).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEMO_DATA, REPO, run_gloo

from simcse_dist.config import load_config
from simcse_dist.engine import Engine, deepspeed_config
from simcse_dist.model.encoder import Encoder

WORKER = REPO / "tests" / "workers" / "collective_worker.py"
LR, EPS = 1e-5, 1e-8


# -- risk 6 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_full_state_dict_is_the_fp32_master_not_the_bf16_params(tiny_bert, single_process_group, stage):
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_bert}",
            "model.dropout=0",
            "train.global_batch_size=4",
            "engine.gradient_clipping=0",
            "engine.precision=bf16",
            f"engine.zero_stage={stage}",
            f"optim.lr={LR}",
            f"optim.adam_eps={EPS}",
        ],
    )
    torch.manual_seed(0)
    engine = Engine(Encoder.from_config(cfg.model), cfg, world_size=1, total_steps=10)
    assert engine.engine.communication_data_type == torch.float32  # the engine took our fp32 reduction
    params = dict(engine.module.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    before = {n: p.detach().float().clone() for n, p in params.items()}  # = the masters' start (bf16 values)
    grads = {}
    for n, p in params.items():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach().float().clone()))
    ids = torch.randint(1000, 2000, (4, 2, 6), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, attention_mask=torch.ones_like(ids)).float().square().mean())
    engine.step()
    state = engine.full_state_dict()
    assert set(grads) == set(params)
    off_master = off_bf16 = 0.0
    for n, p in params.items():
        g = grads[n]
        reference = before[n] - LR * g / (g.abs() + EPS)  # AdamW's first step (weight decay 0)
        off_master = max(off_master, (state[n] - reference).abs().max().item())
        off_bf16 = max(off_bf16, (state[n] - p.detach().float()).abs().max().item())
    assert off_master < 1e-8, off_master  # 5e-10 measured: the fp32 master after one exact AdamW step
    assert off_bf16 > 0.5 * LR, off_bf16  # the bf16 params did not see the update (their ulp > lr)


def test_zero3_full_state_dict_keeps_one_copy_on_rank_0(tiny_bert, tmp_path):
    run_gloo(WORKER, 2, ["state", str(tmp_path), str(tiny_bert)], timeout=240)
    cfg = load_config(None, [f"model.name_or_path={tiny_bert}", "model.dropout=0"])
    torch.manual_seed(0)
    model = Encoder.from_config(cfg.model)  # one process, no DeepSpeed
    reference = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    got = torch.load(tmp_path / "state-rank0.pt", weights_only=True)
    assert list(got) == list(reference)
    for name, value in reference.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value.detach()), name
    keys = [json.loads((tmp_path / f"keys-rank{r}.json").read_text()) for r in (0, 1)]
    assert keys[0] == {"dst0": len(reference), "all": len(reference)}
    assert keys[1] == {"dst0": 0, "all": len(reference)}  # rank 1 joined the gathers, kept nothing


# -- risk 7: real collectives on 2 gloo ranks -------------------------------------------------------
def test_our_collectives_get_contiguous_tensors_on_the_engine_device(tiny_bert, tmp_path):
    """Supervised triplets with duplicate masking (the extra padding/id gather), 41 rows at a global
    batch of 8 with drop_last=false: the last batch has 1 row, so rank 1's shard is empty (one
    padding row); STS evaluation of 21 distinct sentences (rank 1's share padded). ZeRO-2 and
    ZeRO-3 with the generated DeepSpeed config, and ZeRO-2 with overlap_comm forced on (what the
    config sets on CUDA)."""
    rows = (DEMO_DATA / "nli-demo.tsv").read_text().splitlines()
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(rows[:42]) + "\n")  # header + 41 triplets: 5 batches of 8 + 1 row
    dev = tmp_path / "dev.tsv"
    pairs = [r.split("\t")[:2] for r in rows[1:12]]
    pairs[-1][1] = pairs[-1][0]  # 11 pairs, 21 distinct sentences
    dev.write_text(
        "sentence1\tsentence2\tscore\n"
        + "".join(f"{a}\t{b}\t{5.0 if i % 2 == 0 else 1.0}\n" for i, (a, b) in enumerate(pairs))
    )
    overlap = tmp_path / "overlap.json"
    overlap.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    cases = {
        "z2": ["engine.zero_stage=2"],
        "z3": ["engine.zero_stage=3"],
        "z2-overlap": ["engine.zero_stage=2", f"engine.deepspeed_config={overlap}"],
    }
    for name, extra in cases.items():
        out = tmp_path / name
        out.mkdir()
        run_gloo(
            WORKER,
            2,
            [
                "train",
                str(out),
                f"model.name_or_path={tiny_bert}",
                f"data.train_file={train}",
                "train.objective=sup",
                "train.global_batch_size=8",
                "data.drop_last=false",
                "train.max_steps=6",
                "log.every_steps=3",
                "log.wandb_mode=disabled",
                "log.progress_bar=false",
                f"eval.sts_dev_file={dev}",
                "eval.every_steps=3",
                "eval.batch_size=4",
                f"train.output_dir={out / 'run'}",
                *extra,
            ],
            timeout=240,
        )
        for rank in (0, 1):
            record = json.loads((out / f"calls-rank{rank}.json").read_text())
            assert record["overlap_comm"] is (name == "z2-overlap")  # generated: CUDA only
            assert record["padded_real_rows"] == ([0] if rank == 1 else [])  # rank 1: an empty shard, padded
            calls = record["calls"]
            seen = {(c["op"], c["caller"]) for c in calls}
            # the wrapper saw each of our paths: the embedding gather (forward and its backward on
            # gloo), the padding/id and evaluation gathers, the metrics / agreement all-reduces
            assert ("all_gather", "torch/distributed/nn/functional.py") in seen, seen
            assert ("scatter", "torch/distributed/nn/functional.py") in seen, seen  # its backward on gloo
            assert ("all_gather", "simcse_dist/distributed.py") in seen, seen  # the no-grad gather
            assert any(op == "all_reduce" for op, _ in seen), seen
            bad = [c for c in calls if not c["contiguous"] or c["devices"] != [record["engine_device"]]]
            assert not bad, (name, rank, bad[:5])


# -- risk 7: a non-CPU device, shown on "meta" ----------------------------------------------------
class FakeCollectives:
    """torch.distributed as two ranks would see it, for tensors on the meta device: records the
    devices our code passes and returns outputs of the right shape on the input's device."""

    def __init__(self, monkeypatch) -> None:
        import torch.distributed as dist

        from simcse_dist.train import gather

        self.devices: list[str] = []
        monkeypatch.setattr(gather, "_active", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "all_gather", self.all_gather)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(gather.dist_fn, "all_gather", self.autograd_all_gather)

    def seen(self, *tensors: torch.Tensor) -> None:
        self.devices += [str(t.device) for t in tensors]

    def all_gather(self, outputs, x, group=None, async_op=False):
        self.seen(x, *outputs)

    def all_reduce(self, x, op=None, group=None, async_op=False):
        self.seen(x)

    def autograd_all_gather(self, x, group=None):
        self.seen(x)
        return (x * 1, x * 1)  # two ranks' shards, differentiable


def _meta_batch(b: int, k: int, padded: bool, with_ids: bool):
    from simcse_dist.data.batch import Batch

    ids = torch.zeros(b, k, 5, dtype=torch.long, device="meta")
    return Batch(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        row_valid=torch.ones(b, dtype=torch.bool, device="meta") if padded else None,
        ids=torch.zeros(b, k, dtype=torch.long, device="meta") if with_ids else None,
    )


@pytest.mark.parametrize("padded,with_ids", [(True, False), (False, True), (True, True)])
def test_loss_and_grad_cache_make_no_cpu_tensor_for_a_collective(monkeypatch, padded, with_ids):
    from simcse_dist.train.objective import Objective, ObjectiveSpec
    from simcse_dist.train.step import accumulate, grad_cache

    fake = FakeCollectives(monkeypatch)
    weight = torch.empty(5, 8, device="meta", requires_grad=True)

    def encode(inputs):  # [b, k, L] -> [b, k, d], on the inputs' device
        return inputs["input_ids"].float() @ weight

    loss_fn = Objective(ObjectiveSpec(0.05, mask_duplicates=with_ids), rank=1, world_size=2)
    for run in (accumulate, grad_cache):
        # a padded chunk and an unpadded one: grad_cache fills the missing masks itself
        batches = [_meta_batch(3, 3, padded, with_ids), _meta_batch(3, 3, False, False)]
        result = run(batches, encode, lambda loss, last: loss.backward(), loss_fn)
        assert result.loss.device.type == "meta"
    assert fake.devices and set(fake.devices) == {"meta"}, fake.devices


def test_agreement_and_metrics_reduce_on_the_collective_device(monkeypatch):
    from simcse_dist import distributed as du

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert du._device() == torch.device("cuda", 3)  # where agreed() builds its flag under CUDA
    fake = FakeCollectives(monkeypatch)
    monkeypatch.setattr(du, "_device", lambda: torch.device("meta"))
    with pytest.raises(RuntimeError, match="meta"):  # the collective ran; reading its meta result cannot
        du.agreed(lambda: "ok")
    assert fake.devices == ["meta"]


# -- risk 7: the reduction dtype ---------------------------------------------------------------------
def test_bf16_gradients_are_reduced_in_fp32(tmp_path):
    def ds(*overrides):
        return deepspeed_config(load_config(None, ["train.global_batch_size=8", *overrides]), world_size=2)

    for stage in (0, 1, 2, 3):
        assert ds("engine.precision=bf16", f"engine.zero_stage={stage}")["communication_data_type"] == "fp32"
    assert "communication_data_type" not in ds("engine.precision=fp32")  # DeepSpeed's default: fp32
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"communication_data_type": "bf16"}))
    assert ds("engine.precision=bf16", f"engine.deepspeed_config={expert}")["communication_data_type"] == "bf16"
