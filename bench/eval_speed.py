"""How fast `simcse-eval` encodes an STS set: the sentences of STS-B test (its unique ones, as
`pair_embeddings` encodes them) through eval/encode.py, ordered by characters (the order before
token lengths were used: the baseline), by token lengths, and by token lengths packed into rows.

    python -m bench.eval_speed --output bench/results/eval-speed-cpu.json
    python -m bench.eval_speed --rounds 1 --pack-tokens 64          # smoke

Timing: each row encodes the whole set; the rows are interleaved over --rounds rounds and the best
round is reported (the machine's noise only ever adds time). `computed/real` is the token
positions the encoder ran per real token. The scores of every row are printed: they must agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import BUNDLED, REPO, argv_value, quiet_libraries, set_thread_env, start_result, write_result

if __name__ == "__main__":
    set_thread_env(argv_value(sys.argv, "--threads"))  # before torch is imported

import torch  # noqa: E402

from simcse_dist.eval import encode as encode_module  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def computed_tokens(lengths: list[int], order: list[int], batch: int, pack_tokens: int | None) -> int:
    """Token positions the encoder runs: padded batches compute batch x longest; packed ones
    compute their rows (data/packing.py's first-fit decreasing) x row width."""
    from simcse_dist.data.packing import pack

    total = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        if not pack_tokens:
            total += max(chunk) * len(chunk)
            continue
        width = max(pack_tokens, max(chunk))
        ids = torch.zeros(len(chunk), 1, max(chunk), dtype=torch.long)
        mask = (torch.arange(max(chunk)) < torch.tensor(chunk)[:, None, None]).long()
        total += pack({"input_ids": ids, "attention_mask": mask}, width)["input_ids"].numel()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED)
    p.add_argument("--pooler", default="avg")
    p.add_argument("--task", default="stsb", help="an STS task of --data-dir (eval/sts.py TASKS)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--batch-size", type=int, default=128, help="simcse-eval's default")
    p.add_argument("--pack-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OMP threads (default: all cores)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    quiet_libraries()
    from simcse_dist.eval.metrics import sts_correlation
    from simcse_dist.eval.sts import load_task
    from simcse_dist.model.load import load_encoder

    result = start_result(args)
    data = load_task(args.task, args.split, Path(args.data_dir))
    encoder, tokenizer, _ = load_encoder(args.model, args.pooler)
    encoder.eval()
    unique = list(dict.fromkeys([*data.sentences1, *data.sentences2]))
    by_tokens = encode_module.token_lengths(tokenizer, unique, 512)
    by_chars = [len(s) for s in unique]
    rows = {  # name: (the order's key, pack_tokens)
        "by characters, padded (before)": (by_chars, None),
        "by tokens, padded": (by_tokens, None),
        f"by tokens, packed into rows of {args.pack_tokens}": (by_tokens, args.pack_tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    scores: dict[str, float] = {}
    real = sum(by_tokens)
    measured = encode_module.token_lengths
    for _ in range(args.rounds):
        for name, (key, pack_tokens) in rows.items():
            # the order is what differs between the rows: stand the key in for the token counts
            encode_module.token_lengths = lambda tok, sentences, *a, key=key, **k: key
            t0 = time.perf_counter()
            e1, e2 = encode_module.pair_embeddings(
                encoder,
                tokenizer,
                data.sentences1,
                data.sentences2,
                torch.device("cpu"),
                args.batch_size,
                max_length=512,
                pack_tokens=pack_tokens,
            )
            times[name].append(time.perf_counter() - t0)
            scores[name] = 100 * sts_correlation(e1, e2, data.scores)
    encode_module.token_lengths = measured
    base = min(times[next(iter(rows))])
    table = []
    for name, (key, pack_tokens) in rows.items():
        order = sorted(range(len(unique)), key=key.__getitem__, reverse=True)
        computed = computed_tokens(by_tokens, order, args.batch_size, pack_tokens)
        best = min(times[name])
        table.append(
            {
                "row": name,
                "best_s": round(best, 3),
                "times_s": [round(t, 3) for t in times[name]],
                "speedup": round(base / best, 3),
                "computed_over_real": round(computed / real, 3),
                "spearman": round(scores[name], 4),
            }
        )
        print(
            f"{name:40s} best {best:6.2f} s  x{base / best:.2f}  computed/real {computed / real:.2f}  "
            f"spearman {scores[name]:.2f}  ({', '.join(f'{t:.2f}' for t in times[name])})",
            flush=True,
        )
    result.update(sentences=len(unique), real_tokens=real, rows=table)
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
