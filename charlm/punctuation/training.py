"""The punctuation tagger as a kind of model of the run skeleton (`charlm.training.loop`), and
`train_tagger`, which `charlm punctuate train` runs.

What is the tagger's own: its data, random windows of the stripped text
(`charlm.punctuation.tagger.window_batch`), placed by (seed, step) alone, so that its state is
only parameters, optimizer state and step and a resumed run continues bit for bit; its
evaluation, which tags the held-out split as `charlm punctuate` tags a text and reports the
sentence-break F1 beside the loss, and by which its best checkpoint is chosen; and a start
from a language model's first layer (`--init-from`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints.file_format import Checkpoint
from charlm.data.corpus import Corpus
from charlm.data.text import Vocabulary, code_points
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.lm.checkpoint import load_model
from charlm.punctuation import model as tagger
from charlm.punctuation.checkpoint import TAGGER
from charlm.punctuation.config import TaggerTrainConfig
from charlm.punctuation.marks import MarkSet
from charlm.punctuation.scores import score_labels
from charlm.punctuation.tagger import (
    TaggingData,
    load_tagging_data,
    log_softmax,
    steps_per_epoch,
    tag_logits,
    window_batch,
)
from charlm.training.loop import Evaluation, TrainResult, train_run
from charlm.training.run_setup import RunKind, Session, open_run

# Dropout's keys come from the run's seed folded with this, apart from the initialisation's.
DROPOUT_STREAM = 1


def load_data(
    corpus: str, config: TaggerTrainConfig, loaded: Checkpoint | None, progress: bool, log: Any
) -> tuple[TaggingData, Corpus]:
    """The tagger's data of the corpus; a resumed run's with its checkpoint's label set and
    vocabulary."""
    data = load_tagging_data(
        corpus,
        encoding=config.encoding,
        val_fraction=config.val_fraction,
        max_labels=config.max_labels,
        marks=MarkSet.from_dict(loaded.meta["marks"]) if loaded else None,
        vocab=Vocabulary(loaded.meta["vocab"]) if loaded else None,
        progress=progress,
        log=log,
    )
    return data, data.corpus


RUN_KIND = RunKind(TAGGER, TaggerTrainConfig, "charlm punctuate train", "-punctuate", load_data)


def initialised_from(
    params: tagger.Params, config: tagger.TaggerConfig, vocab: Vocabulary, checkpoint: str
) -> tuple[tagger.Params, str]:
    """`params` with the forward direction's first layer and the embedding rows of the
    characters the two vocabularies share taken from the language model of `checkpoint`
    (a language model as the pretraining of a recurrent network, Dai & Le 2015, "Semi-supervised
    Sequence Learning"); and a note saying how many rows were. Refused in one line when the cell or the
    sizes differ."""
    lm_params, lm_config, lm_vocab = load_model(ckpt.load(ckpt.resolve(checkpoint)))
    ours = (config.cell, config.hidden_size, config.embed_size)
    theirs = (lm_config.cell, lm_config.hidden_size, lm_config.embed_size)
    if ours != theirs:
        raise CharlmError(
            f"--init-from {checkpoint} is a {lm_config.cell} of hidden size "
            f"{lm_config.hidden_size} and embedding size {lm_config.embed_size}; the tagger "
            f"is a {config.cell} of {config.hidden_size} and {config.embed_size}: give it the "
            "same --cell, --hidden-size and --embed-size"
        )
    table = code_points(lm_vocab.chars)
    points = code_points(vocab.chars)
    index = np.minimum(np.searchsorted(table, points), len(table) - 1)
    shared = table[index] == points
    embed = np.array(params["embed"])
    embed[shared] = lm_params["embed"][index[shared]]
    layers = list(params["layers"])
    layers[0] = {**layers[0], "forward": dict(lm_params["layers"][0])}
    note = (
        f"initialised the forward direction's first layer and {int(shared.sum()):,} of "
        f"{len(vocab):,} embedding rows from {checkpoint}"
    )
    return {**params, "embed": jnp.asarray(embed), "layers": layers}, note


def make_step(
    config: tagger.TaggerConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
    parallel: DataParallel | None = None,
):
    """The compiled step: (state, tokens, labels, lr) -> (state, loss), as
    `charlm.lm.step.make_train_step` for a language model; the state's buffers are donated. Its
    dropout masks are drawn from `seed` and the step number, so a resumed run draws the same.
    With `parallel`, the new state keeps the shardings it names (replicated)."""
    dropout_key = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)

    @partial(jax.jit, donate_argnums=0)
    def step(state, tokens, labels, lr):
        key = jax.random.fold_in(dropout_key, state["step"])
        masks = tagger.training_masks(key, config, tokens.shape[0])
        loss, grads = jax.value_and_grad(tagger.loss)(
            state["params"], tokens, labels, config, masks=masks
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if parallel is not None:
            new_state = parallel.constrain(new_state)
        return new_state, loss

    return step


def evaluate(
    params: tagger.Params, config: tagger.TaggerConfig, data: TaggingData, window: int
) -> tuple[float, float]:
    """The held-out split's mean cross-entropy in nats per character and its break F1, tagged
    as `charlm punctuate` tags a text."""
    logits = tag_logits(params, config, data.val_tokens, window)
    nats = -log_softmax(logits)[np.arange(len(logits)), data.val_labels]
    breaks, _ = score_labels(data.val_labels, logits.argmax(axis=-1), data.marks.label_strings)
    return float(nats.mean()), breaks.f1


class TaggerRun:
    """The tagger's parts of a run (`charlm.training.loop.ModelRun`)."""

    # The best tagger is the one that breaks sentences best: its held-out loss rises long
    # before its F1 stops rising, as it grows confident where it is wrong.
    best_field = "best_val_break_f1"
    higher_is_better = True

    def __init__(self, session: Session, parallel: DataParallel):
        config, data = session.config, session.data
        self.config, self.data, self.resuming = config, data, session.loaded is not None
        self.model_config = config.tagger_config(len(data.vocab), data.marks.num_labels)
        self.steps_per_epoch = steps_per_epoch(
            len(data.train_tokens), config.batch_size, config.seq_len
        )
        self.chars_per_step = config.batch_size * config.seq_len
        self.classes = data.marks.num_labels
        self.scores: dict[str, Any] = {"val_break_f1": None}
        self.notes: list[str] = []

    def describe(self, parameters: int) -> str:
        labels = self.data.marks.num_labels
        return f"tagger {self.model_config.describe()} ({parameters:,} parameters, {labels} labels)"

    def data_summary(self) -> str:
        data = self.data
        return (
            f"{len(data.train_tokens):,} characters, {len(data.val_tokens):,} held out "
            f"(marks removed), vocabulary {len(data.vocab):,}"
        )

    def init_state(self, optimizer: optax.GradientTransformation) -> dict[str, Any]:
        config = self.config
        params = tagger.init(jax.random.key(config.seed), self.model_config)
        if config.init_from is not None and not self.resuming:
            params, note = initialised_from(
                params, self.model_config, self.data.vocab, config.init_from
            )
            self.notes.append(note)
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    def make_step(self, optimizer: optax.GradientTransformation, parallel: DataParallel) -> Any:
        return make_step(self.model_config, optimizer, self.config.seed, parallel)

    def batch(self, step: int, rows: slice) -> tuple[tuple[np.ndarray, ...], tuple[Any, ...]]:
        config, data = self.config, self.data
        tokens, labels = window_batch(
            data.train_tokens,
            data.train_labels,
            config.batch_size,
            config.seq_len,
            config.seed,
            step,
        )
        return (tokens[rows], labels[rows]), ()

    def evaluate(self, params: tagger.Params) -> Evaluation | None:
        if not len(self.data.val_tokens):
            return None
        loss, f1 = evaluate(params, self.model_config, self.data, self.config.seq_len)
        return Evaluation(
            loss,
            f1,
            f"{loss:.4f}, break F1 {f1:.3f}",
            record={"val_break_f1": f1},
            meta={"val_break_f1": f1},
        )

    def probe_loss(self, arrays: dict[str, Any], step: int) -> float | None:
        return None

    def metadata(self, step: int) -> dict[str, Any]:
        return {
            "kind": TAGGER,
            "tagger": self.model_config.to_dict(),
            "marks": self.data.marks.to_dict(),
            "vocab": self.data.vocab.chars,
        }


def train_tagger(
    corpus: str | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    devices: int | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a punctuation tagger on the punctuated text `corpus` (a file or a catalog name),
    or continue a run with `resume=True`. Options are the fields of TaggerTrainConfig; the run
    directory defaults to runs/<corpus name>-punctuate; `devices` is how many local devices
    share each batch (default: all). Raises CharlmError for bad input (a text without marks
    among them) and TrainingDiverged when the loss goes bad."""
    started = time.monotonic()
    session = open_run(RUN_KIND, corpus, None, run_dir, resume, overrides, progress)
    return train_run(session, partial(TaggerRun, session), devices, progress, started)
