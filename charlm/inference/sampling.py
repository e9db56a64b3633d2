"""Sampling text from a trained model, streamed in chunks that each run as one compiled call.

The prime is fed through the same compiled loop as the generated characters (its tokens are
forced rather than drawn), so one compilation serves every prime and length. The character at
position t of sample s is drawn with the key fold_in(fold_in(seed, s), t): the same seed gives
the same text whatever the chunk size or the number of samples drawn beside it.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charlm.checkpoints import file_format as ckpt
from charlm.data.text import Vocabulary
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.checkpoint import load_model

DEFAULT_CHUNK = 64
# The most characters one sample may ask for: about half an hour of generation at 5,000
# characters per second, far beyond any use, and a bound on a mistyped length.
MAX_LENGTH = 10_000_000


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the `top_k` largest logits (all when 0), then the smallest set of those whose
    probability sums to at least `top_p` (nucleus sampling, Holtzman et al. 2020); the rest
    become -inf. Works on (..., vocab) with scalar k and p."""
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum((mass_before < top_p) & (jnp.arange(vocab) < k), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def inverse_cdf(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """One token per row of `logits` (batch, vocab), drawn with probability softmax(logits) by
    inversion: the first token whose cumulative probability reaches `uniform` (batch,) in
    (0, 1]. One random number per draw, where the Gumbel-max trick needs one per vocabulary
    entry (4,000 threefry hashes a character on 三国演义). Tokens of probability 0 (logits of
    -inf, as the filters leave them) are never drawn: XLA's cumulative sum is not monotone to
    the last bit, so a zero-weight position can sit one rounding step above its predecessor,
    and only positive-weight positions are candidates, up to the largest of their sums."""
    vocab = logits.shape[-1]
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cumulative = jnp.cumsum(weights, axis=-1)
    possible = weights > 0
    total = jnp.max(jnp.where(possible, cumulative, 0.0), axis=-1, keepdims=True)
    reached = possible & (cumulative >= uniform[:, None] * total)
    # The first index where `reached` holds, as a min-reduction: XLA on CPU runs that several
    # times faster than the variadic reduction of jnp.argmax.
    return jnp.min(jnp.where(reached, jnp.arange(vocab), vocab - 1), axis=-1)


def draw(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    greedy: bool,
) -> jax.Array:
    """One token per row of `logits` (batch, vocab), each with its own key; with `greedy` the
    most likely one."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    scaled = logits / temperature
    scaled = jax.lax.cond(
        (top_k > 0) | (top_p < 1.0),
        lambda x: filter_logits(x, top_k, top_p),
        lambda x: x,
        scaled,
    )
    # uniform is in [0, 1); inverse_cdf wants (0, 1].
    return inverse_cdf(scaled, 1.0 - jax.vmap(jax.random.uniform)(keys))


@partial(jax.jit, static_argnames=("greedy", "config", "steps"))
def _advance(
    params: model.Params,
    state: model.State,
    logits: jax.Array,
    sample_keys: jax.Array,
    position: jax.Array,
    forced: jax.Array,
    n_forced: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    greedy: bool,
    config: model.ModelConfig,
    steps: int,
):
    """`steps` characters for every sample: the first `n_forced` are `forced`, the rest drawn."""

    def step(carry, i):
        state, logits = carry
        keys = jax.vmap(jax.random.fold_in, (0, None))(sample_keys, position + i)
        drawn = draw(logits, keys, temperature, top_k, top_p, greedy)
        token = jnp.where(i < n_forced, forced[i], drawn)
        logits, state = model.forward(params, token[None], state, config)
        return (state, logits[0]), token

    (state, logits), tokens = jax.lax.scan(step, (state, logits), jnp.arange(steps))
    return state, logits, tokens.T


def generate(
    params: model.Params,
    config: model.ModelConfig,
    context: np.ndarray,
    length: int,
    key: jax.Array,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    parallel: DataParallel | None = None,
) -> Iterator[np.ndarray]:
    """Read `context` (tokens), then yield the next `length` tokens of each sample as arrays
    (num_samples, n), chunk by chunk. `context` is one prime (n,) that every sample shares or
    one prime per sample (num_samples, n), all of the same length. With an empty context the
    first character is drawn uniformly.

    The samples are spread over the devices of `parallel` (default: every local device) when
    their number divides by the devices'; each device runs its own samples' loops."""
    if length == 0:
        return
    config = model.for_one_stream(config)
    state = model.initial_state(config, num_samples)
    logits = jnp.zeros((num_samples, config.vocab_size), jnp.float32)
    sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_samples))
    parallel = parallel or DataParallel.over()
    if parallel.size > 1 and num_samples % parallel.size == 0:
        params = jax.device_put(params, parallel.replicated)
        state, logits, sample_keys = jax.device_put((state, logits, sample_keys), parallel.batch)
    options = (
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
    )
    context = np.asarray(context, np.int32)
    context = np.broadcast_to(context, (num_samples, context.shape[-1]))
    chunks = -(-(context.shape[1] + length) // chunk_size)

    def launch(position: int):
        """Dispatch the chunk at `position`; JAX returns before it has run."""
        nonlocal state, logits
        forced = context[:, position : position + chunk_size]
        padded = np.zeros((chunk_size, num_samples), np.int32)
        padded[: forced.shape[1]] = forced.T
        state, logits, tokens = _advance(
            params,
            state,
            logits,
            sample_keys,
            jnp.int32(position),
            padded,
            jnp.int32(forced.shape[1]),
            *options,
            greedy=greedy,
            config=config,
            steps=chunk_size,
        )
        return forced.shape[1], tokens

    # One chunk is always in flight, so the device computes the next chunk while this one is
    # copied to the host and yielded.
    pending = launch(0)
    emitted = 0
    for chunk in range(1, chunks + 1):
        n_forced, tokens = pending
        if chunk < chunks:
            pending = launch(chunk * chunk_size)
        new = np.asarray(tokens)[:, n_forced:][:, : length - emitted]
        if new.shape[1]:
            emitted += new.shape[1]
            yield new


class SampleError(CharlmError):
    """A sampling option or prime that cannot be used; `field` names it (length, temperature,
    top_k, top_p, seed, num_samples, chunk_size or prime), for callers that report per field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_options(
    *,
    length: int = 500,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
    chunk_size: int = DEFAULT_CHUNK,
) -> None:
    """Raise SampleError for the first option out of its range."""
    if not 0 <= length <= MAX_LENGTH:
        raise SampleError("length", f"length must be from 0 to {MAX_LENGTH:,}, got {length:,}")
    if num_samples < 1:
        raise SampleError("num_samples", "num_samples must be at least 1")
    if chunk_size < 1:
        raise SampleError("chunk_size", "chunk_size must be at least 1")
    if seed is not None and not 0 <= seed < 2**63:
        raise SampleError("seed", "seed must be in [0, 2**63)")
    if not 0 < temperature < math.inf:
        raise SampleError(
            "temperature", "temperature must be a positive finite number (use greedy for argmax)"
        )
    if not 0 <= top_k < 2**31:
        raise SampleError("top_k", f"top_k must be from 0 to {2**31 - 1:,}, got {top_k:,}")
    if not 0 < top_p <= 1:
        raise SampleError("top_p", "top_p must be in (0, 1]")


class Sampler:
    """A trained model loaded once, to draw any number of samples from. Compilations are
    shared by every call with the same number of samples and chunk size; calls from several
    threads at once are independent (each carries its own state and key)."""

    def __init__(self, params: model.Params, config: model.ModelConfig, vocab: Vocabulary):
        self.params, self.config, self.vocab = params, config, vocab

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None) -> Sampler:
        """From a checkpoint file, a run directory, or None for the working directory's
        latest run."""
        return cls(*load_model(ckpt.load(ckpt.resolve(checkpoint))))

    def compile(self, num_samples: int = 1) -> None:
        """Compile the generation loop for `num_samples` samples now, so that the first real
        call answers at once (an interactive session, a server)."""
        for _ in self.stream("", length=1, seed=0, num_samples=num_samples):
            pass

    def stream(
        self,
        prime: str = "",
        *,
        length: int = 500,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        num_samples: int = 1,
        greedy: bool = False,
        drop_unknown: bool = False,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Iterator[list[str]]:
        """Yield text as it is generated: first the prime, then successive pieces, each a list
        with one string per sample. An empty prime starts from a newline (a fresh paragraph)
        when the vocabulary has one. Options are checked before anything is yielded."""
        options: dict[str, Any] = dict(length=length, temperature=temperature, top_k=top_k)
        options.update(top_p=top_p, num_samples=num_samples, chunk_size=chunk_size)
        check_options(seed=seed, **options)
        unknown = self.vocab.unknown(prime)
        if unknown and not drop_unknown:
            raise SampleError(
                "prime",
                f"the prime has characters the model never saw: {unknown!r}; "
                "change the prime or pass --drop-unknown to leave them out",
            )
        prime = "".join(ch for ch in prime if ch not in unknown)
        return self._pieces(prime, seed=seed, greedy=greedy, **options)

    def _pieces(self, prime: str, *, seed: int | None, num_samples: int, **options):
        vocab = self.vocab
        context = vocab.encode(prime if prime or "\n" not in vocab.chars else "\n")
        key = jax.random.key(secrets.randbits(31) if seed is None else seed)
        yield [prime] * num_samples
        for tokens in generate(
            self.params, self.config, context, key=key, num_samples=num_samples, **options
        ):
            yield [vocab.decode(row) for row in tokens]


def sample_stream(
    checkpoint: str | os.PathLike | None = None, *, prime: str = "", **options
) -> Iterator[list[str]]:
    """`Sampler.load(checkpoint).stream(prime, **options)`: load the model and stream."""
    return Sampler.load(checkpoint).stream(prime, **options)


def sample(checkpoint: str | os.PathLike | None = None, **options) -> list[str]:
    """The whole of each sample (prime included); options as for `sample_stream`."""
    texts: list[str] = []
    for pieces in sample_stream(checkpoint, **options):
        texts = [a + b for a, b in zip(texts, pieces)] if texts else pieces
    return texts
