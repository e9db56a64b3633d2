"""Sampling: reproducible streams, the filters, greedy decoding, primes outside the vocabulary."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.errors import CharlmError
from charlm.inference.sampling import (
    SampleError,
    draw,
    filter_logits,
    generate,
    inverse_cdf,
    sample_stream,
)
from charlm.lm import model
from charlm.lm.checkpoint import load_model


def test_same_seed_same_text_whatever_the_chunking(trained_run: Path):
    first = charlm.sample(trained_run, prime="出战", length=150, seed=7)
    again = charlm.sample(trained_run, prime="出战", length=150, seed=7, chunk_size=5)
    other = charlm.sample(trained_run, prime="出战", length=150, seed=8)
    assert first == again
    assert first != other
    assert first[0].startswith("出战") and len(first[0]) == 2 + 150


def test_a_bfloat16_model_samples_in_float32():
    """precision is how a model was trained; sampling runs in float32 (faster one character at
    a time). Large random weights and 300 characters make bfloat16's rounding change draws."""
    config = model.ModelConfig(vocab_size=300, hidden_size=64, embed_size=16)
    params = jax.tree.map(lambda p: 4 * p, model.init(jax.random.key(0), config))
    rounded = dataclasses.replace(config, precision="bfloat16")
    context = np.array([1, 2], np.int32)

    def text(c):
        pieces = generate(params, c, context, 200, jax.random.key(3), num_samples=4)
        return np.concatenate(list(pieces), axis=1)

    np.testing.assert_array_equal(text(rounded), text(config))


def test_a_sample_does_not_depend_on_how_many_are_drawn_beside_it(trained_run: Path):
    alone = charlm.sample(trained_run, prime="the", length=80, seed=3)
    together = charlm.sample(trained_run, prime="the", length=80, seed=3, num_samples=3)
    assert together[0] == alone[0]
    assert len(set(together)) == 3


def test_stream_yields_the_prime_then_pieces(trained_run: Path):
    pieces = list(sample_stream(trained_run, prime="将军", length=200, seed=1, chunk_size=64))
    assert pieces[0] == ["将军"]
    # The two prime characters share the first compiled chunk of 64 with 62 generated ones.
    assert [len(p[0]) for p in pieces[1:]] == [62, 64, 64, 10]


def test_greedy_equals_top_k_one_and_is_deterministic(trained_run: Path):
    greedy = charlm.sample(trained_run, prime="曹操", length=60, greedy=True, seed=1)
    top1 = charlm.sample(trained_run, prime="曹操", length=60, top_k=1, seed=2)
    tiny_nucleus = charlm.sample(trained_run, prime="曹操", length=60, top_p=1e-6, seed=3)
    assert greedy == top1 == tiny_nucleus


def test_generated_text_matches_the_model_step_by_step(trained_run: Path):
    """Greedy generation must pick the argmax of model.apply's logits after each character."""
    params, config, vocab = load_model(ckpt.load(ckpt.resolve(trained_run)))
    context = vocab.encode("刘备")
    tokens = np.concatenate(
        list(generate(params, config, context, 12, jax.random.key(0), greedy=True)), axis=1
    )[0]
    sequence = list(context)
    for token in tokens:
        logits, _ = model.apply(
            params, jnp.asarray([sequence]), model.initial_state(config, 1), config
        )
        assert token == int(jnp.argmax(logits[0, -1]))
        sequence.append(int(token))


def test_one_prime_per_sample(trained_run: Path):
    """A (num_samples, n) context primes each sample with its own row: the batch gives what
    each prime gives alone, across a chunk boundary too."""
    params, config, vocab = load_model(ckpt.load(ckpt.resolve(trained_run)))
    primes = ["刘备 the", "army 曹", "天下 at "]
    context = np.stack([vocab.encode(p) for p in primes])

    def greedy(context: np.ndarray, num_samples: int) -> np.ndarray:
        chunks = generate(
            params,
            config,
            context,
            9,
            jax.random.key(0),
            num_samples=num_samples,
            greedy=True,
            chunk_size=5,
        )
        return np.concatenate(list(chunks), axis=1)

    together = greedy(context, 3)
    for row, prime in zip(together, context):
        np.testing.assert_array_equal(row, greedy(prime, 1)[0])


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))

    def kept(k: int, p: float) -> np.ndarray:
        return np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0]

    assert kept(2, 1.0).tolist() == [True, True, False, False, False]
    assert kept(0, 0.5).tolist() == [True, False, False, False, False]
    # 0.5 + 0.2 = 0.7 < 0.8, so the third character is needed to reach 0.8.
    assert kept(0, 0.8).tolist() == [True, True, True, False, False]
    assert kept(0, 1.0).all()
    # top-p applies to the top-k distribution, renormalised: 0.5/0.7 ≥ 0.7.
    assert kept(2, 0.7).tolist() == [True, False, False, False, False]


