"""Collation: a micro-batch's rows -> {input_ids, attention_mask[, token_type_ids]} [b, k, L].

`CorpusCollator` is what training uses: it reads a prepared corpus's token ids (corpus.py).
`Collator` tokenizes the texts on the fly; it is the reference the prepared path must equal
(tests/data/, bench/corpus_scale.py, bench/tokenize_speed.py compare the two).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simcse_dist.data.corpus import PreparedCorpus
from simcse_dist.data.readers import Example


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens a prompt contributes to `tokenizer(prompt + text)`: the prompt tokenized alone,
    less a trailing special token (sentence-transformers' rule for include_prompt=False)."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - int(bool(ids) and ids[-1] in tokenizer.all_special_ids)


class Collator:
    """Examples -> {input_ids, attention_mask[, token_type_ids]} of shape [b, k, L].

    Dynamic padding: L is the longest sequence in this micro-batch (<= max_seq_len), never a
    fixed length. Unsupervised examples are tokenized once and repeated (k = 2): the two views
    differ only by dropout. Supervised examples give k = 2 (pairs) or 3 (with hard negative).
    """

    def __init__(self, tokenizer, max_seq_len: int, objective: str, prompts: tuple[str, str] = ("", "")) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.objective = objective
        self.prompts = prompts  # (query, document): column 0, the other columns

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        b, (query, document) = len(examples), self.prompts
        if self.objective == "unsup":
            k, texts = 2, [query + ex[0] for ex in examples]
        else:
            k = len(examples[0])
            texts = [(query if c == 0 else document) + s for ex in examples for c, s in enumerate(ex)]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_len, return_tensors="pt")
        batch = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in enc:
                continue
            t = enc[key]
            if self.objective == "unsup":
                batch[key] = t.unsqueeze(1).expand(b, k, t.shape[-1]).contiguous()  # [b, 2, L]
            else:
                batch[key] = t.view(b, k, t.shape[-1])  # [b, k, L]
        return batch


class CorpusCollator:
    """Indices -> the same {input_ids, attention_mask[, token_type_ids]} [b, k, L] tensors as
    `data.Collator` returns for those examples, from prepared ids instead of the tokenizer.

    Dynamic padding to the longest sequence of the micro-batch, on the tokenizer's padding side;
    unsup repeats column 0 twice (the two dropout views), sup stacks all columns (k = 2 or 3).
    Picklable (DataLoader workers): the corpus travels as its directory.
    """

    def __init__(self, corpus: PreparedCorpus, pad_token_id: int, objective: str) -> None:
        if objective not in ("unsup", "sup"):
            raise ValueError(f"objective must be unsup or sup, got {objective!r}")
        if objective == "sup" and corpus.num_columns < 2:
            raise ValueError("sup needs a corpus with >= 2 columns (sent0, sent1[, hard_neg])")
        self.corpus, self.pad_token_id, self.objective = corpus, pad_token_id, objective
        self.k = 2 if objective == "unsup" else corpus.num_columns
        self.columns = [0] if objective == "unsup" else list(range(corpus.num_columns))

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        corpus, b, columns = self.corpus, len(indices), self.columns
        shard, local = corpus.locate(np.asarray(indices, dtype=np.int64))
        # Rows in the Collator's order: example-major, then column (the tokenizer's text order).
        rows, types, want_types = [], [], corpus.has_token_type_ids
        for s, i in zip(shard.tolist(), local.tolist(), strict=True):
            sh = corpus.shard(s)
            for c in columns:
                a, e = sh.offsets[c][i : i + 2].tolist()
                rows.append(sh.ids[c][a:e])
                if want_types:
                    t = sh.types[c]
                    types.append(np.zeros(e - a, dtype=np.int8) if t is None else t[a:e])
        lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max()) if len(rows) else 0
        pos = np.arange(width)
        if corpus.padding_side == "left":
            mask = pos[None, :] >= (width - lengths)[:, None]
        else:
            mask = pos[None, :] < lengths[:, None]
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.concatenate(rows) if rows else []  # row-major fill = per-row order
        out = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if want_types:
            token_types = np.full((len(rows), width), corpus.pad_token_type_id, dtype=np.int64)
            token_types[mask] = np.concatenate(types) if types else []
            out["token_type_ids"] = token_types
        batch = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):  # Collator's key order
            if key not in out:
                continue
            t = torch.from_numpy(out[key])
            if self.objective == "unsup":
                batch[key] = t.unsqueeze(1).expand(b, 2, width).contiguous()  # [b, 2, L]
            else:
                batch[key] = t.view(b, self.k, width)  # [b, k, L]
        return batch
