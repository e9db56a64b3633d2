"""Token files: a corpus tokenized once, in passes of bounded memory, then opened with
`np.memmap` by every later run, resume and `charlm perplexity`, which skip the text.

A token file lives in charlm's cache, named by the corpus's sha256 and encoding. It is a fixed
8-byte magic, a little-endian u32 header length, a JSON header (format version, the corpus's
sha256 and encoding, the vocabulary, the token dtype and count, and the sha256 of the token
bytes), padding to a 64-byte boundary, and the tokens, little-endian uint16 (uint32 for
vocabularies over 65,536). A file that fails any check when opened (magic, header, size, the
corpus it names, the hash of its tokens) is rebuilt, never trusted. Writing goes to a
temporary file that is renamed into place when whole, so a crash or a full disk leaves no
partial token file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from charlm.data.text import (
    BLOCK_BYTES,
    Vocabulary,
    code_points,
    codec_name,
    existing_file,
    sha256_file,
    text_blocks,
)
from charlm.errors import CharlmError
from charlm.storage import cache_dir, replace_durably

MAGIC = b"CHARLMTK"
VERSION = 1
ALIGN = 64
# Unicode's code space: a table over it maps a code point to its token in one gather.
CODE_POINTS = 0x110000
# Files at least this large show a progress bar while they are tokenized.
PROGRESS_BYTES = 32 << 20


@dataclass(frozen=True)
class TokenFile:
    """A corpus's tokens, memory-mapped read-only, and its vocabulary."""

    path: Path
    corpus_sha256: str
    vocab: Vocabulary
    tokens: np.ndarray


def token_path(corpus_sha256: str, codec: str) -> Path:
    return cache_dir() / "tokens" / f"{corpus_sha256}-{codec}.tokens"


def open_tokens(
    path: str | os.PathLike,
    encoding: str | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> TokenFile:
    """The token file of the corpus at `path`, built first if the cache has none or has one
    that fails its checks (`log` says why it was rebuilt)."""
    path = existing_file(path)
    codec = codec_name(encoding)
    digest = sha256_file(path)
    target = token_path(digest, codec)
    if target.exists():
        try:
            return read_token_file(target, digest)
        except CharlmError as problem:
            log(f"rebuilding the token file of {path}: {problem}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_token_file(path, encoding, digest, target, progress)
    return read_token_file(target, digest)


def read_token_file(path: Path, corpus_sha256: str) -> TokenFile:
    """Open and check a token file; CharlmError says what is wrong with it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
            raise CharlmError("it is not a charlm token file")
        (length,) = struct.unpack("<I", start[len(MAGIC) :])
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        version, vocab, dtype = header["version"], header["vocab"], np.dtype(header["dtype"])
        count, stored_corpus, stored_tokens = header["count"], header["corpus"], header["tokens"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CharlmError(f"its header is damaged ({err.__class__.__name__})") from None
    if version != VERSION:
        raise CharlmError(f"it has format version {version!r}, not {VERSION}")
    if stored_corpus != corpus_sha256:
        raise CharlmError("it was made from another text")
    if not isinstance(vocab, str) or not vocab or dtype != Vocabulary(vocab).dtype:
        raise CharlmError("its vocabulary or token type is damaged")
    offset = _data_offset(length)
    if not isinstance(count, int) or size != offset + count * dtype.itemsize:
        raise CharlmError("its size does not match its header (truncated?)")
    tokens = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=count)
    if _hash_tokens(tokens) != stored_tokens:
        raise CharlmError("its tokens do not match their checksum")
    return TokenFile(path, corpus_sha256, Vocabulary(vocab), tokens)


def _data_offset(header_length: int) -> int:
    return -(-(len(MAGIC) + 4 + header_length) // ALIGN) * ALIGN


def _hash_tokens(tokens: np.ndarray) -> str:
    digest = hashlib.sha256()
    step = BLOCK_BYTES // tokens.dtype.itemsize
    for start in range(0, len(tokens), step):
        digest.update(np.ascontiguousarray(tokens[start : start + step]).data)
    return digest.hexdigest()


def write_token_file(
    corpus: Path, encoding: str | None, corpus_sha256: str, target: Path, progress: bool
) -> None:
    """Tokenize `corpus` into `target` in two streaming passes: the vocabulary, then the
    tokens. Written beside `target` and renamed over it when whole."""
    size = corpus.stat().st_size
    bar = tqdm(
        total=2 * size,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {corpus.name}",
        disable=not progress or size < PROGRESS_BYTES,
        file=sys.stderr,
    )
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        present = np.zeros(CODE_POINTS, bool)
        for text in text_blocks(corpus, encoding, bar.update):
            present[code_points(text)] = True
        if not present.any():
            raise CharlmError(f"{corpus} holds no text after its byte-order mark")
        seen = np.flatnonzero(present)
        vocab = Vocabulary("".join(map(chr, seen)))
        token_of = np.zeros(CODE_POINTS, vocab.dtype.newbyteorder("<"))
        token_of[seen] = np.arange(len(seen))
        header = {
            "version": VERSION,
            "corpus": corpus_sha256,
            "encoding": codec_name(encoding),
            "vocab": vocab.chars,
            "dtype": vocab.dtype.name,
            "count": 0,
            "tokens": "0" * 64,
        }
        with open(tmp, "wb") as out:
            # The count and the hash are known only at the end: the header is written first
            # with the widest count, then again over it, padded to the same length.
            width = len(_header_json({**header, "count": 10**19}))
            out.write(_header_block(_header_json(header), width))
            digest, count = hashlib.sha256(), 0
            for text in text_blocks(corpus, encoding, bar.update):
                tokens = token_of[code_points(text)]
                digest.update(tokens.data)
                out.write(tokens.data)
                count += len(tokens)
            header.update(count=count, tokens=digest.hexdigest())
            out.seek(0)
            out.write(_header_block(_header_json(header), width))
            out.flush()
            os.fsync(out.fileno())
        replace_durably(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CharlmError(
                f"no space left on the device while writing the token file of {corpus} to "
                f"{target.parent}; free some space (it needs about {2 * size:,} bytes) and "
                "run again"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()


def _header_json(header: dict) -> bytes:
    return json.dumps(header, ensure_ascii=False).encode("utf-8")


def _header_block(raw: bytes, width: int) -> bytes:
    """Magic, length and the JSON header `raw` padded with spaces to `width` bytes, then zeros
    to the 64-byte boundary where the tokens begin."""
    raw = raw.ljust(width, b" ")
    return (MAGIC + struct.pack("<I", len(raw)) + raw).ljust(_data_offset(len(raw)), b"\0")
