"""A punctuation tagger's data and its use: the corpus as characters and labels, the training
windows, tagging a text of any length, and a tagger loaded from its checkpoint.

Training reads windows of `seq_len` characters at random places of the stripped training text;
where they fall is a pure function of (seed, step), so a resumed run reads the windows an
uninterrupted one would, with no loader state in the checkpoint. Tagging reads a long text in
windows that overlap by half, and takes each position's label from the window in which it is
most central: every label is made with at least a quarter window of context on both sides
(except at the text's ends), wherever the windows fall.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints import schema as checkpoint_meta
from charlm.data.corpus import Corpus, held_out_corpus, load_corpus
from charlm.data.text import Vocabulary, code_points, read_text
from charlm.errors import CharlmError
from charlm.punctuation import model as tagger
from charlm.punctuation.checkpoint import TAGGER
from charlm.punctuation.config import TaggerTrainConfig
from charlm.punctuation.marks import MarkSet, strip_and_label
from charlm.punctuation.scores import PunctuationScores, score_labels

# Windows tagged per compiled call.
WINDOWS_PER_CALL = 32


@dataclass(frozen=True)
class TaggingData:
    """A punctuated corpus made into a tagger's data. `corpus` is the text as a language model
    reads it, marks included, whose provenance and split the checkpoint records; the held-out
    split is its last `val_fraction` of characters, cut before the marks are removed."""

    corpus: Corpus
    vocab: Vocabulary
    marks: MarkSet
    train_tokens: np.ndarray
    train_labels: np.ndarray
    val_tokens: np.ndarray
    val_labels: np.ndarray


def corpus_text(corpus: Corpus) -> str:
    """The text of a loaded corpus, from its tokens."""
    return (
        code_points(corpus.vocab.chars)[corpus.tokens]
        .astype("<u4")
        .tobytes()
        .decode("utf-32-le", "surrogatepass")
    )


def load_tagging_data(
    path: str | os.PathLike,
    *,
    encoding: str | None = None,
    val_fraction: float = 0.1,
    max_labels: int = 32,
    marks: MarkSet | None = None,
    vocab: Vocabulary | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> TaggingData:
    """The tagger's data of the text at `path`: its label set (the `max_labels` commonest runs
    of marks of the whole text, or `marks`) and vocabulary (the whole stripped text's, or
    `vocab`, as when resuming). Raises CharlmError for a text without marks."""
    corpus = load_corpus(
        path, encoding=encoding, val_fraction=val_fraction, progress=progress, log=log
    )
    text = corpus_text(corpus)
    marks = marks or MarkSet.from_text(text, max_labels, source=str(path))
    train_text, train_labels = strip_and_label(text[: corpus.split_index], marks)
    val_text, val_labels = strip_and_label(text[corpus.split_index :], marks)
    vocab = vocab or Vocabulary.from_text(train_text + val_text)
    return TaggingData(
        corpus,
        vocab,
        marks,
        vocab.encode(train_text),
        train_labels,
        vocab.encode(val_text),
        val_labels,
    )


def steps_per_epoch(characters: int, batch_size: int, seq_len: int) -> int:
    """Steps that read as many characters as the training text has (at least 1)."""
    if characters < seq_len:
        raise CharlmError(
            f"the training text has {characters:,} characters without its marks, fewer than "
            f"one window of {seq_len}; use a smaller --seq-len or a longer text"
        )
    return max(characters // (batch_size * seq_len), 1)


def window_batch(
    tokens: np.ndarray, labels: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of `step`: `batch_size` windows of `seq_len` characters, tokens and
    labels (batch, seq_len) int32, at places drawn from a generator seeded with (seed, step)."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - seq_len + 1, batch_size)
    index = starts[:, None] + np.arange(seq_len)
    return tokens[index].astype(np.int32), labels[index].astype(np.int32)


def window_plan(length: int, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How a text of `length` characters is read in windows of `window` that overlap by half:
    the windows' starts, and for each position the window it is labelled from (the one in
    which it is most central: the middle half of each window, the first's first quarter and
    the last's end as well) and its offset there."""
    margin, stride = window // 4, _stride(window)
    count = 1 if length <= window else -(-(length - window) // stride) + 1
    starts = np.arange(count) * stride
    position = np.arange(length)
    owner = np.clip((position - margin) // stride, 0, count - 1)
    return starts, owner, position - starts[owner]


def _stride(window: int) -> int:
    """How far apart windows start: by the middle half of a window."""
    return window - 2 * (window // 4)


def tag_logits(
    params: tagger.Params, config: tagger.TaggerConfig, tokens: np.ndarray, window: int
) -> np.ndarray:
    """The logits (length, num_labels) float32 of every position of `tokens`, each from the
    window of `window_plan` in which it is most central."""
    if len(tokens) == 0:
        return np.zeros((0, config.num_labels), np.float32)
    starts, owner, offset = window_plan(len(tokens), window)
    per_call = min(len(starts), WINDOWS_PER_CALL)
    calls = -(-len(starts) // per_call)
    # Windows past the text's end (the last one's tail, and whole ones that round the count
    # up to a multiple of per_call) read padding, which `lengths` keeps out of the backward
    # direction of the positions that count.
    padded = np.zeros(calls * per_call * window + window, np.int32)
    padded[: len(tokens)] = tokens
    all_starts = np.arange(calls * per_call) * _stride(window)
    lengths = np.clip(len(tokens) - all_starts, 1, window).astype(np.int32)
    windows = padded[all_starts[:, None] + np.arange(window)]
    apply = _compiled_apply(config)
    logits = np.concatenate(
        [
            np.asarray(apply(params, windows[n : n + per_call], lengths[n : n + per_call]))
            for n in range(0, calls * per_call, per_call)
        ]
    )
    return logits[owner, offset].astype(np.float32)


@functools.cache
def _compiled_apply(config: tagger.TaggerConfig) -> Callable[..., jax.Array]:
    """The compiled `tagger.apply` of a shape, kept: evaluation tags the held-out text again
    and again."""
    return jax.jit(lambda params, tokens, lengths: tagger.apply(params, tokens, config, lengths))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Tagger:
    """A tagger loaded from its checkpoint: parameters, shape, vocabulary, label set, and the
    window it was trained on."""

    params: tagger.Params
    config: tagger.TaggerConfig
    vocab: Vocabulary
    marks: MarkSet
    window: int
    meta: dict[str, Any]

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None) -> Tagger:
        """The tagger of `checkpoint`: a file, a run directory, or None for the working
        directory's latest tagger run. Refuses a language model's checkpoint in one line."""
        loaded = ckpt.load(ckpt.resolve(checkpoint, TAGGER))
        kind = checkpoint_meta.kind_of(loaded.meta)
        if kind.name != TAGGER:
            raise CharlmError(
                f"{loaded.path} is {kind.what}, not a punctuation tagger; train one with "
                "charlm punctuate train CORPUS"
            )
        config = tagger.TaggerConfig.from_dict(loaded.meta["tagger"])
        template = jax.eval_shape(lambda key: tagger.init(key, config), jax.random.key(0))
        return cls(
            loaded.tree("params", template),
            config,
            Vocabulary(loaded.meta["vocab"]),
            MarkSet.from_dict(loaded.meta["marks"]),
            TaggerTrainConfig(**loaded.meta["train"]).seq_len,
            loaded.meta,
        )

    def labels(self, text: str) -> tuple[np.ndarray, dict[str, int]]:
        """A label per character of `text` (0 for characters outside the vocabulary, which the
        tagger does not read), and the count of those characters."""
        tokens, unknown = self.vocab.encode_known(text)
        known = np.isin(code_points(text), code_points(self.vocab.chars))
        labels = np.zeros(len(text), np.int32)
        logits = tag_logits(self.params, self.config, tokens, self.window)
        labels[known] = logits.argmax(axis=-1)
        return labels, unknown


def score_tagger(
    checkpoint: str | os.PathLike | None = None,
    text_file: str | os.PathLike | None = None,
    *,
    encoding: str | None = None,
) -> PunctuationScores:
    """Score a tagger on a punctuated `text_file`, or on its own run's held-out split when
    that is None (the corpus must be there, unchanged, as for `charlm perplexity`)."""
    model = Tagger.load(checkpoint)
    if text_file is None:
        corpus = model.meta["corpus"]
        path = held_out_corpus(corpus, "charlm punctuate score FILE")
        text = corpus_text(load_corpus(path, encoding=corpus["encoding"]))
        text = text[corpus["split_index"] :]
        source = f"{path} (held-out last {corpus['val_fraction']:g})"
    else:
        text, source = read_text(text_file, encoding), str(text_file)
    stripped, gold = strip_and_label(text, model.marks)
    if not gold.any():
        raise CharlmError(f"{source} has no punctuation marks of the tagger's: nothing to score")
    predicted, unknown = model.labels(stripped)
    breaks, marks = score_labels(gold, predicted, model.marks.label_strings)
    return PunctuationScores(source, len(stripped), breaks, marks, unknown)
