"""Held-out loss, bits per character and perplexity.

A text is evaluated as one stream: the hidden state is carried from the first character to the
last, and each character after the first is predicted from all the characters before it. The
stream is cut into fixed-size chunks only to bound memory, so the result does not depend on the
chunk size. Characters outside the vocabulary are removed before evaluation (the model reads and
predicts the text without them) and reported with their counts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charlm import checkpoint as ckpt
from charlm import model
from charlm.corpus import read_text, sha256_file
from charlm.dynamic import DynamicEvaluation, DynamicScore, dynamic_nats
from charlm.errors import CharlmError

DEFAULT_CHUNK = 1024


@partial(jax.jit, static_argnames="config")
def _chunk_nats(
    params: model.Params,
    state: model.State,
    inputs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    config: model.ModelConfig,
) -> tuple[model.State, jax.Array]:
    """The state after time-major (time, streams) inputs, and the masked sum of their nats."""
    logits, state = model.forward(params, inputs, state, config)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return state, jnp.sum(jnp.where(mask, nats, 0.0))


def _stream_windows(count: int, streams: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """For `streams` side by side: the prediction index each reads at each time (streams,
    length) and whether that prediction is scored. Stream k reads from k·L, L = the scored
    length of a stream; it scores all it reads if k = 0 and otherwise all but its first
    `overlap` predictions, which only give it context: every index below `count` is scored once."""
    scored = max(-(-(count - overlap) // streams), 1)
    positions = np.arange(streams)[:, None] * scored + np.arange(scored + overlap)
    first = np.arange(streams)[:, None] == 0
    is_scored = (positions < count) & (first | (np.arange(scored + overlap) >= overlap))
    return np.minimum(positions, count - 1), is_scored


def total_nats(
    params: model.Params,
    config: model.ModelConfig,
    tokens: np.ndarray,
    chunk_size: int = DEFAULT_CHUNK,
    streams: int = 1,
    overlap: int = 0,
) -> tuple[float, int]:
    """The summed cross-entropy (nats) of predicting tokens[1:] from what precedes each, and
    how many tokens that is. One compiled call per chunk of `chunk_size` characters, no host
    sync until the end.

    With one stream (the default) the score is exact: every character is predicted from all the
    text before it. With `streams` > 1 the text is read as that many pieces side by side, many
    times faster on a CPU, each piece after the first read from `overlap` characters before the
    part it scores, from a zero state: the score then differs from the exact one only by what
    the model would have remembered from further back."""
    count = len(tokens) - 1
    if count < 1:
        return 0.0, 0
    config = model.for_one_stream(config)
    streams = max(1, min(streams, count // max(overlap, 1)))
    positions, is_scored = _stream_windows(count, streams, overlap)
    steps = max(1, chunk_size // streams)
    padded = -(-positions.shape[1] // steps) * steps
    pad = ((0, 0), (0, padded - positions.shape[1]))
    positions, is_scored = np.pad(positions, pad), np.pad(is_scored, pad)
    tokens = np.asarray(tokens, np.int32)
    inputs, targets = tokens[positions].T, tokens[positions + 1].T
    is_scored = is_scored.T
    state = model.initial_state(config, streams)
    sums = []
    for start in range(0, padded, steps):
        window = slice(start, start + steps)
        state, nats = _chunk_nats(
            params, state, inputs[window], targets[window], is_scored[window], config
        )
        sums.append(nats)
    return float(np.sum(np.asarray(jax.device_get(sums), np.float64))), count


def unigram_nats(train_tokens: np.ndarray, predicted: np.ndarray, vocab_size: int) -> float:
    """Nats per character of `predicted` under the add-one (Laplace) smoothed character
    frequencies of `train_tokens`: a model that knows how often each character occurs and
    nothing of their order. With ln(vocab_size), the uniform guess, it frames a model's loss."""
    counts = np.bincount(train_tokens, minlength=vocab_size) + 1.0
    return float(-np.mean(np.log(counts[predicted] / counts.sum())))


@dataclass(frozen=True)
class Perplexity:
    """The score of a model on a text: the static score (the trained weights, fixed), and the
    dynamic-evaluation score when one was asked for (`charlm.dynamic`)."""

    source: str
    characters: int
    nats_per_char: float
    unknown: dict[str, int]
    dynamic: DynamicScore | None = None

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_char)

    def to_dict(self) -> dict[str, Any]:
        """The static score's fields, and under "dynamic" the dynamic score's if there is one."""
        result = {
            "source": self.source,
            "characters": self.characters,
            "nats_per_char": self.nats_per_char,
            "bits_per_char": self.bits_per_char,
            "perplexity": self.perplexity,
            "unknown_characters": sum(self.unknown.values()),
            "unknown": self.unknown,
        }
        if self.dynamic is not None:
            result["dynamic"] = self.dynamic.to_dict()
        return result


def perplexity(
    checkpoint: str | os.PathLike | None = None,
    text_file: str | os.PathLike | None = None,
    *,
    encoding: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    dynamic: DynamicEvaluation | None = None,
) -> Perplexity:
    """Score a checkpoint on `text_file`, or on its own held-out split when that is None.

    `checkpoint` is a file, a run directory, or None for the working directory's latest run.
    With `dynamic` settings the text is also scored by dynamic evaluation (`charlm.dynamic`),
    the weights adapting as it is read; the static score is computed all the same.
    """
    loaded = ckpt.load(ckpt.resolve(checkpoint))
    params, config, vocab = ckpt.load_model(loaded)
    if text_file is None:
        corpus = loaded.meta["corpus"]
        if corpus["val_fraction"] == 0:
            raise CharlmError(
                "this checkpoint's run held nothing out (--val-fraction 0); "
                "give a text file to evaluate: charlm perplexity FILE"
            )
        path = corpus["path"]
        if not os.path.isfile(path) or sha256_file(path) != corpus["sha256"]:
            raise CharlmError(
                f"the training corpus {path} is missing or has changed since training "
                "(sha256 differs); give a text file to evaluate: charlm perplexity FILE"
            )
        text = read_text(path, corpus.get("encoding"))
        tokens, unknown = vocab.encode_known(text)
        tokens = tokens[corpus["split_index"] :]
        source = f"{path} (held-out last {corpus['val_fraction']:g})"
    else:
        tokens, unknown = vocab.encode_known(read_text(text_file, encoding))
        source = str(text_file)
    return score(params, config, tokens, unknown, source, chunk_size=chunk_size, dynamic=dynamic)


def score(
    params: model.Params,
    config: model.ModelConfig,
    tokens: np.ndarray,
    unknown: dict[str, int],
    source: str,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    dynamic: DynamicEvaluation | None = None,
) -> Perplexity:
    """The score of a loaded model on `tokens`, the known characters of a text (and `unknown`,
    the count of those removed, as `Vocabulary.encode_known` gives them): shared by
    `perplexity` and the server (`charlm.server`), which holds the model and gets text, not
    files. Raises CharlmError, naming `source`, when there is nothing to evaluate."""
    if len(tokens) < 2:
        raise CharlmError(f"{source} has fewer than 2 known characters; nothing to evaluate")
    nats, count = total_nats(params, config, tokens, chunk_size)
    adapted = None
    if dynamic is not None:
        dynamic_total, _ = dynamic_nats(params, config, tokens, dynamic, chunk_size)
        adapted = DynamicScore(dynamic_total / count, dynamic)
    return Perplexity(source, count, nats / count, unknown, adapted)
