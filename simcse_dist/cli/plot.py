"""simcse-plot-align-uniform RUN_DIR [--out PNG]: a run's alignment/uniformity trajectory (eval/plot.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from simcse_dist.cli.common import fail, start_logging
from simcse_dist.data.readers import DataError
from simcse_dist.eval.plot import plot_trajectory, read_trajectory

log = logging.getLogger("simcse_dist.cli.plot")  # not __name__: run as `python -m`, that is __main__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simcse-plot-align-uniform", description="Plot a run's alignment/uniformity trajectory (SimCSE Figure 2)."
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/align_uniform.png)")
    args = p.parse_args(argv)
    start_logging()
    run = Path(args.run_dir)
    try:
        points = read_trajectory(run / "metrics.jsonl")
    except DataError as e:
        return fail(str(e))
    out = plot_trajectory(points, args.out or run / "align_uniform.png", title=f"{run.name}: align vs uniform")
    log.info(f"{out}: {len(points)} evaluations, steps {points[0][0]}..{points[-1][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
