"""Config: YAML + dotted overrides -> typed tree; every failure names the field (or file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_DATA, REPO

from simcse_dist.config import Config, ConfigError, load_config, save_config
from simcse_dist.distributed import DistEnv, DistEnvError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_the_papers_unsup_settings():
    cfg = Config()
    assert (cfg.model.pooler, cfg.loss.temperature, cfg.data.max_seq_len) == ("cls", 0.05, 32)
    assert (cfg.train.global_batch_size, cfg.optim.lr, cfg.eval.every_steps) == (64, 3e-5, 125)


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  global_batch_size: 64\noptim:\n  lr: 1e-5\n")  # YAML 1.1 reads 1e-5 as a string
    cfg = load_config(
        y,
        [
            "train.global_batch_size=128",
            "engine.zero_stage=2",
            "model.dropout=0",
            "eval.sts_dev_file=null",
            "model.name_or_path=my/model",
        ],
    )
    assert cfg.train.global_batch_size == 128 and cfg.engine.zero_stage == 2
    assert cfg.optim.lr == 1e-5 and cfg.model.dropout == 0.0 and cfg.eval.sts_dev_file is None
    assert cfg.model.name_or_path == "my/model"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.seed=3", "model.pooler=avg", "loss.hard_negative_weight=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.global_batchsize=3", "train.global_batchsize: unknown key (did you mean train.global_batch_size?)"),
        ("loss.temperature=0", "loss.temperature: must be a finite number > 0"),
        ("loss.temperature=-0.1", "loss.temperature: must be a finite number > 0"),
        ("loss.temperature=abc", "loss.temperature: expected a number"),
        ("train.global_batch_size=1.5", "train.global_batch_size: expected an integer"),
        ("train.global_batch_size=true", "train.global_batch_size: expected an integer"),
        ("model.pooler=max", "model.pooler: 'max' is not one of cls | cls_before_pooler"),
        ("engine.zero_stage=4", "engine.zero_stage: must be 0, 1, 2 or 3"),
        ("engine.precision=fp8", "engine.precision: 'fp8' is not one of fp32 | bf16 | fp16"),
        ("model.mlp_only_train=maybe", "model.mlp_only_train: expected true/false"),
        ("model.dropout=1.5", "model.dropout: must be in [0, 1)"),
        ("data.max_seq_len=0", "data.max_seq_len: must be >= 2"),
        ("log.wandb_mode=cloud", "log.wandb_mode: 'cloud' is not one of online | offline | disabled"),
        ("bogus.key=1", "bogus: unknown key"),
        ("train=3", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key.*bad\.yaml"):
        load_config(y)
    y.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml:2:1: invalid YAML"):
        load_config(y)
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "missing.yaml")


def test_batch_divisibility_and_files(tmp_path):
    cfg = load_config(
        None, ["train.global_batch_size=64", "train.grad_accum=3", f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}"]
    )
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size: 64 must be divisible by world_size x "
        r"train.grad_accum = 2 x 3 = 6",
    ):
        cfg.validate(world_size=2)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match="data.train_file: file not found: .*nope.txt"):
        cfg.validate(world_size=1)
    cfg = load_config(None, [f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}", "eval.sts_dev_file=/no/dev.tsv"])
    with pytest.raises(ConfigError, match="eval.sts_dev_file: file not found"):
        cfg.validate(world_size=1)
    cfg = load_config(None, [f"data.train_file={DEMO_DATA / 'wiki-demo.txt'}", "loss.hard_negative_weight=1"])
    with pytest.raises(ConfigError, match="loss.hard_negative_weight: only used with train.objective=sup"):
        cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="data.train_file: is required"):
        load_config(None, []).validate(world_size=1)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    # The paper configs name Hub models and hf:// data that this offline machine cannot fetch.
    offline_only = cfg.model.name_or_path.startswith("bundled:") and not cfg.data.train_file.startswith("hf://")
    for world in (1, 2):
        cfg.validate(world_size=world, check_files=offline_only)


def test_dist_env_resolution():
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0, "single")
    env = DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.source) == (1, 2, "torchrun/deepspeed")
    env = DistEnv.from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 4, 1, "slurm")
    with pytest.raises(DistEnvError, match="half-set"):
        DistEnv.from_env({"RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(DistEnvError, match="outside world size"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_cli_reports_config_errors_before_starting(tmp_path):
    """A bad value exits 2 with the field named, without starting a process group."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simcse_dist.cli",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "train.global_batch_size=33",
            "train.grad_accum=2",
            f"train.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.global_batch_size: 33 must be divisible by world_size x train.grad_accum = 1 x 2" in proc.stderr
    assert not (Path(tmp_path) / "config.yaml").exists()


def test_readme_documents_every_config_key():
    import dataclasses

    readme = (REPO / "README.md").read_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(
            section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        ):
            assert f"{section.name}.{f.name}" in readme, f"README config reference lacks {section.name}.{f.name}"


