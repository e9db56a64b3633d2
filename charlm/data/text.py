"""Reading a text file, and its character vocabulary.

A token is one Unicode code point, never a byte: 三国演义 has 3,951 of them, tiny-shakespeare 65.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlm.errors import CharlmError

_BINARY_PROBE_BYTES = 1 << 16
# Bytes of a file decoded at a time: what bounds the memory of reading a text in blocks.
BLOCK_BYTES = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_gb18030(data: bytes) -> bool:
    """Whether `data`, which may end inside a character, reads as mostly Chinese in GB18030."""
    try:
        text = codecs.getincrementaldecoder("gb18030")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return cjk >= 0.3 * max(1, len(text.strip()))


def codec_name(encoding: str | None) -> str:
    """Python's canonical name of the text encoding `encoding` (UTF-8 when None)."""
    try:
        info = codecs.lookup(encoding or "utf-8")
    except LookupError:
        raise CharlmError(
            f"unknown encoding {encoding!r}; use a Python codec name such as utf-8 or gb18030"
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise CharlmError(f"{encoding!r} is not a text encoding; use one such as utf-8 or gb18030")
    return info.name


def existing_file(path: str | os.PathLike) -> Path:
    """`path`, if it names a file; one CharlmError line if it is missing or a directory."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"no such file: {path}")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; give the path of a text file")
    return path


def text_blocks(
    path: str | os.PathLike,
    encoding: str | None = None,
    on_read: Callable[[int], object] = lambda size: None,
) -> Iterator[str]:
    """The text of a file as UTF-8 (or `encoding`), with its byte-order mark dropped and CRLF
    turned into LF, decoded `BLOCK_BYTES` at a time (`on_read` is told each block's size), so
    that a file of any size can be read in bounded memory.

    Raises CharlmError with one actionable line for a missing path, a directory, an empty or
    binary file, and bytes that do not decode (naming their offset in the file).
    """
    path = existing_file(path)
    codec = codec_name(encoding)
    decoder = codecs.getincrementaldecoder(codec)()
    offset, started, held_cr = 0, False, ""
    with open(path, "rb") as f:
        while True:
            data = f.read(BLOCK_BYTES)
            final = not data
            if offset == 0:
                _check_start(path, data, codec)
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as err:
                at = offset - buffered + err.start
                raise _undecodable(path, encoding, data, at) from None
            if not started and text:
                text, started = text.removeprefix("\ufeff"), True
            text = held_cr + text
            held_cr = "\r" if text.endswith("\r") and not final else ""
            text = text[: len(text) - len(held_cr)].replace("\r\n", "\n")
            offset += len(data)
            on_read(len(data))
            if text:
                yield text
            if final:
                return


def _check_start(path: Path, data: bytes, codec: str) -> None:
    if not data:
        raise CharlmError(f"{path} is empty; give a file with some text in it")
    if b"\x00" in data[:_BINARY_PROBE_BYTES] and not codec.startswith(("utf-16", "utf-32")):
        raise CharlmError(
            f"{path} looks like a binary file (it contains NUL bytes), not text; "
            "if it is UTF-16 text, pass --encoding utf-16"
        )


def _undecodable(path: Path, encoding: str | None, block: bytes, offset: int) -> CharlmError:
    if encoding is None and offset < BLOCK_BYTES and looks_like_gb18030(block):
        return CharlmError(
            f"{path} is not UTF-8 but reads as Chinese in GB18030/GBK; "
            "run again with --encoding gb18030"
        )
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)
    return CharlmError(
        f"{path} is not valid {encoding or 'utf-8'}: undecodable byte 0x{byte.hex()} at offset "
        f"{offset}; if the file uses another encoding, pass it with --encoding "
        "(for example --encoding gb18030 or --encoding latin-1)"
    )


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    """The whole text of a file, read as `text_blocks` reads it."""
    text = "".join(text_blocks(path, encoding))
    if not text:
        raise CharlmError(f"{path} holds no text after its byte-order mark")
    return text


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


@dataclass(frozen=True)
class Vocabulary:
    """The sorted set of code points of a text; token i is the i-th character."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(map(chr, np.unique(code_points(text)))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every token."""
        return np.dtype(np.uint16 if len(self.chars) <= 1 << 16 else np.uint32)

    def encode_known(self, text: str) -> tuple[np.ndarray, dict[str, int]]:
        """Tokens of the characters of `text` that are in the vocabulary, and a count of the rest."""
        table = code_points(self.chars)
        points = code_points(text)
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
