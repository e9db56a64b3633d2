"""Loss curves of one run or several on one figure, drawn with matplotlib's Agg backend (no
display needed). Imported only by `charlm plot`: matplotlib takes a second to import."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from charlm.errors import CharlmError
from charlm.runs.listing import read_metrics, training_seconds
from charlm.storage import write_atomic

X_AXES = ("step", "time")


def _nats_to_bits(nats: Any) -> Any:
    return np.asarray(nats) / math.log(2)


def _bits_to_nats(bits: Any) -> Any:
    return np.asarray(bits) * math.log(2)


def _series(records: list[dict], key: str, xs: list[float]) -> tuple[list[float], list[float]]:
    pairs = [(x, r[key]) for x, r in zip(xs, records) if r.get(key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_runs(
    runs: list[Path], output: str | os.PathLike, *, x: str = "step", title: str | None = None
) -> Path:
    """Draw the training and validation loss (nats per character, with bits per character on
    the right-hand axis) of each run against its steps or its wall time in minutes, and write
    the figure to `output` (PNG, SVG or PDF, by its suffix). Returns the path written."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    output = Path(output)
    kind = output.suffix.lstrip(".").lower() or "png"
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if kind not in formats:
        raise CharlmError(
            f"cannot write a .{kind} picture; give -o a name ending in .png, .svg or .pdf"
        )
    figure, axes = plt.subplots(figsize=(8, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        records = read_metrics(run)
        xs = (
            [float(r["step"]) for r in records]
            if x == "step"
            else [s / 60 for s in training_seconds(records)]
        )
        colour = colours[index % len(colours)]
        name = run.name if len(runs) > 1 else "validation"
        axes.plot(*_series(records, "train_loss", xs), color=colour, alpha=0.45, linestyle="--")
        axes.plot(*_series(records, "val_loss", xs), color=colour, marker=".", label=name)
    axes.plot([], [], color="grey", linestyle="--", alpha=0.6, label="training (dashed)")
    axes.set_xlabel("step" if x == "step" else "wall time (minutes)")
    axes.set_ylabel("loss (nats per character)")
    bits = axes.secondary_yaxis("right", functions=(_nats_to_bits, _bits_to_nats))
    bits.set_ylabel("bits per character")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title or ", ".join(run.name for run in runs))
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = io.BytesIO()
    try:
        # Text stays text in an SVG (searchable and editable), not outlines.
        with plt.rc_context({"svg.fonttype": "none"}):
            figure.savefig(picture, format=kind)
    finally:
        plt.close(figure)
    write_atomic(output, picture.getvalue())
    return output
