"""The recurrent cells (LSTM, GRU, Elman RNN) and the scan over time that runs them.

A cell maps (state, x̃, h̃) to (new state, output), where x̃ = x W_x + b is precomputed for all
time steps and h̃ = h W_h is the only product inside the loop. `recurrence` is that loop, a
`jax.lax.scan`, with a hand-written gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from charlm.lm.matmul import dot, matmul, rounded, transposed, weight_gradient

LayerState = tuple[jax.Array, ...]


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


def _scan(cell, dtype, w_h, x_bias, h_bias, x_proj, state, keep_residuals: bool):
    """The recurrence over time-major x_proj (time, batch, gates·hidden). With `keep_residuals`
    it also returns, per time step, the state before the step and what `_cell_saving` saves."""
    w_h = rounded(w_h, dtype)

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
    w_h_t = rounded(transposed(w_h), dtype)

    def step(d_state: LayerState, per_step):
        state_t, x_t, saved_t, d_out_t = per_step
        d_state_t, d_x_t, d_h_proj_t = _cell_gradient(
            cell, state_t, x_t + x_bias, saved_t, d_state, d_out_t
        )
        d_h = d_state_t[0] + dot(d_h_proj_t, w_h_t, dtype)
        # Where x̃ and h̃ are only summed (LSTM, Elman) their cotangents are one array: keep one.
        outputs = (d_x_t,) if d_x_t is d_h_proj_t else (d_x_t, d_h_proj_t)
        return (d_h, *d_state_t[1:]), outputs

    d_initial, outputs = jax.lax.scan(
        step, d_final, (previous, x_proj, saved, d_outputs), reverse=True
    )
    d_x_proj, d_h_proj = outputs[0], outputs[-1]
    d_w_h = weight_gradient(previous[0], d_h_proj, dtype).astype(w_h.dtype)
    d_x_bias = jnp.sum(d_x_proj, axis=(0, 1))
    d_h_bias = None if h_bias is None else jnp.sum(d_h_proj, axis=(0, 1))
    return d_w_h, d_x_bias, d_h_bias, d_x_proj, d_initial


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
