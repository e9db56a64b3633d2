"""The training data: a corpus's tokens (memory-mapped from its token file), the held-out
split, and the streams that training batches are read from."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from charlm.data.text import Vocabulary, code_points, sha256_file
from charlm.data.token_files import open_tokens
from charlm.errors import CharlmError


@dataclass(frozen=True)
class Corpus:
    """A text file as tokens, with its provenance and the index where the held-out split begins."""

    path: str
    sha256: str
    vocab: Vocabulary
    tokens: np.ndarray
    val_fraction: float

    @property
    def split_index(self) -> int:
        """Where the held-out split begins: int(n·(1 − f)), the cut nanoGPT makes."""
        return int(len(self.tokens) * (1.0 - self.val_fraction))

    @property
    def train_tokens(self) -> np.ndarray:
        return self.tokens[: self.split_index]

    @property
    def val_tokens(self) -> np.ndarray:
        return self.tokens[self.split_index :]


def load_corpus(
    path: str | os.PathLike,
    *,
    encoding: str | None = None,
    val_fraction: float = 0.1,
    vocab: Vocabulary | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Corpus:
    """The tokens of the text at `path`, from its token file (`charlm.data.token_files`, built the first
    time); the last `val_fraction` of its characters is held out.

    The vocabulary is the whole text's. With `vocab` (as when resuming), a character outside
    it is an error, and the tokens are renumbered if that vocabulary has more characters.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CharlmError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    token_file = open_tokens(path, encoding, progress=progress, log=log)
    tokens = token_file.tokens
    if vocab is not None and vocab != token_file.vocab:
        missing = "".join(sorted(set(token_file.vocab.chars) - set(vocab.chars)))
        if missing:
            raise CharlmError(
                f"{path} has characters that the checkpoint's vocabulary lacks: {missing[:40]!r}"
            )
        renumber = np.searchsorted(code_points(vocab.chars), code_points(token_file.vocab.chars))
        tokens = renumber.astype(vocab.dtype)[tokens]
    corpus = Corpus(
        str(path), token_file.corpus_sha256, vocab or token_file.vocab, tokens, val_fraction
    )
    if val_fraction > 0 and len(corpus.val_tokens) < 2:
        raise CharlmError(
            f"{path} is too short to hold out {val_fraction:g} of it for validation "
            "(fewer than 2 characters); use a longer text or --val-fraction 0"
        )
    return corpus


def held_out_corpus(recorded: dict[str, Any], instead: str) -> str:
    """The path of the corpus whose held-out split a checkpoint's run kept (`recorded`, its
    metadata's `corpus` section), checked to be there and unchanged; `instead` is the command
    to run on a file when it is not, or when the run held nothing out."""
    if recorded["val_fraction"] == 0:
        raise CharlmError(
            f"this checkpoint's run held nothing out (--val-fraction 0); give a file: {instead}"
        )
    path = recorded["path"]
    if not os.path.isfile(path) or sha256_file(path) != recorded["sha256"]:
        raise CharlmError(
            f"the training corpus {path} is missing or has changed since training "
            f"(sha256 differs); give a file: {instead}"
        )
    return path


class BatchStream:
    """Contiguous training streams for truncated backpropagation through time.

    The tokens are cut into `batch_size` equal streams laid side by side; step i reads the
    i-th window of `seq_len` characters of every stream, so the hidden state left by one step
    is the right state to start the next. When the streams are used up they wrap to the start
    and `reset` is true: the state must be zeroed. Batches are (batch, time), batch axis first,
    so that a data-parallel run shards axis 0.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        stream_len = len(tokens) // batch_size
        self.steps_per_epoch = (stream_len - 1) // seq_len if stream_len > 0 else 0
        if self.steps_per_epoch < 1:
            raise CharlmError(
                f"the training text has {len(tokens):,} characters, too few for one batch of "
                f"{batch_size} streams of {seq_len + 1} characters; use a smaller --batch-size "
                "or --seq-len, or a longer text"
            )
        self._window = (np.arange(batch_size) * stream_len)[:, None] + np.arange(seq_len + 1)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, bool]:
        """Inputs and targets, each (batch, seq_len) int32, and whether the state must reset;
        with `rows`, only those streams' (the rest of the text is not read)."""
        position = step % self.steps_per_epoch
        window = self.tokens[self._window[rows] + position * self.seq_len].astype(np.int32)
        return window[:, :-1], window[:, 1:], position == 0
