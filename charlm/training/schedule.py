"""The optimizer and its learning-rate schedule, shared by every model kind: AdamW (Loshchilov &
Hutter 2019) after global-norm clipping, on a linear warm-up then cosine decay, and the
horizon that says how long a run is and where its decay ends."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import jax
import optax

from charlm.training.config import RunConfig

# A run given no length trains for this many passes over its text.
DEFAULT_EPOCHS = 10


def learning_rate(step: int, config: RunConfig, decay_steps: int) -> float:
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
    def plan(cls, config: RunConfig, steps_per_epoch: int, saved: int | None) -> Horizon:
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


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
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
