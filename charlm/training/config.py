"""The options that every model kind's run has (`RunConfig`), the one place where options are
checked (`check`), and which options a resumed run may change.

A kind's configuration is a subclass of `RunConfig` that adds its model's options and may give
the shared ones other defaults (`charlm.lm.config.TrainConfig`,
`charlm.punctuation.config.TaggerTrainConfig`). Every option is checked by its name against
`RULES`, the rules of the run's options here and of the models' in their kinds' modules, and a
value outside its rule is one CharlmError line naming the option as the command line spells it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from charlm.errors import CharlmError

# A rule says what is wrong with a value ("must be at least 1"), or None when it is right.
Rule = Callable[[Any], str | None]


def at_least(least: float) -> Rule:
    return lambda value: None if value >= least else f"must be at least {least:g}"


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Rule:
    """A number in the interval from `low` to `high`, each end closed or open."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def rule(value: Any) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"must be in {shown}, got {value}"

    return rule


def one_of(*choices: str) -> Rule:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


# "auto" is resolved when a run starts (`charlm.devices.hardware.auto_precision`);
# checkpoints and models record the precision it chose.
RESOLVED_PRECISIONS = ("float32", "bfloat16")
PRECISION_CHOICES = ("auto", *RESOLVED_PRECISIONS)

RULES: dict[str, Rule] = {
    "precision": one_of(*PRECISION_CHOICES),
    "batch_size": at_least(1),
    "seq_len": at_least(1),
    "val_fraction": within(0, 1),
    "lr": positive,
    "min_lr": at_least(0),
    "warmup_steps": at_least(0),
    "decay_steps": positive,
    "weight_decay": at_least(0),
    "beta2": within(0, 1, low_open=True),
    "clip_norm": positive,
    "seed": within(0, 2**63),
    "steps": positive,
    "epochs": positive,
    "time_budget": positive,
    "eval_every": at_least(1),
    "log_every": at_least(1),
}


def option_name(field: str) -> str:
    """The command line's name of a config field: batch_size is --batch-size."""
    return "--" + field.replace("_", "-")


def check(config: Any, rules: Mapping[str, Rule] = RULES) -> None:
    """Check each field of the dataclass instance `config` that `rules` has a rule for; None
    (an option not given) passes. Raises CharlmError naming the first option that breaks its
    rule, or that is a number but not a finite one."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        rule = rules.get(field.name)
        if value is None or rule is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CharlmError(f"{option_name(field.name)} must be a finite number, got {value}")
        problem = rule(value)
        if problem is not None:
            raise CharlmError(f"{option_name(field.name)} {problem}")


def shared_fields(source: Any, cls: type) -> dict[str, Any]:
    """The values of the fields of the dataclass instance `source` that the dataclass `cls`
    also has, by name: how one config passes on the options it shares with another."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {
        field.name: getattr(source, field.name)
        for field in dataclasses.fields(source)
        if field.name in names
    }


@dataclass(frozen=True)
class RunConfig:
    """The options of a run that mean the same for every model kind: the arithmetic, the
    batch, the held-out split, the optimizer and its schedule, the run's length and cadence.

    `steps` is the run's total (a resumed run continues up to it); `epochs` sets it instead
    when `steps` is None, and 10 epochs is the default. A run with only a `time_budget`
    trains until the time is up, and its decay is fitted to the time.
    """

    precision: str = "auto"  # operand type of the matmuls; "auto" is resolved at the start
    batch_size: int = 16  # streams (or windows) per step
    seq_len: int = 100  # characters per stream (or window) per step
    val_fraction: float = 0.1  # the part at the end of the text that is held out
    encoding: str | None = None  # the corpus's text encoding; None: UTF-8 (or GB18030, found)
    lr: float = 1e-2  # the peak learning rate, after the warm-up
    min_lr: float = 1e-4  # the learning rate where the cosine decay ends
    warmup_steps: int = 100  # steps of linear warm-up from 0
    decay_steps: int | None = None  # where the decay ends; None: the run's total steps
    weight_decay: float = 0.1  # AdamW's decoupled weight decay, on matrices only
    beta2: float = 0.99  # Adam's second-moment decay rate
    clip_norm: float = 5.0  # gradients are clipped to this global norm
    seed: int = 0  # initialisation, the order of the data, and dropout
    steps: int | None = None  # the run's total steps
    epochs: float | None = None  # the run's length in passes over the text, instead of steps
    time_budget: float | None = None  # seconds of wall-clock time before the run stops
    eval_every: int = 500  # steps between evaluations, each followed by checkpoints
    log_every: int = 10  # steps between fetches of the losses from the device

    def validate(self) -> None:
        """Raise CharlmError naming the first option outside its rule (`RULES`)."""
        check(self)


# Options that may differ when a run is resumed; every other one must match the checkpoint.
RESUMABLE = {"steps", "epochs", "time_budget", "eval_every", "log_every", "val_max_chars"}
# The options that set a run's length: on resume, those given replace all of the saved ones.
LENGTH = ("steps", "epochs", "time_budget")
