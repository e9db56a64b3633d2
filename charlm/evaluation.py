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
    logits, state = model.forward(params, inputs[:, None], state, config)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], targets)
    return state, jnp.sum(jnp.where(mask, nats, 0.0))


def total_nats(
    params: model.Params,
    config: model.ModelConfig,
    tokens: np.ndarray,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[float, int]:
    """The summed cross-entropy (nats) of predicting tokens[1:] from what precedes each, and
    how many tokens that is. One compiled call per chunk, no host sync until the end."""
    count = len(tokens) - 1
    if count < 1:
        return 0.0, 0
    config = model.for_one_stream(config)
    padded = -(-count // chunk_size) * chunk_size
    inputs = np.zeros(padded, np.int32)
    targets = np.zeros(padded, np.int32)
    inputs[:count] = tokens[:-1]
    targets[:count] = tokens[1:]
    mask = np.arange(padded) < count
    state = model.initial_state(config, 1)
    sums = []
    for start in range(0, padded, chunk_size):
        window = slice(start, start + chunk_size)
        state, nats = _chunk_nats(
            params, state, inputs[window], targets[window], mask[window], config
        )
        sums.append(nats)
    return float(np.sum(np.asarray(jax.device_get(sums), np.float64))), count


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
    if len(tokens) < 2:
        raise CharlmError(f"{source} has fewer than 2 known characters; nothing to evaluate")
    nats, count = total_nats(params, config, tokens, chunk_size)
    adapted = None
    if dynamic is not None:
        dynamic_total, _ = dynamic_nats(params, config, tokens, dynamic, chunk_size)
        adapted = DynamicScore(dynamic_total / count, dynamic)
    return Perplexity(source, count, nats / count, unknown, adapted)
