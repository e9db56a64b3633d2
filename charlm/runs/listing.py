"""Run directories: finding them, summarising them, and reading their metrics.

A run directory holds latest.ckpt, best.ckpt and metrics.jsonl (one JSON object per
evaluation, appended). `charlm runs` lists them and `charlm plot` draws their metrics
(charlm.runs.plot); neither needs more than the checkpoints' headers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints import schema as checkpoint_meta
from charlm.errors import CharlmError


@dataclass(frozen=True)
class RunSummary:
    """What `charlm runs` shows of one run directory. Every field but `path` and `latest` is
    None when the run has no readable checkpoint, and `problem` then says why; with a readable
    checkpoint, `problem` says what is damaged in the metrics, if anything."""

    path: str
    latest: bool
    corpus: str | None = None
    model: str | None = None
    steps: int | None = None
    best_val_loss: float | None = None
    best_val_bpc: float | None = None
    seconds: float | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in (ckpt.LATEST, ckpt.BEST, ckpt.METRICS))


def find_runs(root: str | os.PathLike = "runs") -> list[Path]:
    """`root` itself if it is a run directory, else the run directories directly under it,
    by name."""
    root = Path(root)
    if not root.is_dir():
        raise CharlmError(f"no directory {root}; train a run first or name the directory")
    if is_run(root):
        return [root]
    return sorted(path for path in root.iterdir() if path.is_dir() and is_run(path))


def latest_run() -> Path | None:
    """The working directory's most recent run (the one `sample` and `perplexity` default to),
    or None if none was recorded or it is gone."""
    record = Path(checkpoint_meta.default_kind().last_run_file)
    if not record.is_file():
        return None
    path = Path(record.read_text(encoding="utf-8").strip())
    return path if path.is_dir() else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _record(line: bytes) -> dict[str, Any]:
    """One evaluation's record from a line of a metrics file; ValueError says what is wrong."""
    record = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not an evaluation's record")
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} is {value}")
    if not isinstance(record.get("elapsed", 0.0), (int, float)):
        raise ValueError("elapsed is not a number")
    return record


def read_metrics(
    run_dir: str | os.PathLike, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """The evaluation records of a run, in order. A line that is not one (a record torn by a
    crash mid-write, bytes that are not UTF-8, a number that is not finite) is left out, and
    said in `problems` when a list is given. Raises CharlmError if there are none."""
    path = Path(run_dir) / ckpt.METRICS
    if not path.is_file():
        raise CharlmError(f"{run_dir} has no {ckpt.METRICS}; is it a charlm run directory?")
    records = []
    lines = path.read_bytes().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            records.append(_record(line))
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            # A last line cut short is a crash's torn record, not damage.
            if problems is not None and number < len(lines):
                problems.append(f"{ckpt.METRICS} line {number} is damaged ({err})")
    if not records:
        raise CharlmError(f"{path} holds no evaluation yet; wait for the first one")
    return records


def training_seconds(records: list[dict[str, Any]]) -> list[float]:
    """The wall time of each record since the run began. Each session's clock starts at zero
    (`elapsed` is per session), so a resumed session's times continue from the last record of
    the one before."""
    seconds, offset, previous = [], 0.0, 0.0
    for record in records:
        elapsed = float(record.get("elapsed", 0.0))
        if elapsed < previous:
            offset += previous
        previous = elapsed
        seconds.append(offset + elapsed)
    return seconds


def summarize(run_dir: Path, *, latest: bool = False) -> RunSummary:
    """The summary of one run from its latest checkpoint's header and its metrics."""
    try:
        meta = ckpt.read_meta(run_dir / ckpt.LATEST)
    except CharlmError as err:
        return RunSummary(str(run_dir), latest, problem=str(err))
    # Only a language model's loss is over characters; a tagger's is over labels.
    best = meta.get("best_val_loss")
    kind = checkpoint_meta.kind_of(meta)
    model = kind.configs[kind.shape](**meta[kind.shape])
    problems: list[str] = []
    try:
        seconds = training_seconds(read_metrics(run_dir, problems))[-1]
    except CharlmError:
        seconds = None
    return RunSummary(
        str(run_dir),
        latest,
        corpus=Path(meta["corpus"]["path"]).name,
        model=model.describe(),
        steps=meta["step"],
        best_val_loss=best,
        best_val_bpc=None if best is None else best / math.log(2),
        seconds=seconds,
        problem="; ".join(problems) or None,
    )
