"""The binary-addition corpus, and how many sums a trained model gets exactly right.

Each line is `a+b=c`: two operands and their sum in binary, least-significant bit first, the
operands `bits` digits wide and the sum `bits + 1`, so every line of a corpus has the same
width. Written this way, the sum's bit i depends on the operands' bits i and on the carry out
of bit i − 1, which the model has just written: the carry flows forward in time and must be
kept in the hidden state, as must the operands until their bits are needed. Learning to add
from digit strings is the classic first demonstration of recurrent memory (Zaremba & Sutskever
2014, "Learning to Execute"; Kalchbrenner et al. 2015, "Grid Long Short-Term Memory").

The generator needs no network and no JAX; `accuracy` loads JAX when it is called.
"""

from __future__ import annotations

import random

from charlm.errors import CharlmError

# The characters of every addition corpus; a model that lacks one cannot be scored.
ALPHABET = "01+=\n"

# A model that learns to add: a one-layer GRU of 128 units, which in trials learnt in far fewer
# steps than an LSTM of the same width, at a third of the cost of 256 units on 2 cores. Untied
# and without dropout: a sum must be exact, and 5 characters need no shared embedding.
MODEL = dict(
    cell="gru",
    layers=1,
    hidden_size=128,
    embed_size=8,
    tie_embeddings=False,
    dropout=0.0,
    embed_dropout=0.0,
    weight_drop=0.0,
)
# How it trains (TrainConfig fields), as benchmarks/addition.py measured it.
TRAINING = dict(
    batch_size=32,
    seq_len=64,
    lr=1e-2,
    beta2=0.999,
    weight_decay=0.01,
    val_fraction=0.02,
    precision="float32",
)


def to_bits(n: int, width: int) -> str:
    """`n` in binary, `width` digits, least-significant bit first: to_bits(6, 4) == "0110"."""
    return format(n, f"0{width}b")[::-1]


def from_bits(digits: str) -> int:
    """The number that least-significant-bit-first `digits` write."""
    return int(digits[::-1], 2)


def query(a: int, b: int, bits: int) -> str:
    """The left side of a line, `a+b=`, that the model completes with the sum."""
    return f"{to_bits(a, bits)}+{to_bits(b, bits)}="


def line(a: int, b: int, bits: int) -> str:
    """One corpus line, `a+b=c`, without its newline."""
    return query(a, b, bits) + to_bits(a + b, bits + 1)


def corpus_text(lines: int, bits: int, seed: int) -> str:
    """`lines` lines of random `bits`-bit sums, each ending in a newline. The operands are
    uniform, drawn from random.Random(seed) alone, so the same seed gives the same text."""
    if lines < 1 or bits < 1:
        raise CharlmError("--lines and --bits must be at least 1")
    rng = random.Random(seed)
    rows = []
    for _ in range(lines):
        a, b = rng.getrandbits(bits), rng.getrandbits(bits)
        rows.append(line(a, b, bits) + "\n")
    return "".join(rows)


def unseen_pairs(count: int, bits: int, seed: int, exclude: str = "") -> list[tuple[int, int]]:
    """`count` distinct operand pairs of `bits` bits, drawn from random.Random(seed), whose
    query `a+b=` starts no line of `exclude` (the training text)."""
    seen = {row.partition("=")[0] + "=" for row in exclude.splitlines()}
    shaped = sum(1 for q in seen if len(q) == 2 * bits + 2 and q[bits] == "+")
    available = (1 << 2 * bits) - shaped
    if available < count:
        raise CharlmError(
            f"only {available:,} pairs of {bits}-bit operands are not in the training text; "
            f"ask for at most that many"
        )
    rng = random.Random(seed)
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < count:
        a, b = rng.getrandbits(bits), rng.getrandbits(bits)
        if query(a, b, bits) not in seen:
            chosen[a, b] = None
    return list(chosen)
