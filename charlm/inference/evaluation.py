"""Perplexity and bits per character of a language model on a text or its held-out split.

A text is evaluated as one stream: the hidden state is carried from the first character to the
last, and each character after the first is predicted from all the characters before it. The
stream is cut into fixed-size chunks only to bound memory, so the result does not depend on the
chunk size. Characters outside the vocabulary are removed before evaluation (the model reads and
predicts the text without them) and reported with their counts.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from charlm.checkpoints import file_format as ckpt
from charlm.data.corpus import held_out_corpus, load_corpus
from charlm.data.text import Vocabulary, text_blocks
from charlm.errors import CharlmError
from charlm.inference.dynamic_evaluation import DynamicEvaluation, DynamicScore, dynamic_nats
from charlm.lm import model
from charlm.lm.checkpoint import load_model
from charlm.lm.evaluation import DEFAULT_CHUNK, PerCharacter, total_nats


@dataclass(frozen=True)
class Perplexity(PerCharacter):
    """The score of a model on a text: the static score (the trained weights, fixed), and the
    dynamic-evaluation score when one was asked for (`charlm.inference.dynamic_evaluation`)."""

    source: str
    characters: int
    nats_per_char: float
    unknown: dict[str, int]
    dynamic: DynamicScore | None = None

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
    With `dynamic` settings the text is also scored by dynamic evaluation (`charlm.inference.dynamic_evaluation`),
    the weights adapting as it is read; the static score is computed all the same.
    """
    loaded = ckpt.load(ckpt.resolve(checkpoint))
    params, config, vocab = load_model(loaded)
    if text_file is None:
        corpus = loaded.meta["corpus"]
        path = held_out_corpus(corpus, "charlm perplexity FILE")
        data = load_corpus(
            path, encoding=corpus["encoding"], val_fraction=corpus["val_fraction"], vocab=vocab
        )
        tokens, unknown = data.tokens[corpus["split_index"] :], dict[str, int]()
        source = f"{path} (held-out last {corpus['val_fraction']:g})"
    else:
        tokens, unknown = _known_tokens(vocab, text_file, encoding)
        source = str(text_file)
    return score(params, config, tokens, unknown, source, chunk_size=chunk_size, dynamic=dynamic)


def _known_tokens(
    vocab: Vocabulary, text_file: str | os.PathLike, encoding: str | None
) -> tuple[np.ndarray, dict[str, int]]:
    """`Vocabulary.encode_known` of a file's text, read a block at a time: the tokens are held,
    never the whole text."""
    parts, unknown = [], Counter[str]()
    for block in text_blocks(text_file, encoding):
        known, missing = vocab.encode_known(block)
        parts.append(known)
        unknown.update(missing)
    return np.concatenate(parts or [np.zeros(0, vocab.dtype)]), dict(unknown)


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
    `perplexity` and the server (`charlm.inference.server`), which holds the model and gets text, not
    files. Raises CharlmError, naming `source`, when there is nothing to evaluate."""
    if len(tokens) < 2:
        raise CharlmError(f"{source} has fewer than 2 known characters; nothing to evaluate")
    nats, count = total_nats(params, config, tokens, chunk_size)
    adapted = None
    if dynamic is not None:
        dynamic_total, _ = dynamic_nats(params, config, tokens, dynamic, chunk_size)
        adapted = DynamicScore(dynamic_total / count, dynamic)
    return Perplexity(source, count, nats / count, unknown, adapted)
