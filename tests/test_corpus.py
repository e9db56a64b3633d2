"""Corpus reading, the code-point vocabulary, the held-out split and the TBPTT batch streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from charlm.data.corpus import BatchStream, load_corpus
from charlm.data.text import Vocabulary, read_text, sha256_file
from charlm.errors import CharlmError


def test_vocabulary_is_code_points_not_bytes():
    vocab = Vocabulary.from_text("出战 the 出")
    # 出 and 战 are 3 bytes each in UTF-8; each must be one token.
    assert vocab.chars == " eht出战"
    tokens = vocab.encode("出战")
    assert tokens.tolist() == [4, 5]
    assert vocab.decode(tokens) == "出战"
    assert tokens.dtype == np.uint16


def test_vocabulary_beyond_the_basic_plane_and_wide_dtype():
    text = "a😀b𠀀"  # two characters outside the BMP
    vocab = Vocabulary.from_text(text)
    assert len(vocab) == 4
    assert vocab.decode(vocab.encode(text)) == text
    # More than 65,536 distinct characters no longer fit in uint16.
    many = "".join(chr(0x10000 + i) for i in range(70000))
    wide = Vocabulary.from_text(many)
    assert wide.dtype == np.uint32
    assert wide.decode(wide.encode(many[-5:])) == many[-5:]


def test_unknown_characters_are_named_and_counted():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(CharlmError, match="'xz'"):
        vocab.encode("axbzx")
    tokens, unknown = vocab.encode_known("axbzx")
    assert vocab.decode(tokens) == "ab"
    assert unknown == {"x": 2, "z": 1}
    assert vocab.unknown("axbzx") == "xz"


def test_read_text_drops_bom_and_crlf(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeff第一回\r\n宴桃园\r\n".encode())
    assert read_text(path) == "第一回\n宴桃园\n"


def test_gbk_file_fails_with_the_exact_fix_then_loads_with_it(tmp_path: Path):
    path = tmp_path / "gbk.txt"
    text = "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。\n" * 20
    path.write_bytes(text.encode("gbk"))
    with pytest.raises(CharlmError, match="--encoding gb18030"):
        read_text(path)
    assert read_text(path, "gb18030") == text


BAD_CONTENTS = {
    "empty": (b"", "is empty"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    "undecodable": (b"caf\xe9 au lait, " * 10, "not valid utf-8"),
}


@pytest.mark.parametrize("kind", ["missing", "directory", *BAD_CONTENTS])
def test_bad_files_raise_one_line(tmp_path: Path, kind: str):
    path = tmp_path / "input.txt"
    message = {"missing": "no such file", "directory": "is a directory"}.get(kind)
    if kind == "directory":
        path.mkdir()
    elif kind in BAD_CONTENTS:
        content, message = BAD_CONTENTS[kind]
        path.write_bytes(content)
    with pytest.raises(CharlmError, match=message) as err:
        read_text(path)
    assert "\n" not in str(err.value)


def test_unknown_or_non_text_encoding(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(CharlmError, match="unknown encoding"):
        read_text(path, "no-such-codec")
    with pytest.raises(CharlmError, match="not a text encoding"):
        read_text(path, "rot13")


def test_utf16_under_any_codec_alias_is_text_not_binary(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_bytes("出战 at dawn".encode("utf-16"))
    assert read_text(path, "utf_16") == read_text(path, "UTF-16") == "出战 at dawn"


def test_split_holds_out_the_end_and_records_provenance(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")
    corpus = load_corpus(path, val_fraction=0.1)
    assert corpus.split_index == 90
    assert Vocabulary.decode(corpus.vocab, corpus.val_tokens) == "abcdefghij"
    assert corpus.sha256 == sha256_file(path)
    assert len(corpus.train_tokens) + len(corpus.val_tokens) == 100


def test_tinyshakespeare_split_is_nanogpts(tmp_path: Path):
    """nanoGPT holds out data[int(n * 0.9):]; for tiny-shakespeare's 1,115,394 characters
    that starts at 1,003,854."""
    path = tmp_path / "t.txt"
    path.write_text("x" * 1_115_394, encoding="utf-8")
    assert load_corpus(path).split_index == int(1_115_394 * 0.9) == 1_003_854


def test_resumed_vocabulary_rejects_new_characters(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("abcxyz", encoding="utf-8")
    with pytest.raises(CharlmError, match="'xyz'"):
        load_corpus(path, vocab=Vocabulary("abc"), val_fraction=0.0)


def test_batches_are_contiguous_streams_that_wrap_with_a_reset():
    tokens = np.arange(1000, dtype=np.uint16)
    stream = BatchStream(tokens, batch_size=4, seq_len=10)
    # 4 streams of 250 tokens; 24 windows of 10 (+1 target) fit in each.
    assert stream.steps_per_epoch == 24
    first_inputs, first_targets, reset = stream.batch(0)
    assert reset
    assert first_inputs.shape == (4, 10) and first_inputs.dtype == np.int32
    assert first_inputs[:, 0].tolist() == [0, 250, 500, 750]
    np.testing.assert_array_equal(first_targets, first_inputs + 1)
    second_inputs, _, reset = stream.batch(1)
    assert not reset
    # Each stream continues exactly where the previous step stopped: the state carries over.
    np.testing.assert_array_equal(second_inputs[:, 0], first_inputs[:, -1] + 1)
    wrapped_inputs, _, reset = stream.batch(24)
    assert reset
    np.testing.assert_array_equal(wrapped_inputs, first_inputs)


def test_text_too_short_for_one_batch():
    with pytest.raises(CharlmError, match="too few for one batch"):
        BatchStream(np.arange(50, dtype=np.uint16), batch_size=8, seq_len=10)
