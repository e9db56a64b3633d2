"""The training step: the loss of a window, the optimizer, the learning-rate schedule, and the
compiled step that puts them together.

The step is forward, mean cross-entropy in nats per character, gradients, global-norm
clipping and AdamW (Loshchilov & Hutter 2019) on a linear warm-up then cosine decay schedule.
The hidden state is carried from one step to the next (truncated backpropagation through time).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from charlm.devices.data_parallel import DataParallel
from charlm.lm import model
from charlm.lm.config import DEFAULT_EPOCHS, TrainConfig
from charlm.lm.dropout import DropoutMasks, dropout_masks, is_regularised
from charlm.lm.loss import head_loss


def learning_rate(step: int, config: TrainConfig, decay_steps: int) -> float:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay (Loshchilov &
    Hutter 2017) to `min_lr` at `decay_steps`, constant after. Plain Python: the host computes
    it and passes it to the compiled step, so the decay horizon can change without recompiling."""
    if step < config.warmup_steps:
        return config.lr * step / config.warmup_steps
    span = max(decay_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class Horizon:
    """How long a run is (`total` steps) and where its cosine decay ends (`decay_steps`).

    A run of steps or epochs knows both from the start. A run limited only by time trains
    until the time is up, and its decay horizon is re-estimated from its measured speed at every
    evaluation of its first session (`refit`), so that the rate has decayed when the time is
    up. A resumed run keeps the horizon its checkpoint records.
    """

    UNBOUNDED = sys.maxsize

    total: int
    decay_steps: int
    refits: bool

    @classmethod
    def plan(cls, config: TrainConfig, steps_per_epoch: int, saved: int | None) -> Horizon:
        """The horizon of a new run, or of a resumed one whose checkpoint saved `saved`."""
        by_time = config.time_budget is not None and config.steps is None and config.epochs is None
        total = config.steps or math.ceil((config.epochs or DEFAULT_EPOCHS) * steps_per_epoch)
        if by_time:
            total = cls.UNBOUNDED
        decay_steps = config.decay_steps or (10 * steps_per_epoch if by_time else total)
        if saved is not None:
            decay_steps = saved
        return cls(total, decay_steps, by_time and saved is None and config.decay_steps is None)

    def refit(self, step: int, steps_done: int, elapsed: float, budget: float) -> None:
        """Aim the decay at the step that `budget` seconds allow, `steps_done` steps having
        taken `elapsed` seconds (including what evaluations cost)."""
        if self.refits and steps_done > 0:
            self.decay_steps = step + max(int((budget - elapsed) / (elapsed / steps_done)), 1)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (Pascanu et al. 2013), then AdamW at unit learning rate: the step
    scales the update by `learning_rate`. Weight decay applies to matrices, not to biases."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            1.0,
            b2=config.beta2,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )


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
    return head_loss(x, w, b, targets, model.PRECISIONS[config.precision]), carry


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
            new_state = jax.lax.with_sharding_constraint(
                new_state, parallel.state_shardings(new_state)
            )
        return new_state, loss

    return train_step
