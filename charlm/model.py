"""The model: character embedding, stacked recurrent layers (LSTM, GRU or Elman RNN), linear head.

Parameters are a plain pytree and every function here is pure. The model's shape is a
`ModelConfig`, passed as a static argument (it is hashable, so `jax.jit` specialises on it);
`functools.partial(apply, config=config)` is the `apply(params, tokens, state)` of a given
shape. A batch is (batch, time) with
the batch axis first everywhere, hidden state included, so data parallelism shards axis 0.
Inside a layer the input projection for all time steps is one matmul; only the recurrent
matmul runs inside the `jax.lax.scan` over time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
LayerState = tuple[jax.Array, ...]
State = tuple[LayerState, ...]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a model; `dropout` applies to the outputs of every layer but the last."""

    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden_size: int = 256
    embed_size: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if min(self.vocab_size, self.layers, self.hidden_size, self.embed_size) < 1:
            raise ValueError("vocab_size, layers, hidden_size and embed_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def lstm_cell(layer: Params, state: LayerState, x_proj: jax.Array) -> tuple[LayerState, jax.Array]:
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.
    2000). With x̃ = x W_x + b precomputed for all time steps:

        i, f, g, o = split(x̃ + h W_h)
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
        h' = σ(o) ⊙ tanh(c')
    """
    h, c = state
    i, f, g, o = jnp.split(x_proj + h @ layer["w_h"], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def gru_cell(layer: Params, state: LayerState, x_proj: jax.Array) -> tuple[LayerState, jax.Array]:
    """Gated recurrent unit (Cho et al. 2014), in the form cuDNN and PyTorch use. With
    x̃_r, x̃_z, x̃_n = split(x W_x + b) precomputed and a_r, a_z, a_n = split(h W_h):

        r = σ(x̃_r + a_r)
        z = σ(x̃_z + a_z)
        n = tanh(x̃_n + r ⊙ (a_n + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h
    """
    (h,) = state
    xr, xz, xn = jnp.split(x_proj, 3, axis=-1)
    ar, az, an = jnp.split(h @ layer["w_h"], 3, axis=-1)
    r = jax.nn.sigmoid(xr + ar)
    z = jax.nn.sigmoid(xz + az)
    n = jnp.tanh(xn + r * (an + layer["b_hn"]))
    h = (1.0 - z) * n + z * h
    return (h,), h


def rnn_cell(layer: Params, state: LayerState, x_proj: jax.Array) -> tuple[LayerState, jax.Array]:
    """Elman recurrent network (Elman 1990) with tanh. With x̃ = x W_x + b precomputed:

    h' = tanh(x̃ + h W_h)
    """
    (h,) = state
    h = jnp.tanh(x_proj + h @ layer["w_h"])
    return (h,), h


Cell = Callable[[Params, LayerState, jax.Array], tuple[LayerState, jax.Array]]
CELLS: dict[str, Cell] = {"lstm": lstm_cell, "gru": gru_cell, "rnn": rnn_cell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
STATE_PARTS = {"lstm": 2, "gru": 1, "rnn": 1}


def init(key: jax.Array, config: ModelConfig) -> Params:
    """Random parameters: weights uniform in ±1/√hidden as in PyTorch, embedding N(0, 1),
    LSTM forget-gate bias 1 (Jozefowicz et al. 2015), other biases 0."""
    hidden, gates = config.hidden_size, GATES[config.cell]
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
    return {
        "embed": jax.random.normal(keys[-2], (config.vocab_size, config.embed_size), jnp.float32),
        "layers": layers,
        "head": {
            "w": uniform(keys[-1], (hidden, config.vocab_size)),
            "b": jnp.zeros(config.vocab_size, jnp.float32),
        },
    }


def initial_state(config: ModelConfig, batch_size: int) -> State:
    """The all-zero hidden state: per layer, (h, c) for an LSTM and (h,) otherwise, each (batch, hidden)."""
    shape = (batch_size, config.hidden_size)
    return tuple(
        tuple(jnp.zeros(shape, jnp.float32) for _ in range(STATE_PARTS[config.cell]))
        for _ in range(config.layers)
    )


def run_layer(
    cell: Cell, layer: Params, inputs: jax.Array, state: LayerState
) -> tuple[jax.Array, LayerState]:
    """One recurrent layer over a (batch, time, features) input: outputs (batch, time, hidden)."""
    x_proj = inputs @ layer["w_x"] + layer["b"]

    def step(carry: LayerState, x_t: jax.Array) -> tuple[LayerState, jax.Array]:
        return cell(layer, carry, x_t)

    state, outputs = jax.lax.scan(step, state, jnp.swapaxes(x_proj, 0, 1))
    return jnp.swapaxes(outputs, 0, 1), state


def apply(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, State]:
    """Logits (batch, time, vocab) for integer tokens (batch, time), and the state after them.

    Dropout (Zaremba et al. 2014: between layers, never on the recurrence) is applied only when
    `dropout_key` is given.
    """
    cell = CELLS[config.cell]
    x = params["embed"][tokens]
    new_state = []
    for n, (layer, layer_state) in enumerate(zip(params["layers"], state)):
        x, layer_state = run_layer(cell, layer, x, layer_state)
        new_state.append(layer_state)
        if dropout_key is not None and config.dropout > 0 and n < config.layers - 1:
            keep = 1.0 - config.dropout
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, n), keep, x.shape)
            x = jnp.where(mask, x / keep, 0.0)
    logits = x @ params["head"]["w"] + params["head"]["b"]
    return logits, tuple(new_state)