def test_inverse_cdf_gives_each_token_its_share_of_the_unit_interval():
    """Uniforms on an even grid land on each token in proportion to its probability, to within
    one grid point; tokens of probability 0 (inside the row and at its end) get none, even at
    the interval's ends."""
    probs = np.array([0.5, 0.2, 0.0, 0.25, 0.05, 0.0])
    n = 10_000
    uniform = jnp.concatenate([(jnp.arange(n) + 0.5) / n, jnp.array([1e-30, 1.0])])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n + 2, len(probs)))
    tokens = np.asarray(inverse_cdf(logits, uniform))
    counts = np.bincount(tokens[:n], minlength=len(probs))
    assert np.all(np.abs(counts - n * probs) <= 1), counts
    assert tokens[n] == 0 and tokens[n + 1] == 4


def test_inverse_cdf_never_draws_a_filtered_token_from_a_large_vocabulary():
    """XLA's cumulative sum is not monotone to the last bit: over 4,000 entries a zero-weight
    position can sit a rounding step above the one before it. Uniforms aimed into every such
    gap, and an even grid, must still draw only tokens the filter kept."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 4000)).astype(np.float32) * 3
    logits[0, rng.random(4000) < 0.5] = -np.inf
    weights = jnp.exp(logits - np.max(logits))
    cumulative = np.asarray(jnp.cumsum(weights, axis=-1))[0]
    total = cumulative[-1]
    gaps = np.flatnonzero((np.asarray(weights)[0, 1:] == 0) & (np.diff(cumulative) != 0)) + 1
    aimed = (cumulative[gaps - 1] + cumulative[gaps]) / 2 / total
    uniform = np.concatenate([aimed, (np.arange(20_000) + 0.5) / 20_000, [1.0]])
    tokens = inverse_cdf(jnp.broadcast_to(logits, (len(uniform), 4000)), jnp.asarray(uniform))
    assert np.all(np.isfinite(logits[0, np.asarray(tokens)]))


def test_draw_samples_softmax_of_the_logits_over_the_temperature():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    tokens = draw(
        jnp.broadcast_to(logits, (n, 3)),
        keys,
        jnp.float32(2.0),
        jnp.int32(0),
        jnp.float32(1.0),
        greedy=False,
    )
    expected = np.asarray(jax.nn.softmax(logits / 2.0))
    frequencies = np.bincount(np.asarray(tokens), minlength=3) / n
    # Five standard errors of a frequency near 1/3 with 40,000 draws: 0.012.
    np.testing.assert_allclose(frequencies, expected, atol=0.012)


def test_temperature_sharpens_the_distribution(trained_run: Path):
    cold = charlm.sample(trained_run, prime="将", length=300, temperature=0.05, seed=5)[0]
    greedy = charlm.sample(trained_run, prime="将", length=300, greedy=True)[0]
    hot = charlm.sample(trained_run, prime="将", length=300, temperature=3.0, seed=5)[0]

    def agreement(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(a, b)) / len(a)

    assert agreement(cold, greedy) > agreement(hot, greedy)


def test_prime_outside_vocabulary_is_named_or_dropped(trained_run: Path):
    with pytest.raises(CharlmError, match=r"'Zé'.*--drop-unknown"):
        charlm.sample(trained_run, prime="出Zé战", length=5, seed=0)
    dropped = charlm.sample(trained_run, prime="出Zé战", length=5, seed=0, drop_unknown=True)
    assert dropped == charlm.sample(trained_run, prime="出战", length=5, seed=0)


def test_empty_prime_starts_a_new_paragraph(trained_run: Path):
    text = charlm.sample(trained_run, length=40, seed=0)[0]
    after_newline = charlm.sample(trained_run, prime="\n", length=40, seed=0)[0]
    assert len(text) == 40
    assert text == after_newline[1:]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("temperature", 0.0, "temperature must be a positive finite number"),
        ("temperature", math.inf, "temperature must be a positive finite number"),
        ("temperature", math.nan, "temperature must be a positive finite number"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", math.nan, "top_p must be in (0, 1]"),
        ("top_k", -1, "top_k must be from 0 to 2,147,483,647, got -1"),
        ("top_k", 2**31, "top_k must be from 0 to 2,147,483,647, got 2,147,483,648"),
        ("seed", -1, "seed must be in [0, 2**63)"),
        ("length", -1, "length must be from 0 to 10,000,000, got -1"),
        ("length", 10**20, "length must be from 0 to 10,000,000, got 100,000,000,000,000,000,000"),
        ("num_samples", 0, "num_samples must be at least 1"),
    ],
)
def test_bad_options_are_refused_naming_the_field(
    trained_run: Path, option: str, value: float, words: str
):
    with pytest.raises(SampleError) as caught:
        charlm.sample(trained_run, **{option: value})
    assert caught.value.field == option and str(caught.value).startswith(words)
