"""Token files: the same tokens as reading the whole text, built once in bounded memory, checked
when opened, and never left half-written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import mixed_text

from charlm.data import text as corpus
from charlm.data import token_files as tokens
from charlm.data.text import Vocabulary, read_text
from charlm.errors import CharlmError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no token files."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def in_memory(path: Path, encoding: str | None = None) -> tuple[Vocabulary, np.ndarray]:
    """The vocabulary and tokens of the whole file decoded at once, as charlm read texts
    before it read them in blocks."""
    text = path.read_bytes().decode(encoding or "utf-8").removeprefix("\ufeff")
    text = text.replace("\r\n", "\n")
    vocab = Vocabulary.from_text(text)
    return vocab, vocab.encode(text)


def test_a_token_file_holds_the_tokens_of_the_whole_text(corpus_file: Path):
    opened = tokens.open_tokens(corpus_file)
    vocab, expected = in_memory(corpus_file)
    assert opened.vocab == vocab
    assert isinstance(opened.tokens, np.memmap)
    np.testing.assert_array_equal(opened.tokens, expected)
    assert opened.path.parent == tokens.token_path(opened.corpus_sha256, "utf-8").parent


@pytest.mark.parametrize("encoding", [None, "gb18030", "utf-16"])
def test_blocks_that_split_characters_and_line_ends_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str | None
):
    """A block boundary may fall inside a multi-byte character or between CR and LF; the
    byte-order mark is dropped only at the start, as `read_text` does."""
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 7)
    text = "\ufeff出战 the army\r\nrides 天下\r\r\n\r\nend\r"
    if encoding == "gb18030":
        text = text.removeprefix("\ufeff")
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode(encoding or "utf-8"))
    opened = tokens.open_tokens(path, encoding)
    vocab, expected = in_memory(path, encoding)
    assert opened.vocab == vocab
    np.testing.assert_array_equal(opened.tokens, expected)
    assert read_text(path, encoding) == vocab.decode(expected)


def test_a_second_open_reads_the_file_made_by_the_first(
    corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    first = tokens.open_tokens(corpus_file)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the token file was built again")

    monkeypatch.setattr(tokens, "write_token_file", no_rebuild)
    again = tokens.open_tokens(corpus_file)
    assert again.path == first.path
    np.testing.assert_array_equal(again.tokens, first.tokens)


def damage_tokens(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def replace_with_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


def damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[14] = ord("{")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (damage_tokens, "do not match their checksum"),
        (truncate, "size does not match"),
        (replace_with_garbage, "not a charlm token file"),
        (damage_header, "header is damaged"),
    ],
)
def test_a_damaged_token_file_is_rebuilt_and_says_why(corpus_file: Path, damage, reason: str):
    path = tokens.open_tokens(corpus_file).path
    damage(path)
    notes: list[str] = []
    opened = tokens.open_tokens(corpus_file, log=notes.append)
    assert len(notes) == 1 and reason in notes[0] and str(corpus_file) in notes[0]
    np.testing.assert_array_equal(opened.tokens, in_memory(corpus_file)[1])


def test_a_token_file_of_another_text_is_not_used(corpus_file: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text("another text entirely", encoding="utf-8")
    made = tokens.open_tokens(other).path
    wanted = tokens.open_tokens(corpus_file).path
    made.replace(wanted)
    notes: list[str] = []
    opened = tokens.open_tokens(corpus_file, log=notes.append)
    assert notes and "another text" in notes[0]
    np.testing.assert_array_equal(opened.tokens, in_memory(corpus_file)[1])


def test_a_full_disk_leaves_no_token_file(corpus_file: Path, monkeypatch: pytest.MonkeyPatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def opener(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", opener)
    with pytest.raises(CharlmError, match="no space left on the device") as raised:
        tokens.open_tokens(corpus_file)
    assert "\n" not in str(raised.value)
    folder = tokens.token_path("x", "utf-8").parent
    assert list(folder.iterdir()) == []


def test_an_undecodable_byte_far_into_the_file_is_named_by_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 64)
    path = tmp_path / "bad.txt"
    good = "天下大势，分久必合。".encode() * 20
    path.write_bytes(good + b"\xff" + "合久必分".encode())
    with pytest.raises(CharlmError, match=f"undecodable byte 0xff at offset {len(good)};"):
        tokens.open_tokens(path)
    assert not list(tokens.token_path("x", "utf-8").parent.glob("*"))


@pytest.mark.parametrize(
    "content, encoding, message",
    [
        (b"", None, "is empty"),
        ("\ufeff".encode(), None, "holds no text after its byte-order mark"),
        (b"\x00\x01binary", None, "binary file"),
        ("天下大势".encode("gb18030"), None, "--encoding gb18030"),
        (b"text", "no-such-codec", "unknown encoding"),
        (b"text", "base64", "is not a text encoding"),
    ],
)
def test_bad_text_is_one_line(tmp_path: Path, content: bytes, encoding: str | None, message: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CharlmError, match=message) as raised:
        tokens.open_tokens(path, encoding)
    assert "\n" not in str(raised.value)


# Tokenizing in a child process that samples its own anonymous memory (RssAnon: the pages of
# the memory map and of the file cache are not counted) every few milliseconds.
MEASURE = textwrap.dedent(
    """
    import sys, threading, time
    from charlm.data import text as corpus
    from charlm.data import token_files as tokens

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak, done = [anon_kib()], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(anon_kib())
            time.sleep(0.005)

    start = anon_kib()
    watcher = threading.Thread(target=sample)
    watcher.start()
    opened = tokens.open_tokens(sys.argv[1])
    done.set()
    watcher.join()
    print(len(opened.tokens), max(peak) - start)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_tokenizing_a_large_file_takes_bounded_memory(tmp_path: Path):
    """40 MB of mixed text: held whole, its bytes, its str (4 bytes a character for CJK), its
    code points and its tokens would take over 200 MB; tokenizing in blocks stays far below."""
    path = tmp_path / "large.txt"
    block = mixed_text(lines=2000).encode()
    with open(path, "wb") as f:
        for _ in range(40_000_000 // len(block)):
            f.write(block)
    size = path.stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, grown_kib = map(int, result.stdout.split())
    assert count == len(read_text(path))
    assert size > 35e6
    assert grown_kib * 1024 < 100e6
