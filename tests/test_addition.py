"""The binary-addition corpus: its format, determinism and sums, and that charlm learns it."""

from __future__ import annotations

import re

import pytest

from charlm import addition
from charlm.errors import CharlmError


def test_bits_are_least_significant_first():
    assert addition.to_bits(6, 4) == "0110"
    assert addition.to_bits(1, 3) == "100"
    assert addition.from_bits("0110") == 6
    assert addition.line(3, 1, 2) == "11+10=001"  # 3 + 1 = 4


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_every_line_has_the_fixed_format_and_a_correct_sum(bits: int):
    text = addition.corpus_text(lines=500, bits=bits, seed=3)
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 500
    shape = re.compile(rf"([01]{{{bits}}})\+([01]{{{bits}}})=([01]{{{bits + 1}}})")
    for row in lines:
        a, b, total = shape.fullmatch(row).groups()
        assert addition.from_bits(a) + addition.from_bits(b) == addition.from_bits(total)
    assert set(text) <= set(addition.ALPHABET)


def test_the_same_seed_gives_the_same_text():
    first = addition.corpus_text(lines=1000, bits=8, seed=7)
    assert addition.corpus_text(lines=1000, bits=8, seed=7) == first
    assert addition.corpus_text(lines=1000, bits=8, seed=8) != first
    # Operands are uniform: each bit position is 1 about half the time.
    ones = [row[i] for row in first.splitlines() for i in range(8)].count("1")
    assert 0.45 < ones / 8000 < 0.55
    with pytest.raises(CharlmError):
        addition.corpus_text(lines=0, bits=8, seed=0)


def test_unseen_pairs_avoid_the_training_text():
    training = addition.corpus_text(lines=200, bits=4, seed=0)
    seen = {row.partition("=")[0] for row in training.splitlines()}
    available = 256 - len(seen)
    pairs = addition.unseen_pairs(available, bits=4, seed=1, exclude=training)
    assert len(set(pairs)) == len(pairs) == available
    assert not {addition.query(a, b, 4)[:-1] for a, b in pairs} & seen
    assert addition.unseen_pairs(10, bits=4, seed=1) == addition.unseen_pairs(10, bits=4, seed=1)
    with pytest.raises(CharlmError, match="not in the training text"):
        addition.unseen_pairs(available + 1, bits=4, seed=1, exclude=training)