def test_paths_in_a_config_file_are_relative_to_it(tmp_path, monkeypatch):
    """A shipped config works from any directory; overrides are relative to the working one."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "demo.yaml", ["eval.sts_dev_file=dev.tsv"])
    assert cfg.data.train_file == str(REPO / "data" / "demo" / "wiki-demo.txt")
    assert cfg.eval.sts_dev_file == str(tmp_path / "dev.tsv")
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "c.yaml").write_text("data:\n  train_file: ../corpus.txt\nmodel:\n  name_or_path: ./m\n")
    cfg = load_config(sub / "c.yaml")
    assert (cfg.data.train_file, cfg.model.name_or_path) == (str(tmp_path / "corpus.txt"), str(sub / "m"))
    paper = load_config(REPO / "configs" / "sup-bert-base.yaml")
    assert paper.eval.sts_dev_file == "hf://datasets/mteb/stsbenchmark-sts/validation.jsonl.gz"


def test_an_input_may_be_a_list_directory_glob_or_url(tmp_path):
    """Each item of a list is made relative to the config file; the source's default name comes
    from the first item without a pattern; a missing local item is named by its index."""
    (tmp_path / "nli").mkdir()
    (tmp_path / "nli" / "a.parquet").write_bytes(b"")
    (tmp_path / "wiki.txt").write_text("x\n")
    (tmp_path / "c.yaml").write_text(
        "data:\n  sources:\n    - path: [wiki.txt, nli/*.parquet, 's3://bucket/x.jsonl']\n    - path: nli\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.sources[0].path == [
        str(tmp_path / "wiki.txt"),
        str(tmp_path / "nli" / "*.parquet"),
        "s3://bucket/x.jsonl",
    ]
    assert [s.name for s in cfg.sources()] == ["wiki", "nli"]
    cfg.validate(world_size=1)
    cfg = load_config(None, [f"data.train_file=[{tmp_path / 'wiki.txt'},{tmp_path / 'none.txt'}]"])
    with pytest.raises(ConfigError, match=r"^data.train_file\[1\]: .*none.txt"):
        cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match=r"^data.train_file\[0\]: .*no file matches"):
        load_config(None, [f"data.train_file=[{tmp_path / '*.csv'}]"]).validate(world_size=1)


def test_each_rank_selects_its_gpu_before_any_collective(monkeypatch):
    """GPU risks found by reading the code, shown with a stand-in torch.cuda: the device is set
    from the visible GPUs (srun --gpus-per-task=1 shows each task one GPU while SLURM_LOCALID
    counts to 7), and an impossible layout is an error naming it."""
    import torch

    from simcse_dist import distributed as du

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    env = du.DistEnv(rank=11, world_size=16, local_rank=3, source="slurm")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert du.device_for(env) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task
    assert du.device_for(env) == torch.device("cuda", 0)
    assert chosen == [3, 0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(du.DistEnvError, match="local rank 3 sees 2 GPUs"):
        du.device_for(env)


@pytest.mark.parametrize(
    "old, new",
    [
        ("model.temperature", "loss.temperature"),
        ("optim.hard_negative_weight", "loss.hard_negative_weight"),
        ("train.mask_duplicates", "loss.mask_duplicates"),
    ],
)
def test_a_moved_key_says_where_it_lives_now(old, new):
    with pytest.raises(ConfigError, match=f"^{old}: moved to {new}; rename the key"):
        load_config(None, [f"{old}=1"])


def test_the_saved_config_loads_back_from_any_directory(tmp_path, monkeypatch, shared_data):
    """An override path is relative to the working directory; config.yaml holds it absolute, so
    `--config runs/x/config.yaml` reproduces the run from anywhere (train.output_dir too)."""
    monkeypatch.chdir(REPO)
    dev = os.path.relpath(shared_data / "stsb" / "dev.tsv", REPO)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"eval.sts_dev_file={dev}", "train.output_dir=runs/x"])
    saved = tmp_path / "run" / "config.yaml"
    save_config(cfg, saved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_config(saved)
    again.validate(1)  # every file it names exists from here
    assert again.eval.sts_dev_file == str(shared_data / "stsb" / "dev.tsv")
    assert again.data.train_file == str(DEMO_DATA / "wiki-demo.txt")
    assert again.train.output_dir == str(REPO / "runs" / "x")
    assert again == cfg


def test_an_error_says_whether_the_file_or_the_command_line_gave_the_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pooler: nope\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith("model.pooler: 'nope' is not one of") and str(e.value).endswith(f"(in {path})")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["model.pooler=avg", "train.seed=abc"])
    assert str(e.value) == "train.seed: expected an integer, got 'abc' (from the command line)"


def test_a_yaml_syntax_error_is_one_line_with_its_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pooler: cls\n  dropout: [0.1\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}:4:6: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)"
    )


@pytest.mark.parametrize(
    "alias, pooler",
    [("pooler", "pooler_output"), ("last-avg", "avg"), ("first-last-avg", "avg_first_last"), ("avg", "avg")],
)
def test_simcse_pytorch_pooler_names_are_aliases(alias, pooler):
    assert load_config(None, [f"model.pooler={alias}"]).model.pooler == pooler


def test_llm_lora_7b_config_validates_offline_with_dry_run(capsys):
    """configs/llm-lora-7b.yaml on 8 and 64 ranks: --dry-run reads no model, data or network."""
    from simcse_dist.cli.train import main

    config = str(REPO / "configs" / "llm-lora-7b.yaml")
    assert main(["--config", config, "--nproc", "8", "--dry-run"]) == 0
    assert main(["--config", config, "--nproc", "64", "train.grad_accum=4", "--dry-run"]) == 0
    assert main(["--config", config, "--nproc", "8", "model.lora.r=-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.lora.r: must be >= 0" in err and "Traceback" not in err
