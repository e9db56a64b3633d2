"""Reading a corpus, its character vocabulary, the held-out split and the training batch streams.

A token is one Unicode code point, never a byte: 三国演义 has 3,951 of them, tiny-shakespeare 65.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlm.errors import CharlmError

_BINARY_PROBE_BYTES = 1 << 16


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_gb18030(data: bytes) -> bool:
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        return False
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return cjk >= 0.3 * max(1, len(text.strip()))


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    """Read a text file as UTF-8 (or `encoding`), drop a byte-order mark and turn CRLF into LF.

    Raises CharlmError with one actionable line for a missing path, a directory, an empty
    or binary file, and bytes that do not decode.
    """
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"no such file: {path}")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; give the path of a text file")
    name = encoding or "utf-8"
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise CharlmError(
            f"unknown encoding {encoding!r}; use a Python codec name such as utf-8 or gb18030"
        ) from None
    data = path.read_bytes()
    if not data:
        raise CharlmError(f"{path} is empty; give a file with some text in it")
    if b"\x00" in data[:_BINARY_PROBE_BYTES] and not codec.startswith(("utf-16", "utf-32")):
        raise CharlmError(
            f"{path} looks like a binary file (it contains NUL bytes), not text; "
            "if it is UTF-16 text, pass --encoding utf-16"
        )
    try:
        text = data.decode(name)
    except LookupError:
        raise CharlmError(
            f"{encoding!r} is not a text encoding; use one such as utf-8 or gb18030"
        ) from None
    except UnicodeDecodeError as err:
        if encoding is None and _looks_like_gb18030(data):
            raise CharlmError(
                f"{path} is not UTF-8 but reads as Chinese in GB18030/GBK; "
                "run again with --encoding gb18030"
            ) from None
        raise CharlmError(
            f"{path} is not valid {name}: undecodable byte 0x{data[err.start]:02x} at offset "
            f"{err.start}; if the file uses another encoding, pass it with --encoding "
            "(for example --encoding gb18030 or --encoding latin-1)"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text:
        raise CharlmError(f"{path} holds no text after its byte-order mark")
    return text


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


@dataclass(frozen=True)
class Vocabulary:
    """The sorted set of code points of a text; token i is the i-th character."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(map(chr, np.unique(_code_points(text)))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every token."""
        return np.dtype(np.uint16 if len(self.chars) <= 1 << 16 else np.uint32)

    def encode_known(self, text: str) -> tuple[np.ndarray, dict[str, int]]:
        """Tokens of the characters of `text` that are in the vocabulary, and a count of the rest."""
        table = _code_points(self.chars)
        points = _code_points(text)
        index = np.minimum(np.searchsorted(table, points), len(table) - 1)
        known = table[index] == points
        unknown: dict[str, int] = {}
        if not known.all():
            missing, counts = np.unique(points[~known], return_counts=True)
            unknown = {chr(c): int(n) for c, n in zip(missing, counts)}
        return index[known].astype(self.dtype), unknown

    def encode(self, text: str) -> np.ndarray:
        """Tokens of `text`; raises CharlmError naming any characters outside the vocabulary."""
        tokens, unknown = self.encode_known(text)
        if unknown:
            raise CharlmError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return tokens

    def unknown(self, text: str) -> str:
        """The distinct characters of `text` that are not in the vocabulary, in order of code point."""
        return "".join(self.encode_known(text)[1])

    def decode(self, tokens: np.ndarray) -> str:
        return "".join(self.chars[int(t)] for t in np.asarray(tokens).reshape(-1))


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
) -> Corpus:
    """Read `path` and tokenise it; the last `val_fraction` of its characters is held out.

    The vocabulary is built from the whole text unless `vocab` is given (as when resuming),
    in which case a character outside it is an error.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CharlmError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    text = read_text(path, encoding)
    if vocab is None:
        vocab = Vocabulary.from_text(text)
    else:
        missing = vocab.unknown(text)
        if missing:
            raise CharlmError(
                f"{path} has characters that the checkpoint's vocabulary lacks: {missing[:40]!r}"
            )
    corpus = Corpus(str(path), sha256_file(path), vocab, vocab.encode(text), val_fraction)
    if val_fraction > 0 and len(corpus.val_tokens) < 2:
        raise CharlmError(
            f"{path} is too short to hold out {val_fraction:g} of it for validation "
            "(fewer than 2 characters); use a longer text or --val-fraction 0"
        )
    return corpus


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

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Inputs and targets, each (batch, seq_len) int32, and whether the state must reset."""
        position = step % self.steps_per_epoch
        window = self.tokens[self._window + position * self.seq_len].astype(np.int32)
        return window[:, :-1], window[:, 1:], position == 0
