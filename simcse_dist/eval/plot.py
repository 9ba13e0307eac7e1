"""The paper's Figure 2 for one run (simcse-plot-align-uniform RUN_DIR [--out PNG]).

Reads the `eval/align` and `eval/uniform` rows the trainer logs to RUN_DIR/metrics.jsonl
(alignment of STS-B dev pairs with gold > 4, uniformity of all dev sentences) and draws the
trajectory: x = uniformity, y = alignment, one point per evaluation, coloured by step and
joined in step order, the first and last points labelled. Lower-left is better on both axes.
matplotlib is imported only here, so training never pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from simcse_dist.data.readers import DataError


def read_trajectory(metrics_file: str | Path) -> list[tuple[int, float, float]]:
    """(step, uniformity, alignment) per row holding both, in step order; a row logged twice
    for the same step keeps the last one."""
    path = Path(metrics_file)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    points: dict[int, tuple[float, float]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(row, dict) or "eval/align" not in row or "eval/uniform" not in row:
            continue
        if "step" not in row:
            raise DataError(f"{path}:{n}: a row with eval/align has no 'step'")
        points[int(row["step"])] = (float(row["eval/uniform"]), float(row["eval/align"]))
    if not points:
        raise DataError(
            f"{path}: no rows with both eval/align and eval/uniform (the trainer logs them "
            "when eval.sts_dev_file is set)"
        )
    return [(step, u, a) for step, (u, a) in sorted(points.items())]


def plot_trajectory(points: list[tuple[int, float, float]], out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    steps = [p[0] for p in points]
    uniform = [p[1] for p in points]
    align = [p[2] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=150)
    ax.plot(uniform, align, color="0.7", linewidth=1, zorder=1)
    sc = ax.scatter(uniform, align, c=steps, cmap="viridis", s=36, zorder=2, edgecolors="black", linewidths=0.4)
    fig.colorbar(sc, ax=ax, label="training step")
    labelled = {0, len(points) - 1} | set(range(0, len(points), max(1, len(points) // 6)))
    for i in sorted(labelled):
        ax.annotate(str(steps[i]), (uniform[i], align[i]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel(r"$\ell_{\mathrm{uniform}}$ (lower is better)")
    ax.set_ylabel(r"$\ell_{\mathrm{align}}$ (lower is better)")
    ax.set_title(title or "alignment vs uniformity on STS-B dev", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
