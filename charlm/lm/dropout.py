"""Dropout masks for training a recurrent language model on a small corpus.

All masks of one training step are drawn at once from the step's key (`dropout_masks`), before
the model runs, so that a mask spans the whole window however the window is cut into chunks of
time, and a resumed run draws the same masks as an uninterrupted one. A mask holds 0 where a
unit is dropped and 1/keep elsewhere (inverted dropout: the model is used unchanged at test
time). The four kinds follow AWD-LSTM (Merity et al. 2018, "Regularizing and Optimizing LSTM
Language Models"):

- embedding dropout drops whole characters: a dropped character's embedding row is zero for the
  whole step (Gal & Ghahramani 2016, section 4.2);
- input dropout and (layer) dropout are variational, or locked: one mask per stream for all
  time steps, on the first layer's input and on every layer's output, the last one included
  (the head's input) (Gal & Ghahramani 2016, "A Theoretically Grounded Application of Dropout
  in Recurrent Neural Networks");
- weight drop is DropConnect (Wan et al. 2013) on each layer's recurrent matrix W_h, one mask per
  step shared by every stream and time step, applied once outside the recurrence's scan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from charlm.lm.config import ModelConfig


# The ModelConfig fields that are dropout rates.
DROPOUTS = ("dropout", "input_dropout", "embed_dropout", "weight_drop")


class DropoutMasks(NamedTuple):
    """The masks of one step; an entry is None where that dropout is off."""

    embed: jax.Array | None  # (vocab, 1): whole characters
    inputs: jax.Array | None  # (batch, embed): the first layer's input, locked over time
    outputs: tuple[jax.Array | None, ...]  # per layer (batch, hidden), locked over time
    w_h: tuple[jax.Array | None, ...]  # per layer (hidden, gates·hidden)


def is_regularised(config: ModelConfig) -> bool:
    """Whether training this model draws dropout masks at all."""
    return any(getattr(config, name) > 0 for name in DROPOUTS)


def _mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array | None:
    if rate == 0:
        return None
    keep = 1.0 - rate
    return jnp.where(jax.random.bernoulli(key, keep, shape), 1.0 / keep, 0.0).astype(jnp.float32)


def dropout_masks(key: jax.Array, config: ModelConfig, batch_size: int) -> DropoutMasks:
    """Every mask of one training step of `batch_size` streams, drawn from `key`."""
    hidden = config.hidden_size
    keys = jax.random.split(key, 2 + 2 * config.layers)
    return DropoutMasks(
        embed=_mask(keys[0], config.embed_dropout, (config.vocab_size, 1)),
        inputs=_mask(keys[1], config.input_dropout, (batch_size, config.embed_size)),
        outputs=tuple(
            _mask(keys[2 + n], config.dropout, (batch_size, hidden)) for n in range(config.layers)
        ),
        w_h=tuple(
            _mask(keys[2 + config.layers + n], config.weight_drop, (hidden, config.gates * hidden))
            for n in range(config.layers)
        ),
    )


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x with `mask` applied; a locked (batch, features) mask broadcasts over x's time axis."""
    return x if mask is None else x * mask.astype(x.dtype)
