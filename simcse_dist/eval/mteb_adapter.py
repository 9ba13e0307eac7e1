"""MTEB on a SimCSE encoder: `simcse-eval --mteb TASK[,TASK]`.

mteb (Muennighoff et al. 2023) is an optional extra (`pip install 'simcse-dist[mteb]'`), imported
only inside these functions, so nothing else needs it installed.

- `MtebEncoder` implements mteb 2's EncoderProtocol (mteb/models/models_protocols.py) over our
  `Encoder` with its pooler: mteb hands `encode()` a DataLoader of batches with a "text"
  column; the texts go through `evaluation.encode`, so under a launcher each rank encodes a
  share (every rank runs the same mteb loop on the same data). No prompt or instruction is
  added: SimCSE models have none, and mteb's sentence-transformers wrapper adds none for such a
  model either, so an exported model scores the same through both. Similarity is cosine, by
  mteb's own functions (chosen by `ModelMeta.similarity_fn_name`).
- A task is a registered mteb name (`STSBenchmark`), or `module:Class` / `path/to/file.py:Class`
  naming a task class defined in Python whose `load_data()` fills `self.dataset` from local
  files, the way mteb's own mock tasks do (mteb/mocks/mock_tasks).
- `run_mteb` loads each task's data itself first. Without network (HF_HUB_OFFLINE=1) a
  registered task loads only from the Hugging Face datasets cache; a task that cannot load is
  reported by name with how to provide its data, and the other tasks still run.
- Results are not cached (`cache=None`): mteb's default cache (~/.cache/mteb) is keyed by model
  name and would hand back an old score for a retrained model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from simcse_dist import distributed as du
from simcse_dist.eval.encode import encode


class MtebError(ValueError):
    """mteb is missing, a task name is unknown, or a task's data cannot be loaded."""


def import_mteb():
    try:
        import mteb
    except ImportError as e:
        raise MtebError(
            f"--mteb needs the optional mteb package: pip install 'simcse-dist[mteb]' (or pip install mteb) ({e})"
        ) from None
    return mteb


class MtebEncoder:
    """mteb's EncoderProtocol for an Encoder + tokenizer (see the module docstring)."""

    def __init__(
        self,
        encoder,
        tokenizer,
        device,
        *,
        name: str,
        batch_size: int = 128,
        max_length: int = 512,
        show_progress: bool = False,
    ) -> None:
        import_mteb()
        from mteb.models import ModelMeta
        from mteb.models.model_meta import ScoringFunction

        self.encoder, self.tokenizer, self.device = encoder, tokenizer, device
        self.batch_size, self.max_length, self.show_progress = batch_size, max_length, show_progress
        self.dim = encoder.backbone.config.hidden_size
        # create_empty + model_copy skips pydantic validation, so the enum itself is passed
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": f"simcse-dist/{name}",
                "embed_dim": self.dim,
                "max_tokens": max_length,
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"],
            }
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        texts = []
        for batch in inputs:
            if "text" not in batch:
                raise MtebError(f"{task_metadata.name}: only text inputs are supported, got {sorted(batch)}")
            texts.extend(batch["text"])
        if not texts:  # evaluation.encode needs at least one sentence
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = encode(
            self.encoder,
            self.tokenizer,
            texts,
            self.device,
            kwargs.get("batch_size") or self.batch_size,
            self.max_length,
            self.show_progress,
        )  # collective: every rank runs the same mteb loop
        return emb.numpy()

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


def _custom_task(spec: str):
    """An instance of the task class named by `module:Class` or `path/to/file.py:Class`."""
    from mteb.abstasks import AbsTask

    target, _, class_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(target).stem, target)
            if loader is None or not Path(target).is_file():
                raise MtebError(f"--mteb {spec}: file {target} not found")
            # as when the file runs as a script: its folder is importable, so it can import its neighbours
            folder = str(Path(target).resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise MtebError(f"--mteb {spec}: cannot import {target}: {e}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, AbsTask)):
        raise MtebError(f"--mteb {spec}: {target} has no mteb task class {class_name!r} (a subclass of mteb's AbsTask)")
    return cls()


def resolve_tasks(spec: str) -> list:
    """mteb task objects for a comma-separated list of names and module:Class entries."""
    mteb = import_mteb()
    tasks = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        if ":" in name:
            tasks.append(_custom_task(name))
            continue
        try:
            tasks.append(mteb.get_task(name))
        except KeyError:
            raise MtebError(
                f"--mteb: unknown MTEB task {name!r} (mteb {mteb.__version__}); "
                "for a task of your own pass module:Class or file.py:Class"
            ) from None
    if not tasks:
        raise MtebError("--mteb: no task given")
    return tasks


def _data_problem(task, error: Exception) -> str:
    """One line: which task, what failed, and how to provide its data."""
    from huggingface_hub import constants

    name, source = task.metadata.name, task.metadata.dataset or {}
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    where = (
        f"Hugging Face dataset {source.get('path')} (revision {source.get('revision')})"
        if source.get("path")
        else "data"
    )
    offline = " and the Hub is unreachable (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
    return (
        f"MTEB task {name}: its {where} is not in the local cache{offline} ({reason}). To provide it, run "
        f"`python -c \"import mteb; mteb.get_task('{name}').load_data()\"` on a machine with Hub access and "
        f"copy its Hugging Face cache ({constants.HF_HOME}) here (or point HF_HOME at a copy), or define the task "
        "in Python with a load_data() that reads local files and pass it as file.py:Class (docs/evaluation.md)"
    )


def run_mteb(
    model: MtebEncoder, tasks: list, show_progress: bool = False
) -> tuple[dict[str, tuple[str, float]], list[str]]:
    """({task name: (main score name, main score averaged over splits and subsets)}, [one line per
    task whose data could not be loaded]). collective under a launcher: every rank calls this."""
    mteb = import_mteb()
    scores, problems = {}, []
    for task in tasks:
        failed = False
        if not task.data_loaded:
            try:
                task.load_data()
            except Exception as e:  # any failure of the task's own loader: report it by task name
                problems.append(_data_problem(task, e))
                failed = True
        # collective: a task runs only if every rank loaded it (caches are node-local), else the
        # ranks that did would wait forever in encode for the others
        if du.all_reduce_max(torch.tensor([float(failed)], device=model.device)).item() > 0:
            if not failed:
                problems.append(
                    f"MTEB task {task.metadata.name}: its data could not be loaded on every rank "
                    "(each node reads its own Hugging Face cache)"
                )
            continue
        result = mteb.evaluate(
            model,
            task,
            cache=None,
            co2_tracker=False,
            show_progress_bar=show_progress,
            encode_kwargs={"batch_size": model.batch_size, "show_progress_bar": show_progress},
        )
        (task_result,) = result.task_results
        scores[task.metadata.name] = (task.metadata.main_score, float(task_result.get_score()))
        task.unload_data()  # one task's data in memory at a time
    return scores, problems
