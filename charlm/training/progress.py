"""What a training run shows and records: the progress bar with its log lines, the losses of
recent steps (kept on the device until they are needed), and the metrics file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from charlm.checkpoints import file_format as ckpt


def show_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


class RecentLosses:
    """The training losses of the steps since the last fetch. They stay on the device until
    `fetch`, the loop's only host synchronisation besides evaluation, which also measures the
    speed of those steps."""

    def __init__(self, chars_per_step: int):
        self.chars_per_step = chars_per_step
        self.pending: list[jax.Array] = []
        self.mean: float | None = None
        self.chars_per_sec = 0.0
        self.since = time.monotonic()

    def add(self, loss: jax.Array) -> None:
        self.pending.append(loss)

    def fetch(self) -> np.ndarray:
        """The pending losses, oldest first (empty when there are none); their mean becomes
        `mean`, and their steps' speed `chars_per_sec`."""
        if not self.pending:
            return np.zeros(0)
        losses = np.asarray(jax.device_get(self.pending), np.float64)
        now = time.monotonic()
        self.chars_per_sec = len(losses) * self.chars_per_step / (now - self.since)
        self.mean = float(losses.mean())
        self.pending = []
        self.since = now
        return losses

    def restart_clock(self) -> None:
        """Leave out of the speed what happened since the last step (an evaluation)."""
        self.since = time.monotonic()


class Progress:
    """The progress bar on stderr, and log lines written above it; silent when not `enabled`."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.enabled = enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def advance(self) -> None:
        self.bar.update(1)

    def set_total(self, total: int) -> None:
        self.bar.total = total

    def show(self, train_loss: float | None, chars_per_sec: float, val_loss: float | None) -> None:
        postfix = {"loss": show_loss(train_loss), "chars/s": f"{chars_per_sec:,.0f}"}
        if val_loss is not None:
            postfix["val"] = show_loss(val_loss)
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


def append_metrics(run_path: Path, record: dict[str, Any]) -> None:
    """Add one evaluation's record to the run's metrics file (JSON lines)."""
    with open(run_path / ckpt.METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
