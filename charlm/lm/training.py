"""The language model as a kind of model of the run skeleton (`charlm.training.loop`), and
`train`, which `charlm train` and `charlm.train` run.

What is the language model's own: contiguous streams of the corpus read window after window
(`BatchStream`), with the hidden state carried from each step to the next and kept in the
checkpoint; the held-out loss with its baselines (`charlm.lm.evaluation.Validation`); and a
forward pass on the next batch that vouches for the parameters before they are saved.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from charlm.checkpoints.file_format import Checkpoint
from charlm.data.corpus import BatchStream, Corpus, load_corpus
from charlm.data.text import Vocabulary
from charlm.devices.data_parallel import DataParallel
from charlm.lm import model
from charlm.lm.checkpoint import LANGUAGE_MODEL
from charlm.lm.config import TrainConfig
from charlm.lm.evaluation import Validation
from charlm.lm.step import init_state, make_train_step, sequence_loss
from charlm.training.loop import Evaluation, TrainResult, train_run
from charlm.training.run_setup import RunKind, Session, open_run


def load_data(
    corpus: str, config: TrainConfig, loaded: Checkpoint | None, progress: bool, log: Any
) -> tuple[Corpus, Corpus]:
    """The corpus's tokens; a resumed run's in the vocabulary of its checkpoint."""
    data = load_corpus(
        corpus,
        encoding=config.encoding,
        val_fraction=config.val_fraction,
        vocab=Vocabulary(loaded.meta["vocab"]) if loaded else None,
        progress=progress,
        log=log,
    )
    return data, data


RUN_KIND = RunKind(LANGUAGE_MODEL, TrainConfig, "charlm train", "", load_data)


class LanguageModelRun:
    """The language model's parts of a run (`charlm.training.loop.ModelRun`)."""

    best_field = "best_val_loss"
    higher_is_better = False

    def __init__(self, session: Session, parallel: DataParallel):
        config, data = session.config, session.data
        self.config, self.data = config, data
        self.stream = BatchStream(data.train_tokens, config.batch_size, config.seq_len)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.chars_per_step = config.batch_size * config.seq_len
        self.classes = len(data.vocab)
        self.model_config = config.model_config(len(data.vocab))
        self.validation = Validation(
            data.train_tokens, data.val_tokens, len(data.vocab), config.val_max_chars
        )
        self.scores: dict[str, Any] = {}
        self.notes: list[str] = []
        self._probe = jax.jit(partial(sequence_loss, config=self.model_config))

    def describe(self, parameters: int) -> str:
        return f"{self.model_config.describe()} ({parameters:,} parameters)"

    def data_summary(self) -> str:
        data = self.data
        return (
            f"{len(data.train_tokens):,} characters, {len(data.val_tokens):,} held out, "
            f"vocabulary {len(data.vocab):,}"
        )

    def init_state(self, optimizer: optax.GradientTransformation) -> dict[str, Any]:
        return init_state(self.model_config, optimizer, self.config.batch_size, self.config.seed)

    def make_step(self, optimizer: optax.GradientTransformation, parallel: DataParallel) -> Any:
        return make_train_step(self.model_config, optimizer, parallel)

    def batch(self, step: int, rows: slice) -> tuple[tuple[np.ndarray, ...], tuple[Any, ...]]:
        inputs, targets, reset = self.stream.batch(step, rows)
        return (inputs, targets), (reset,)

    def evaluate(self, params: model.Params) -> Evaluation | None:
        loss = self.validation.loss(params, self.model_config)
        if loss is None:
            return None
        bits = loss / math.log(2)
        baselines = self.validation.baselines
        summary = f"{loss:.4f} ({bits:.3f} bits/char{'; ' + baselines if baselines else ''})"
        return Evaluation(loss, loss, summary, record={"val_bpc": bits})

    def probe_loss(self, arrays: dict[str, Any], step: int) -> float | None:
        inputs, targets, reset = self.stream.batch(step)
        carry = arrays["carry"]
        if reset:
            carry = model.initial_state(self.model_config, self.config.batch_size)
        return float(self._probe(arrays["params"], inputs, targets, carry)[0])

    def metadata(self, step: int) -> dict[str, Any]:
        steps_per_epoch = self.steps_per_epoch
        return {
            "model": self.model_config.to_dict(),
            "vocab": self.data.vocab.chars,
            "data_position": {
                "steps_per_epoch": steps_per_epoch,
                "stream_offset": (step % steps_per_epoch) * self.config.seq_len,
            },
        }


def train(
    corpus: str | None = None,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    devices: int | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a model on `corpus` (a text file, or the name of a catalog corpus, fetched if it
    is not here yet), or continue a run with `resume=True`.

    Options are the fields of TrainConfig, given as `config` or as keyword overrides. A new run
    goes to `run_dir` (default runs/<corpus name>, numbered if taken); `resume` continues the
    run in `run_dir`, or the working directory's latest run, from its latest checkpoint.
    `devices` is how many local devices share each batch (default: all of them); a run may
    resume on another number. Raises CharlmError for bad input and TrainingDiverged when the
    loss goes bad.
    """
    started = time.monotonic()
    session = open_run(RUN_KIND, corpus, config, run_dir, resume, overrides, progress)
    return train_run(session, partial(LanguageModelRun, session), devices, progress, started)
