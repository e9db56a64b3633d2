"""The training step: the loss of a window, the optimizer, the learning-rate schedule, and the
compiled step that puts them together.

The step is forward, mean cross-entropy in nats per character, gradients, global-norm
clipping and AdamW (Loshchilov & Hutter 2019) on a linear warm-up then cosine decay schedule.
The hidden state is carried from one step to the next (truncated backpropagation through time).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from charlm.devices.data_parallel import DataParallel
from charlm.lm import model
from charlm.lm.dropout import DropoutMasks, dropout_masks, is_regularised
from charlm.lm.loss import head_loss

# A training window runs through the model in this many chunks of time. The chunks are
# independent programs to XLA, so one chunk's large matmuls (the next layer's input projection,
# the weight gradients) run on one core while the recurrence of the next chunk runs on the other:
# on 2 cores, S's gradient took 5–13% less time in 5 chunks of 20 steps than whole, M's the
# same. More chunks compile longer (1.0 s whole, 1.6 s in 5 chunks, for S).
TIME_CHUNKS = 5


def sequence_loss(
    params: model.Params,
    inputs: jax.Array,
    targets: jax.Array,
    carry: model.State,
    config: model.ModelConfig,
    masks: DropoutMasks | None = None,
) -> tuple[jax.Array, model.State]:
    """Mean cross-entropy in nats per character of a (batch, time) window, and the state after
    it; the model runs over the window in `TIME_CHUNKS` nearly equal chunks of time, with the
    same dropout `masks` in every chunk."""
    inputs, targets = jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(targets, 0, 1)
    steps = inputs.shape[0]
    chunks = min(TIME_CHUNKS, steps)
    bounds = [round(n * steps / chunks) for n in range(chunks + 1)]
    outputs = []
    for start, stop in itertools.pairwise(bounds):
        x, carry = model.features(params, inputs[start:stop], carry, config, masks)
        outputs.append(x)
    x = jnp.concatenate(outputs)
    w, b = model.head_weight(params, config), params["head"]["b"]
    return head_loss(x, w, b, targets, config.dtype), carry


def init_state(
    config: model.ModelConfig, optimizer: optax.GradientTransformation, batch_size: int, seed: int
) -> dict[str, Any]:
    """A fresh training state: params, opt_state, carry (the hidden state), step and rng (the
    key that dropout masks are derived from, step by step)."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, config)
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "carry": model.initial_state(config, batch_size),
        "step": jnp.zeros((), jnp.int32),
        "rng": dropout_key,
    }


def make_train_step(
    config: model.ModelConfig,
    optimizer: optax.GradientTransformation,
    parallel: DataParallel | None = None,
):
    """The compiled step: (state, inputs, targets, reset, lr) -> (state, loss).

    `state` is as `init_state` makes it; its buffers are donated, so the caller must use only
    the returned state. `reset` zeroes the carried state first, where the data streams wrap.
    The loss is that of the parameters before the update. With `parallel`, the new state keeps
    the shardings it names (the carried state split over the devices, the rest replicated).
    """

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, inputs, targets, reset, lr):
        carry = jax.tree.map(lambda c: jnp.where(reset, 0.0, c), state["carry"])
        masks = None
        if is_regularised(config):
            key = jax.random.fold_in(state["rng"], state["step"])
            masks = dropout_masks(key, config, inputs.shape[0])
        (loss, carry), grads = jax.value_and_grad(sequence_loss, has_aux=True)(
            state["params"], inputs, targets, carry, config, masks
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr * u, updates)
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "carry": carry,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        if parallel is not None:
            new_state = parallel.constrain(new_state)
        return new_state, loss

    return train_step
