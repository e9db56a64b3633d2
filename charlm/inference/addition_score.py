"""How many sums of the binary-addition corpus (`charlm.data.addition`) a trained model gets
exactly right."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from charlm.data.addition import ALPHABET, line, query, to_bits, unseen_pairs
from charlm.errors import CharlmError


@dataclass(frozen=True)
class Accuracy:
    """How many of `pairs` sums of `bits`-bit operands a model completed exactly, with its
    answers (bits + 1 characters each, in the order the pairs were drawn) and up to five of its
    mistakes as (query, expected, answer)."""

    bits: int
    pairs: int
    correct: int
    answers: tuple[str, ...]
    mistakes: tuple[tuple[str, str, str], ...]

    @property
    def fraction(self) -> float:
        return self.correct / self.pairs


def accuracy(
    checkpoint: str | os.PathLike | None,
    *,
    pairs: int = 1000,
    bits: int = 8,
    seed: int = 1,
    exclude: str = "",
) -> Accuracy:
    """Complete `a+b=` greedily for `pairs` operand pairs that are not in `exclude` (the
    training text) and count the sums that are exactly right.

    Each query is read as the model read its training text: after a newline and a whole line
    before it (the first line of `exclude`, else 0+0=0), then the model's next bits + 1
    characters are its answer. In training every line follows other lines, so the state at
    its start is never the zero state; primed with "\\n" + "a+b=" alone from the zero state,
    a model that adds well off the training text is measured near chance. All pairs run as one
    batch through charlm.inference.sampling.generate, one prime per sample.
    """
    import jax

    from charlm.checkpoints import file_format as ckpt
    from charlm.inference.sampling import generate
    from charlm.lm.checkpoint import load_model

    params, config, vocab = load_model(ckpt.load(ckpt.resolve(checkpoint)))
    missing = vocab.unknown(ALPHABET)
    if missing:
        raise CharlmError(
            f"the model never saw {missing!r}, so it was not trained on an addition corpus"
        )
    tests = unseen_pairs(pairs, bits, seed, exclude)
    before = "\n" + (exclude.partition("\n")[0] or line(0, 0, bits)) + "\n"
    primes = np.stack([vocab.encode(before + query(a, b, bits)) for a, b in tests])
    chunks = generate(
        params, config, primes, bits + 1, jax.random.key(0), num_samples=len(tests), greedy=True
    )
    answers = [vocab.decode(row) for row in np.concatenate(list(chunks), axis=1)]
    mistakes: list[tuple[str, str, str]] = []
    correct = 0
    for (a, b), answer in zip(tests, answers):
        expected = to_bits(a + b, bits + 1)
        if answer == expected:
            correct += 1
        elif len(mistakes) < 5:
            mistakes.append((query(a, b, bits), expected, answer))
    return Accuracy(bits, len(tests), correct, tuple(answers), tuple(mistakes))
