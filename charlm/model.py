"""The model: character embedding, stacked recurrent layers (LSTM, GRU or Elman RNN), linear head.

Parameters are a plain pytree and every function here is pure. The model's shape is a
`ModelConfig`, passed as a static argument (it is hashable, so `jax.jit` specialises on it);
`functools.partial(apply, config=config)` is the `apply(params, tokens, state)` of a given
shape. `apply` takes and returns (batch, time) arrays, batch axis first, hidden state
(batch, hidden) included, so data parallelism shards axis 0; inside, `forward` runs time-major,
as the scan does. In a layer the input projection for all time steps is one matmul; only the
recurrent matmul runs inside the `jax.lax.scan` over time, whose gradient is hand-written
(`recurrence`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if min(self.vocab_size, self.layers, self.hidden_size, self.embed_size) < 1:
            raise ValueError("vocab_size, layers, hidden_size and embed_size must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def lstm_cell(
    state: LayerState, x_proj: jax.Array, h_proj: jax.Array
) -> tuple[LayerState, jax.Array]:
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.
    2000). With x̃ = x W_x + b precomputed for all time steps and h̃ = h W_h:

        i, f, g, o = split(x̃ + h̃)
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
        h' = σ(o) ⊙ tanh(c')
    """
    state, out, _ = _lstm_cell_saving_gates(state, x_proj, h_proj)
    return state, out


def _lstm_cell_saving_gates(
    state: LayerState, x_proj: jax.Array, h_proj: jax.Array
) -> tuple[LayerState, jax.Array, tuple[jax.Array, ...]]:
    """`lstm_cell`, and its activated gates σ(i), σ(f), tanh(g), σ(o) for `_lstm_cell_gradient`:
    four arrays, because XLA on CPU reads a gate's columns out of one saved (time, batch,
    4·hidden) array several times slower than a whole array."""
    i, f, g, o = jnp.split(_lstm_activations(x_proj + h_proj), 4, axis=-1)
    c = f * state[1] + i * g
    h = o * jnp.tanh(c)
    return (h, c), h, (i, f, g, o)


def _lstm_cell_gradient(state, gates, d_state, d_out):
    """The cotangents of `lstm_cell`'s input state (less the path through h̃) and of its
    pre-activations x̃ + h̃, from the activated gates the forward pass saved. Autodiff would
    recompute the gates' activations, a tanh over four times the hidden size, in every step;
    here the derivatives are σ' = σ(1 − σ) and tanh' = 1 − tanh² of the saved values."""
    c_prev = state[1]
    i, f, g, o = gates
    tanh_c = jnp.tanh(f * c_prev + i * g)
    d_h = d_state[0] + d_out
    d_c = d_state[1] + d_h * o * (1.0 - tanh_c * tanh_c)
    d_gates = jnp.concatenate(
        [
            d_c * g * i * (1.0 - i),
            d_c * c_prev * f * (1.0 - f),
            d_c * i * (1.0 - g * g),
            d_h * tanh_c * o * (1.0 - o),
        ],
        axis=-1,
    )
    # h enters the next step only through h̃, whose cotangent the caller adds: none here.
    return (jnp.zeros_like(d_h), d_c * f), d_gates, d_gates


def _lstm_activations(gates: jax.Array) -> jax.Array:
    """σ on the i, f, o gates and tanh on g, as one tanh over all of them: σ(x) = (1 + tanh(x/2))/2.
    XLA on CPU runs this about four times faster than four activations on four slices."""
    hidden = gates.shape[-1] // 4
    half = jnp.full(4 * hidden, 0.5, gates.dtype).at[2 * hidden : 3 * hidden].set(1.0)
    return jnp.tanh(gates * half) * half + (1.0 - half)


def gru_cell(
    state: LayerState, x_proj: jax.Array, h_proj: jax.Array
) -> tuple[LayerState, jax.Array]:
    """Gated recurrent unit (Cho et al. 2014), in the form cuDNN and PyTorch use. With
    x̃_r, x̃_z, x̃_n = split(x W_x + b) precomputed and a_r, a_z, a_n = split(h W_h + (0, 0, b_hn)):

        r = σ(x̃_r + a_r)
        z = σ(x̃_z + a_z)
        n = tanh(x̃_n + r ⊙ a_n)
        h' = (1 − z) ⊙ n + z ⊙ h
    """
    (h,) = state
    xr, xz, xn = jnp.split(x_proj, 3, axis=-1)
    ar, az, an = jnp.split(h_proj, 3, axis=-1)
    r = jax.nn.sigmoid(xr + ar)
    z = jax.nn.sigmoid(xz + az)
    n = jnp.tanh(xn + r * an)
    h = (1.0 - z) * n + z * h
    return (h,), h


