"""The training loss: the head's cross-entropy, made a chunk of rows at a time."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from charlm.lm.matmul import dot, rounded, transposed, weight_gradient

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
    w_rounded = rounded(w, dtype)
    w_t = rounded(transposed(w), dtype)

    def chunk(totals, inputs):
        x_c, targets_c, weights_c = inputs
        logits = dot(x_c, w_rounded, dtype) + b
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets_c[:, None], axis=-1)[:, 0]
        loss = totals[0] + jnp.sum(weights_c * (log_z - picked))
        if not with_gradients:
            return (loss,), None
        d_logits = jnp.exp(logits - log_z[:, None]) - jax.nn.one_hot(targets_c, vocab)
        d_logits = d_logits * weights_c[:, None]
        d_w = totals[1] + weight_gradient(x_c, d_logits, dtype)
        d_b = totals[2] + jnp.sum(d_logits, axis=0)
        return (loss, d_w, d_b), dot(d_logits, w_t, dtype)

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
