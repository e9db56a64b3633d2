"""The model: character embedding, stacked recurrent layers (LSTM, GRU or Elman RNN), linear head.

Parameters are a plain pytree and every function here is pure. The model's shape is a
`ModelConfig`, passed as a static argument (it is hashable, so `jax.jit` specialises on it);
`functools.partial(apply, config=config)` is the `apply(params, tokens, state)` of a given
shape. `apply` takes and returns (batch, time) arrays, batch axis first, hidden state
(batch, hidden) included, so data parallelism shards axis 0; inside, `forward` runs time-major,
as the scan does. In a layer the input projection for all time steps is one matmul; only the
recurrent matmul runs inside the `jax.lax.scan` over time, whose gradient is hand-written
(`charlm.lm.recurrence`). The matmuls are `charlm.lm.matmul`'; the training loss is
`charlm.lm.loss.head_loss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from charlm.lm.config import ModelConfig
from charlm.lm.dropout import DropoutMasks, apply_mask
from charlm.lm.matmul import matmul, transposed
from charlm.lm.recurrence import CELLS, STATE_PARTS, LayerState, recurrence

Params = dict[str, Any]
State = tuple[LayerState, ...]


def for_one_stream(config: ModelConfig) -> ModelConfig:
    """The config to run one stream or one character at a time with (evaluation, sampling):
    float32, whatever the training precision, because there every recurrent step is a
    matrix-vector product, and there bfloat16 is 2–3× slower on CPU."""
    return dataclasses.replace(config, precision="float32")


def init(key: jax.Array, config: ModelConfig) -> Params:
    """Random parameters: weights uniform in ±1/√hidden as in PyTorch, LSTM forget-gate bias 1
    (Jozefowicz et al. 2015), other biases 0. The embedding is N(0, 1), or N(0, 1/embed) when
    it is also the head's weight, which keeps the first logits near 0 as an untied head's are.
    A tied head has only its bias, and a projection `proj` (hidden, embed) when the sizes differ."""
    hidden, gates = config.hidden_size, config.gates
    bound = hidden**-0.5
    keys = jax.random.split(key, 2 * config.layers + 2)

    def uniform(k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    layers = []
    for n in range(config.layers):
        fan_in = config.embed_size if n == 0 else hidden
        bias = jnp.zeros(gates * hidden, jnp.float32)
        if config.cell == "lstm":
            bias = bias.at[hidden : 2 * hidden].set(1.0)
        layer = {
            "w_x": uniform(keys[2 * n], (fan_in, gates * hidden)),
            "w_h": uniform(keys[2 * n + 1], (hidden, gates * hidden)),
            "b": bias,
        }
        if config.cell == "gru":
            layer["b_hn"] = jnp.zeros(hidden, jnp.float32)
        layers.append(layer)
    embed_shape = (config.vocab_size, config.embed_size)
    embed = jax.random.normal(keys[-2], embed_shape, jnp.float32)
    head = {"b": jnp.zeros(config.vocab_size, jnp.float32)}
    if not config.tie_embeddings:
        head["w"] = uniform(keys[-1], (hidden, config.vocab_size))
    else:
        embed = embed * config.embed_size**-0.5
        if config.embed_size != hidden:
            head["proj"] = uniform(keys[-1], (hidden, config.embed_size))
    return {"embed": embed, "layers": layers, "head": head}


def head_weight(params: Params, config: ModelConfig) -> jax.Array:
    """The head's weight (hidden, vocab): its own, or the transposed embedding when tied (after
    the projection, if any). Made once per call, outside any loop over time."""
    head = params["head"]
    if not config.tie_embeddings:
        return head["w"]
    embed_t = transposed(params["embed"])
    return embed_t if "proj" not in head else head["proj"] @ embed_t


def initial_state(config: ModelConfig, batch_size: int) -> State:
    """The all-zero hidden state: per layer, (h, c) for an LSTM and (h,) otherwise, each (batch, hidden)."""
    shape = (batch_size, config.hidden_size)
    return tuple(
        tuple(jnp.zeros(shape, jnp.float32) for _ in range(STATE_PARTS[config.cell]))
        for _ in range(config.layers)
    )


def recurrent_bias(config: ModelConfig, layer: Params) -> jax.Array | None:
    """The bias added to h W_h: the GRU's b_hn on the n gate, none for the other cells."""
    if config.cell != "gru":
        return None
    zeros = jnp.zeros(2 * config.hidden_size, layer["b_hn"].dtype)
    return jnp.concatenate([zeros, layer["b_hn"]])


