"""Dynamic evaluation: the weights adapt to the text by gradient steps while it is read.

Krause, Kahembwe, Murray & Renals 2018, "Dynamic Evaluation of Neural Sequence Models", ICML
(arXiv:1709.07432), section 5, their improvements on earlier dynamic evaluation. The text, one
stream with the hidden state carried as in static evaluation, is cut into segments s_1, s_2, …
of `segment_len` characters. Segment s_i is first scored with the current weights θ_{i−1} (that
score counts), then the weights take one step on the same segment's loss L(s_i), the mean
cross-entropy of its characters:

    θ_i = θ_{i−1} − η ∇L(s_i) + λ (θ_0 − θ_{i−1})

the paper's stochastic-gradient update with a decay λ toward the trained weights θ_0 (its
"global prior"). λ = 0 is the plain dynamic evaluation of Mikolov et al. (2010); η = 0 leaves
θ_0 in place and gives the static score. The gradient is backpropagated through the segment
only: the state it starts from, carried from the previous segment, is a constant. The state
carried on is the one from the segment's forward pass with θ_{i−1}, as in the paper's code.

The paper's RMS rule, which divides each weight's step by the root mean square of its gradient
measured on the training data, θ_i = θ_{i−1} − η ∇L(s_i) / (√MS_g + ε) + λ (θ_0 − θ_{i−1}) ⊙
RMS_norm, is not implemented: it needs the training corpus at evaluation time and a pass over it.

The loop runs on the device: one compiled call scans `chunk_size // segment_len` segments,
carrying the weights and the state, and the per-call sums of nats are fetched once, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.evaluation import PerCharacter

DEFAULT_LR = 0.05
DEFAULT_DECAY = 0.0
DEFAULT_SEGMENT_LEN = 50


@dataclass(frozen=True)
class DynamicEvaluation:
    """The settings of dynamic evaluation: step size η (`lr`), decay λ toward the trained
    weights per segment (`decay`), and characters per segment (`segment_len`)."""

    lr: float = DEFAULT_LR
    decay: float = DEFAULT_DECAY
    segment_len: int = DEFAULT_SEGMENT_LEN

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise CharlmError(f"--dynamic-lr must be a number ≥ 0, got {self.lr}")
        if not 0 <= self.decay <= 1:
            raise CharlmError(f"--dynamic-decay must be between 0 and 1, got {self.decay}")
        if self.segment_len < 1:
            raise CharlmError(f"--segment-len must be at least 1, got {self.segment_len}")

    def describe(self) -> str:
        """One line naming the settings, as the CLI prints them."""
        return (
            f"dynamic evaluation (η={self.lr:g}, λ={self.decay:g}, segments of {self.segment_len})"
        )


@dataclass(frozen=True)
class DynamicScore(PerCharacter):
    """The dynamic-evaluation score of a model on a text, and the settings it was scored with."""

    nats_per_char: float
    settings: DynamicEvaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "nats_per_char": self.nats_per_char,
            "bits_per_char": self.bits_per_char,
            "perplexity": self.perplexity,
            "lr": self.settings.lr,
            "decay": self.settings.decay,
            "segment_len": self.settings.segment_len,
        }


def _segment_loss(
    params: model.Params,
    state: model.State,
    inputs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    config: model.ModelConfig,
) -> tuple[jax.Array, tuple[jax.Array, model.State]]:
    """The mean cross-entropy of one segment (what the step descends), and its summed nats (what
    is scored) and the state after it as auxiliaries."""
    logits, state = model.forward(params, inputs[:, None], state, config)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits[:, 0], targets)
    nats = jnp.where(mask, nats, 0.0)
    total = jnp.sum(nats)
    return total / jnp.maximum(jnp.sum(mask), 1), (total, state)


@partial(jax.jit, static_argnames="config")
def _segments(
    params: model.Params,
    original: model.Params,
    state: model.State,
    inputs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    lr: jax.Array,
    decay: jax.Array,
    config: model.ModelConfig,
) -> tuple[model.Params, model.State, jax.Array]:
    """Score and then adapt on each segment of (segments, segment_len) inputs in turn: the
    weights and the state after the last, and the summed nats of all."""

    def segment(carry, xs):
        params, state = carry
        grads, (nats, state) = jax.grad(_segment_loss, has_aux=True)(params, state, *xs, config)
        params = jax.tree.map(
            lambda p, g, p0: p - lr * g + decay * (p0 - p), params, grads, original
        )
        return (params, state), nats

    (params, state), nats = jax.lax.scan(segment, (params, state), (inputs, targets, mask))
    return params, state, jnp.sum(nats)


def dynamic_nats(
    params: model.Params,
    config: model.ModelConfig,
    tokens: np.ndarray,
    settings: DynamicEvaluation,
    chunk_size: int,
) -> tuple[float, int]:
    """The summed cross-entropy (nats) of predicting tokens[1:] under dynamic evaluation, and
    how many tokens that is. `chunk_size` (characters per compiled call, rounded down to whole
    segments) bounds nothing but the work per call: the result does not depend on it."""
    count = len(tokens) - 1
    if count < 1:
        return 0.0, 0
    config = model.for_one_stream(config)
    length = settings.segment_len
    per_call = max(1, chunk_size // length)
    block = per_call * length
    padded = -(-count // block) * block
    shape = (padded // block, per_call, length)
    flat_inputs = np.zeros(padded, np.int32)
    flat_targets = np.zeros(padded, np.int32)
    flat_inputs[:count] = tokens[:-1]
    flat_targets[:count] = tokens[1:]
    inputs, targets = flat_inputs.reshape(shape), flat_targets.reshape(shape)
    mask = (np.arange(padded) < count).reshape(shape)
    lr = jnp.float32(settings.lr)
    decay = jnp.float32(settings.decay)
    original = params
    state = model.initial_state(config, 1)
    sums = []
    for n in range(shape[0]):
        params, state, nats = _segments(
            params, original, state, inputs[n], targets[n], mask[n], lr, decay, config
        )
        sums.append(nats)
    return float(np.sum(np.asarray(jax.device_get(sums), np.float64))), count
