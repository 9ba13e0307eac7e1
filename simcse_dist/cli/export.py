"""simcse-export: a Hugging Face + sentence-transformers model with a model card, from a run or a model."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from simcse_dist.cli.common import fail, start_logging
from simcse_dist.config import POOLER_ALIASES, POOLERS
from simcse_dist.model.encoder import quiet_transformers

log = logging.getLogger("simcse_dist.cli.export")  # not __name__: run as `python -m`, that is __main__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simcse-export",
        description="Write a Hugging Face + sentence-transformers model with a model card (README.md) from a run dir "
        "(its best/) or a model dir; optionally upload it to the Hugging Face Hub.",
    )
    p.add_argument("src", help="run dir, model dir, or any HF encoder dir (then --pooler)")
    p.add_argument("out_dir")
    p.add_argument(
        "--pooler", choices=[*POOLERS, *POOLER_ALIASES], help="override (or, for a plain HF model, set) the pooler"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    p.add_argument(
        "--adapter", action="store_true", help="a LoRA run: write its adapter alone (peft format), not the merged model"
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload out_dir to this Hub model repo (created if missing; token from `hf auth login` or HF_TOKEN)",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    start_logging()
    import yaml

    from simcse_dist.model.card import best_info_scores, push_to_hub, write_model_card
    from simcse_dist.model.export import export_model
    from simcse_dist.model.format import SIMCSE_CONFIG_NAME, ExportError
    from simcse_dist.model.load import resolve_model_dir

    try:
        with quiet_transformers():
            out = export_model(args.src, args.out_dir, args.pooler, args.overwrite, args.adapter)
        # the card reads the run's config.yaml (next to best/) and best_info.json when they exist
        model_dir = resolve_model_dir(args.src)
        configs = [model_dir / "config.yaml"] + ([model_dir.parent / "config.yaml"] if model_dir.name == "best" else [])
        config = next((yaml.safe_load(c.read_text()) for c in configs if c.is_file()), None)
        info_file = model_dir / "best_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except (ExportError, OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        return fail(str(e))
    scores, note = best_info_scores(info)
    write_model_card(
        out,
        config=config if isinstance(config, dict) else None,
        scores=scores,
        split_note=note,
        model_id=args.push_to_hub,
    )
    meta = json.loads((out / SIMCSE_CONFIG_NAME).read_text())
    log.info(
        f"exported {out}: pooler {meta['pooler']}, MLP {'kept' if meta['mlp'] else 'not used at test time'}, "
        f"model card README.md; load with SentenceTransformer({str(out)!r}) or AutoModel (see docs/evaluation.md)"
    )
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as e:  # network, auth, repo name: one line, the export itself is done
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return fail(
                f"--push-to-hub {args.push_to_hub}: upload failed ({type(e).__name__}: {reason}); "
                f"the exported model is in {out}"
            )
        log.info(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