def run_layer(
    config: ModelConfig,
    layer: Params,
    x_proj: jax.Array,
    state: LayerState,
    w_h_mask: jax.Array | None = None,
) -> tuple[jax.Array, LayerState]:
    """One recurrent layer over its projected input x W_x (time, batch, gates·hidden): outputs
    (time, batch, hidden) and the final state. A weight-drop mask applies to W_h once, here."""
    dtype = config.dtype
    h_bias = recurrent_bias(config, layer)
    cell = CELLS[config.cell]
    w_h = apply_mask(layer["w_h"], w_h_mask)
    state, outputs = recurrence(cell, dtype, w_h, layer["b"], h_bias, x_proj, state)
    return outputs, state


def embed_projection(
    params: Params,
    tokens: jax.Array,
    config: ModelConfig,
    masks: DropoutMasks | None = None,
) -> jax.Array:
    """The first layer's input projection, embed[tokens] W_x, for integer tokens of any shape
    ((time, batch) when `masks` are given), with embedding and input dropout from `masks`."""
    dtype = config.dtype
    embed, w_x = params["embed"], params["layers"][0]["w_x"]
    if masks is not None:
        embed = apply_mask(embed, masks.embed)
        if masks.inputs is not None:
            return matmul(apply_mask(embed[tokens], masks.inputs), w_x, dtype)
    if config.vocab_size <= tokens.size:
        # Projecting the embedding table and gathering its rows is cheaper than projecting
        # every gathered row, and far cheaper to differentiate.
        return matmul(embed, w_x, dtype)[tokens]
    return matmul(embed[tokens], w_x, dtype)


def features(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    masks: DropoutMasks | None = None,
) -> tuple[jax.Array, State]:
    """The last layer's outputs (time, batch, hidden) for integer tokens (time, batch), the
    input of the head, and the state after them. Time-major, as the scan runs, so that no
    (time, batch, ·) activation is ever transposed. Dropout applies only when `masks` are given
    (training; `charlm.lm.dropout.dropout_masks`), never to the carried state.
    """
    dtype = config.dtype
    x = None
    new_state = []
    for n, (layer, layer_state) in enumerate(zip(params["layers"], state)):
        if n == 0:
            x_proj = embed_projection(params, tokens, config, masks)
        else:
            x_proj = matmul(x, layer["w_x"], dtype)
        w_h_mask = None if masks is None else masks.w_h[n]
        x, layer_state = run_layer(config, layer, x_proj, layer_state, w_h_mask)
        new_state.append(layer_state)
        if masks is not None:
            x = apply_mask(x, masks.outputs[n])
    assert x is not None  # a model has at least one layer
    return x, tuple(new_state)


def forward(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    masks: DropoutMasks | None = None,
) -> tuple[jax.Array, State]:
    """Logits (time, batch, vocab) for integer tokens (time, batch), and the state after them;
    `features` followed by the head."""
    x, state = features(params, tokens, state, config, masks)
    w = head_weight(params, config)
    logits = matmul(x, w, config.dtype) + params["head"]["b"]
    return logits, state


def apply(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    masks: DropoutMasks | None = None,
) -> tuple[jax.Array, State]:
    """Logits (batch, time, vocab) for integer tokens (batch, time), and the state after them:
    `forward` with the batch axis first."""
    logits, state = forward(params, jnp.swapaxes(tokens, 0, 1), state, config, masks)
    return jnp.swapaxes(logits, 0, 1), state
