"""The language model's loss on a text: the exact one-stream score that `charlm perplexity`
reports (`total_nats`), and the held-out evaluation of a training run (`Validation`), which
reads the text as parallel streams and frames the loss with the unigram and uniform baselines.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charlm.lm import model

DEFAULT_CHUNK = 1024


# Validation during training reads the held-out text as this many streams side by side, each
# from this many characters before the part it scores: several times faster than the one stream
# of `charlm perplexity`, whose exact score it matches to within 0.1% (docs/perplexity.md).
VALIDATION_STREAMS = 16


VALIDATION_OVERLAP = 200


class PerCharacter:
    """A score in nats per character (`nats_per_char`), also read as bits per character and
    as perplexity."""

    nats_per_char: float

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_char)


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


def _stream_window(
    count: int, streams: int, overlap: int, scored: int, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For `streams` side by side, at `times`: the prediction index each reads (streams,
    len(times)) and whether that prediction is scored. Stream k reads from k·L, L = `scored`,
    the scored length of a stream; it scores all it reads if k = 0 and otherwise all but its
    first `overlap` predictions, which only give it context: every index below `count` is
    scored once. Times past a stream's end read the last index and score nothing."""
    positions = np.arange(streams)[:, None] * scored + times
    first = np.arange(streams)[:, None] == 0
    is_scored = (positions < count) & (first | (times >= overlap)) & (times < scored + overlap)
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
    how many tokens that is. One compiled call per chunk of `chunk_size` characters, reading
    only that chunk's tokens (so `tokens` may be a memory-mapped file larger than memory), and
    a host sync every thousand chunks.

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
    scored = max(-(-(count - overlap) // streams), 1)
    steps = max(1, chunk_size // streams)
    state = model.initial_state(config, streams)
    total, sums = 0.0, []
    for start in range(0, scored + overlap, steps):
        times = np.arange(start, start + steps)
        positions, is_scored = _stream_window(count, streams, overlap, scored, times)
        inputs = np.asarray(tokens[positions], np.int32).T
        targets = np.asarray(tokens[positions + 1], np.int32).T
        state, nats = _chunk_nats(params, state, inputs, targets, is_scored.T, config)
        sums.append(nats)
        if len(sums) == 1000:
            total += float(np.sum(np.asarray(jax.device_get(sums), np.float64)))
            sums = []
    return total + float(np.sum(np.asarray(jax.device_get(sums), np.float64))), count


def unigram_nats(train_tokens: np.ndarray, predicted: np.ndarray, vocab_size: int) -> float:
    """Nats per character of `predicted` under the add-one (Laplace) smoothed character
    frequencies of `train_tokens`: a model that knows how often each character occurs and
    nothing of their order. With ln(vocab_size), the uniform guess, it frames a model's loss."""
    counts = _counts(train_tokens, vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-np.dot(_counts(predicted, vocab_size), logp) / len(predicted))


def _counts(tokens: np.ndarray, vocab_size: int, block: int = 1 << 22) -> np.ndarray:
    """How often each token occurs, read block by block (`tokens` may be memory-mapped)."""
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(tokens), block):
        counts += np.bincount(tokens[start : start + block], minlength=vocab_size)
    return counts


class Validation:
    """The held-out split as a training run scores it at each evaluation: its first
    `max_chars` characters (all when None), as parallel streams (`VALIDATION_STREAMS`); and
    the two baselines a model must beat to have learnt anything, on the same characters: a
    uniform guess, and the training text's character frequencies (`unigram_nats`)."""

    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        vocab_size: int,
        max_chars: int | None = None,
    ):
        self.tokens = val_tokens[:max_chars]
        val_tokens = self.tokens
        self.baselines = ""
        if val_tokens.size > 1:
            unigram = unigram_nats(train_tokens, val_tokens[1:], vocab_size)
            self.baselines = f"unigram {unigram:.3f}, uniform {math.log(vocab_size):.3f}"

    def loss(self, params: model.Params, config: model.ModelConfig) -> float | None:
        """Nats per character on the held-out split; None when nothing is held out."""
        if not self.tokens.size:
            return None
        nats, count = total_nats(
            params, config, self.tokens, streams=VALIDATION_STREAMS, overlap=VALIDATION_OVERLAP
        )
        return nats / count