def rnn_cell(
    state: LayerState, x_proj: jax.Array, h_proj: jax.Array
) -> tuple[LayerState, jax.Array]:
    """Elman recurrent network (Elman 1990) with tanh. With x̃ = x W_x + b precomputed and
    h̃ = h W_h:

    h' = tanh(x̃ + h̃)
    """
    h = jnp.tanh(x_proj + h_proj)
    return (h,), h


Cell = Callable[[LayerState, jax.Array, jax.Array], tuple[LayerState, jax.Array]]
CELLS: dict[str, Cell] = {"lstm": lstm_cell, "gru": gru_cell, "rnn": rnn_cell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
STATE_PARTS = {"lstm": 2, "gru": 1, "rnn": 1}
# The operand type of every matmul; None keeps the parameters' own (float32, or float64 in tests).
PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def for_one_stream(config: ModelConfig) -> ModelConfig:
    """The config to run one stream or one character at a time with (evaluation, sampling):
    float32, whatever the training precision, because there every recurrent step is a
    matrix-vector product, and there bfloat16 is 2–3× slower on CPU."""
    return dataclasses.replace(config, precision="float32")


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


def _dot(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """a @ b; with `dtype` (bfloat16) the operands are rounded to it and the product is
    accumulated in float32, otherwise it is the plain product in the inputs' type."""
    if dtype is None:
        return jnp.dot(a, b)
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _transposed(x: jax.Array) -> jax.Array:
    """The transpose of a matrix, written out row-major. XLA folds a plain transpose into the
    dot that consumes it, and on CPU runs that transposed product 1.2× (float32) to 2.5×
    (bfloat16, which it then computes in float32) slower than x @ w; a transpose taken through
    a 3-D view is not folded."""
    rows, columns = x.shape
    return jnp.swapaxes(x[..., None], 0, 2).reshape(columns, rows)


def _weight_gradient(x: jax.Array, d_y: jax.Array, dtype: Any) -> jax.Array:
    """∂W of y = x W: xᵀ d_y summed over every leading axis of x and d_y, as one matmul."""
    x, d_y = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
    return _dot(_transposed(x), d_y, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w over the last axis of x, with operands in `dtype` (see `_dot`) in the forward and
    the backward products alike (mixed-precision training, Micikevicius et al. 2018; Kalamkar
    et al. 2019 for bfloat16). The gradient is hand-written so that its two products,
    d_y Wᵀ and xᵀ d_y, take row-major operands (`_transposed`)."""
    return _dot(x, w, dtype)


def _matmul_fwd(x, w, dtype):
    return _dot(x, w, dtype), (x, w)


def _matmul_bwd(dtype, residuals, d_y):
    x, w = residuals
    d_x = _dot(d_y, _transposed(w), dtype)
    return d_x.astype(x.dtype), _weight_gradient(x, d_y, dtype).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _rounded(w: jax.Array, dtype: Any) -> jax.Array:
    """w in `dtype` when one is given: a weight used in every step is rounded once, outside."""
    return w if dtype is None else w.astype(dtype)


def _scan(cell, dtype, w_h, x_bias, h_bias, x_proj, state, keep_residuals: bool):
    """The recurrence over time-major x_proj (time, batch, gates·hidden). With `keep_residuals`
    it also returns, per time step, the state before the step and what `_cell_saving` saves."""
    w_h = _rounded(w_h, dtype)

    def step(carry: LayerState, x_t: jax.Array):
        h_proj = matmul(carry[0], w_h, dtype)
        if h_bias is not None:
            h_proj = h_proj + h_bias
        if not keep_residuals:
            return cell(carry, x_t + x_bias, h_proj)
        new_carry, out, saved = _cell_saving(cell)(carry, x_t + x_bias, h_proj)
        return new_carry, (out, carry, saved)

    # One step (sampling) as straight-line code: a one-trip loop still costs a loop per layer.
    # Training's forward runs two steps per trip: on CPU that trains S 7–12% faster and leaves M
    # as it was, where the backward scan and one-stream evaluation measured slower unrolled.
    unroll = True if x_proj.shape[0] == 1 else 2 if keep_residuals else 1
    return jax.lax.scan(step, state, x_proj, unroll=unroll)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(
    cell: Cell,
    dtype: Any,
    w_h: jax.Array,
    x_bias: jax.Array,
    h_bias: jax.Array | None,
    x_proj: jax.Array,
    state: LayerState,
) -> tuple[LayerState, jax.Array]:
    """The final state and the outputs (time, batch, hidden) of `cell` run over time-major
    x̃ = `x_proj` + `x_bias` with h̃ = h W_h + `h_bias`; the recurrent matmul's operands are in
    `dtype`. The biases are added inside the step, where they cost no pass over memory.

    Its gradient is hand-written: the reverse scan does only the recurrent matmul dh̃ W_hᵀ per
    step, and ∂W_h is one matmul over all time steps after it, where autodiff of the scan would
    accumulate a (hidden, gates·hidden) product every step."""
    return _scan(cell, dtype, w_h, x_bias, h_bias, x_proj, state, keep_residuals=False)


def _cell_saving(cell: Cell):
    """`cell` that also returns what its gradient in `_cell_gradient` needs: h̃ in general, the
    activated gates for the LSTM."""
    if cell is lstm_cell:
        return _lstm_cell_saving_gates

    def saving_h_proj(state, x_proj, h_proj):
        return *cell(state, x_proj, h_proj), h_proj

    return saving_h_proj


def _cell_gradient(cell: Cell, state, x_proj, saved, d_state, d_out):
    """The cotangents of the cell's input state (less the path through h̃), x̃ and h̃, from the
    state before the step, x̃ and what `_cell_saving` saved; by autodiff unless hand-written."""
    if cell is lstm_cell:
        return _lstm_cell_gradient(state, saved, d_state, d_out)
    _, cell_vjp = jax.vjp(cell, state, x_proj, saved)
    return cell_vjp((d_state, d_out))


def _recurrence_fwd(cell, dtype, w_h, x_bias, h_bias, x_proj, state):
    final, (outputs, previous, saved) = _scan(
        cell, dtype, w_h, x_bias, h_bias, x_proj, state, keep_residuals=True
    )
    return (final, outputs), (w_h, x_bias, h_bias, x_proj, previous, saved)


def _recurrence_bwd(cell, dtype, residuals, cotangents):
    w_h, x_bias, h_bias, x_proj, previous, saved = residuals
    d_final, d_outputs = cotangents
    # Transposed (and rounded) once here: a transposed operand makes the per-step matmul slower.
    w_h_t = _rounded(_transposed(w_h), dtype)

    def step(d_state: LayerState, per_step):
        state_t, x_t, saved_t, d_out_t = per_step
        d_state_t, d_x_t, d_h_proj_t = _cell_gradient(
            cell, state_t, x_t + x_bias, saved_t, d_state, d_out_t
        )
        d_h = d_state_t[0] + _dot(d_h_proj_t, w_h_t, dtype)
        # Where x̃ and h̃ are only summed (LSTM, Elman) their cotangents are one array: keep one.
        outputs = (d_x_t,) if d_x_t is d_h_proj_t else (d_x_t, d_h_proj_t)
        return (d_h, *d_state_t[1:]), outputs

    d_initial, outputs = jax.lax.scan(
        step, d_final, (previous, x_proj, saved, d_outputs), reverse=True
    )
    d_x_proj, d_h_proj = outputs[0], outputs[-1]
    d_w_h = _weight_gradient(previous[0], d_h_proj, dtype).astype(w_h.dtype)
    d_x_bias = jnp.sum(d_x_proj, axis=(0, 1))
    d_h_bias = None if h_bias is None else jnp.sum(d_h_proj, axis=(0, 1))
    return d_w_h, d_x_bias, d_h_bias, d_x_proj, d_initial


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrent_bias(config: ModelConfig, layer: Params) -> jax.Array | None:
    """The bias added to h W_h: the GRU's b_hn on the n gate, none for the other cells."""
    if config.cell != "gru":
        return None
    zeros = jnp.zeros(2 * config.hidden_size, layer["b_hn"].dtype)
    return jnp.concatenate([zeros, layer["b_hn"]])


def run_layer(
    config: ModelConfig, layer: Params, x_proj: jax.Array, state: LayerState
) -> tuple[jax.Array, LayerState]:
    """One recurrent layer over its projected input x W_x (time, batch, gates·hidden): outputs
    (time, batch, hidden) and the final state."""
    dtype = PRECISIONS[config.precision]
    h_bias = recurrent_bias(config, layer)
    cell = CELLS[config.cell]
    state, outputs = recurrence(cell, dtype, layer["w_h"], layer["b"], h_bias, x_proj, state)
    return outputs, state


def embed_projection(params: Params, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """The first layer's input projection, embed[tokens] W_x, for integer tokens of any shape."""
    dtype = PRECISIONS[config.precision]
    embed, w_x = params["embed"], params["layers"][0]["w_x"]
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
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, State]:
    """The last layer's outputs (time, batch, hidden) for integer tokens (time, batch), the
    input of the head, and the state after them. Time-major, as the scan runs, so that no
    (time, batch, ·) activation is ever transposed.

    Dropout (Zaremba et al. 2014: between layers, never on the recurrence) is applied only when
    `dropout_key` is given.
    """
    dtype = PRECISIONS[config.precision]
    x = None
    new_state = []
    for n, (layer, layer_state) in enumerate(zip(params["layers"], state)):
        x_proj = (
            embed_projection(params, tokens, config) if n == 0 else matmul(x, layer["w_x"], dtype)
        )
        x, layer_state = run_layer(config, layer, x_proj, layer_state)
        new_state.append(layer_state)
        if dropout_key is not None and config.dropout > 0 and n < config.layers - 1:
            keep = 1.0 - config.dropout
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, n), keep, x.shape)
            x = jnp.where(mask, x / keep, 0.0)
    return x, tuple(new_state)


def forward(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, State]:
    """Logits (time, batch, vocab) for integer tokens (time, batch), and the state after them;
    `features` followed by the head."""
    x, state = features(params, tokens, state, config, dropout_key)
    logits = matmul(x, params["head"]["w"], PRECISIONS[config.precision]) + params["head"]["b"]
    return logits, state


# The most rows of logits that `head_loss` holds at a time: 512 × 4,000 characters is 8 MB.
LOSS_CHUNK = 512


def _head_loss_chunks(x, w, b, targets, dtype, with_gradients: bool):
    """The mean cross-entropy of x W + b against targets over all rows and, with
    `with_gradients`, its gradients with respect to x, W and b, a chunk of rows at a time."""
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets {targets.shape} do not match the rows of x {x.shape}")
    hidden, vocab = w.shape
    rows = targets.size
    x, targets = x.reshape(rows, hidden), targets.reshape(rows)
    # Equal chunks, so that padding stays under one row per chunk (3,200 rows: 7 × 458).
    chunks = -(-rows // LOSS_CHUNK)
    size = -(-rows // chunks)
    padding = chunks * size - rows
    x_chunks = jnp.pad(x, ((0, padding), (0, 0))).reshape(chunks, size, hidden)
    target_chunks = jnp.pad(targets, (0, padding)).reshape(chunks, size)
    loss_dtype = jnp.result_type(x.dtype, w.dtype, b.dtype)
    weight_chunks = (jnp.arange(chunks * size) < rows).astype(loss_dtype).reshape(chunks, size)
    weight_chunks = weight_chunks / rows
    w_rounded = _rounded(w, dtype)
    w_t = _rounded(_transposed(w), dtype)

    def chunk(totals, inputs):
        x_c, targets_c, weights_c = inputs
        logits = _dot(x_c, w_rounded, dtype) + b
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets_c[:, None], axis=-1)[:, 0]
        loss = totals[0] + jnp.sum(weights_c * (log_z - picked))
        if not with_gradients:
            return (loss,), None
        d_logits = jnp.exp(logits - log_z[:, None]) - jax.nn.one_hot(targets_c, vocab)
        d_logits = d_logits * weights_c[:, None]
        d_w = totals[1] + _weight_gradient(x_c, d_logits, dtype)
        d_b = totals[2] + jnp.sum(d_logits, axis=0)
        return (loss, d_w, d_b), _dot(d_logits, w_t, dtype)

    zero = jnp.zeros((), loss_dtype)
    totals = (zero, jnp.zeros_like(w), jnp.zeros_like(b)) if with_gradients else (zero,)
    totals, d_x = jax.lax.scan(chunk, totals, (x_chunks, target_chunks, weight_chunks))
    if not with_gradients:
        return totals[0]
    d_x = d_x.reshape(chunks * size, hidden)[:rows]
    return totals[0], (d_x, *totals[1:])


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_loss(
    x: jax.Array, w: jax.Array, b: jax.Array, targets: jax.Array, dtype: Any
) -> jax.Array:
    """The mean cross-entropy, in nats, of the head's logits x W + b (operands in `dtype`, as in
    `matmul`) against integer `targets`, over every leading axis of x (…, hidden) and targets.

    No (rows, vocabulary) array is ever whole: the logits are made and consumed at most
    `LOSS_CHUNK` rows at a time. The loss ends the graph, so its gradients are computed in the
    forward pass, in the same chunks, and the backward pass only scales them. A training step on
    三国演义 (4,000 characters) otherwise keeps four logits-sized arrays of 48 MB each."""
    return _head_loss_chunks(x, w, b, targets, dtype, with_gradients=False)


def _head_loss_fwd(x, w, b, targets, dtype):
    loss, gradients = _head_loss_chunks(x, w, b, targets, dtype, with_gradients=True)
    return loss, (gradients, x.shape)


def _head_loss_bwd(dtype, residuals, d_loss):
    (d_x, d_w, d_b), x_shape = residuals
    return (d_loss * d_x).reshape(x_shape), d_loss * d_w, d_loss * d_b, None


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def apply(
    params: Params,
    tokens: jax.Array,
    state: State,
    config: ModelConfig,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, State]:
    """Logits (batch, time, vocab) for integer tokens (batch, time), and the state after them:
    `forward` with the batch axis first."""
    logits, state = forward(params, jnp.swapaxes(tokens, 0, 1), state, config, dropout_key)
    return jnp.swapaxes(logits, 0, 1), state
