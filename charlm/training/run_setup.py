"""Opening a run of any model kind: a new one, or the run that `--resume` continues.

Opening settles what the loop needs before its first step: the run's options (a resumed run
keeps its own, apart from those that `RESUMABLE` lets change), the corpus (checked to be the
text the run was trained on), the run directory, the checkpoint to continue from, and the
precision that `--precision auto` chooses on this machine. What a kind of model trains on is
the kind's own: it gives a `RunKind`, whose `load_data` reads the corpus its way.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax

from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints import schema as checkpoint_meta
from charlm.data.catalog import resolve_corpus
from charlm.data.corpus import Corpus
from charlm.devices import hardware
from charlm.errors import CharlmError
from charlm.training.config import LENGTH, RESUMABLE, RunConfig, option_name

Config = TypeVar("Config", bound=RunConfig)


@dataclass(frozen=True)
class RunKind:
    """How a kind of model opens a run: its checkpoints' kind (`charlm.checkpoints.schema`),
    its options' class, the command that trains it, the suffix of its default run directory,
    and `load_data(path, config, loaded, progress, log)`, which reads the corpus at `path`
    for a run of `config` (resuming `loaded`, or None) and returns the kind's data and the
    corpus (`Corpus`) whose provenance the checkpoints record."""

    name: str
    config_class: type
    command: str
    run_dir_suffix: str
    load_data: Callable[..., tuple[Any, Corpus]]


@dataclass(frozen=True)
class Session:
    """What a training session works on: the options, the kind's data and its corpus, the run
    directory, the checkpoint it resumes or None, and `precision_note`, which says which
    precision trains and, for `auto`, why."""

    kind: RunKind
    config: Any
    data: Any
    corpus: Corpus
    run_path: Path
    loaded: ckpt.Checkpoint | None
    precision_note: str


def resolve_precision(config: Config) -> tuple[Config, str]:
    """`config` (a run's options, with a `precision`) with `--precision auto` resolved for this
    machine's first device, and the note that says which precision trains and why."""
    if config.precision != "auto":
        return config, f"in {config.precision}"
    precision, why = hardware.auto_precision(jax.devices()[0])
    return dataclasses.replace(config, precision=precision), f"in {precision} (auto: {why})"


def _notes(progress: bool) -> Callable[[str], None]:
    """Where a session's notes go: stderr, unless the run is quiet."""
    if progress:
        return lambda message: print(message, file=sys.stderr)
    return lambda message: None


def _choose_run_dir(corpus_path: str, run_dir: str | Path | None, suffix: str = "") -> Path:
    """`run_dir`, refused if it holds a run, or runs/<corpus name><suffix>, numbered if taken."""
    if run_dir is not None:
        path = Path(run_dir)
        if (path / ckpt.LATEST).exists():
            raise CharlmError(
                f"{path} already holds a run; continue it with --resume or choose another --run-dir"
            )
    else:
        base = Path("runs") / ((Path(corpus_path).stem or "corpus") + suffix)
        path, n = base, 2
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _resume_config(saved: Config, overrides: dict[str, Any]) -> Config:
    """The options of a resumed run: `saved`, the checkpoint's, with the `overrides` that
    `RESUMABLE` allows; any other that differs is refused in one line."""
    if overrides.get("precision") == "auto":
        overrides = {name: value for name, value in overrides.items() if name != "precision"}
    for name, value in overrides.items():
        if name not in RESUMABLE and getattr(saved, name) != value:
            raise CharlmError(
                f"{option_name(name)} cannot change when resuming (the run has "
                f"{getattr(saved, name)!r}); start a new run to change it"
            )
    if any(name in overrides for name in LENGTH):
        cleared: dict[str, Any] = dict.fromkeys(LENGTH)
        saved = dataclasses.replace(saved, **cleared)
    return dataclasses.replace(saved, **overrides)


def load_run(run_dir: str | Path | None, kind: str) -> tuple[Path, ckpt.Checkpoint]:
    """The run directory that `run_dir` names (None: the latest run of `kind` here) and its
    latest checkpoint, to resume; a run of another kind is refused in one line that says how
    to resume it."""
    run_path = ckpt.resolve(run_dir, kind).parent
    loaded = ckpt.load(run_path / ckpt.LATEST)
    found = checkpoint_meta.kind_of(loaded.meta)
    if found.name != kind:
        command = found.train_command.removesuffix(" FILE")
        raise CharlmError(
            f"{run_path} is {found.what}'s run; resume it with {command} --resume "
            f"--run-dir {run_path}"
        )
    return run_path, loaded


def check_same_text(corpus: str, sha256: str, loaded: ckpt.Checkpoint) -> None:
    """Refuse to resume a run on a text (`corpus`, whose hash is `sha256`) other than its own."""
    if sha256 != loaded.meta["corpus"]["sha256"]:
        raise CharlmError(
            f"{corpus} is not the text this run was trained on (sha256 differs); "
            "resume with the original file or start a new run"
        )


def corpus_meta(corpus: Corpus, encoding: str | None) -> dict[str, Any]:
    return {
        "path": str(Path(corpus.path).resolve()),
        "sha256": corpus.sha256,
        "encoding": encoding,
        "characters": len(corpus.tokens),
        "val_fraction": corpus.val_fraction,
        "split_index": corpus.split_index,
    }


def open_run(
    kind: RunKind,
    corpus: str | None,
    config: Any,
    run_dir: str | Path | None,
    resume: bool,
    overrides: dict[str, Any],
    progress: bool,
) -> Session:
    """Open a new run of `kind` on `corpus` (a file or a catalog name) with `config` and the
    `overrides` of its fields, or with `resume` the run in `run_dir` (or the latest run of
    the kind here), whose corpus must be unchanged."""
    if corpus is not None:
        corpus = resolve_corpus(corpus, progress=progress)
    loaded = None
    if resume:
        if config is not None:
            overrides = {**dataclasses.asdict(config), **overrides}
        run_path, loaded = load_run(run_dir, kind.name)
        config = _resume_config(kind.config_class(**loaded.meta["train"]), overrides)
        corpus = corpus or loaded.meta["corpus"]["path"]
    else:
        if corpus is None:
            raise CharlmError(f"give a text file to train on: {kind.command} FILE")
        config = dataclasses.replace(config or kind.config_class(), **overrides)
    config.validate()
    data, text = kind.load_data(corpus, config, loaded, progress, _notes(progress))
    if loaded is not None:
        check_same_text(corpus, text.sha256, loaded)
    else:
        run_path = _choose_run_dir(text.path, run_dir, kind.run_dir_suffix)
    config, note = resolve_precision(config)
    return Session(kind, config, data, text, run_path, loaded, note)
