"""The options of a training run (`TrainConfig`), and which of them a resumed run may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.dropout import DROPOUTS

# "auto" is resolved when a run starts (`charlm.devices.hardware.auto_precision`); checkpoints record
# the precision it chose.
PRECISION_CHOICES = ("auto", *model.PRECISIONS)


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
class TrainConfig:
    """Everything that defines a training run.

    `steps` is the run's total (a resumed run continues up to it); `epochs` sets it instead
    when `steps` is None, and 10 epochs is the default. A run with only a `time_budget`
    (seconds) trains until the time is up. `decay_steps`, where the cosine decay ends, defaults
    to the total, or for a run limited only by time, to the steps its speed allows.
    """

    cell: str = "lstm"
    layers: int = 2
    hidden_size: int = 256
    embed_size: int = 256
    dropout: float = 0.2
    input_dropout: float = 0.0
    embed_dropout: float = 0.1
    weight_drop: float = 0.25
    tie_embeddings: bool = True
    precision: str = "auto"
    batch_size: int = 16
    seq_len: int = 100
    val_fraction: float = 0.1
    encoding: str | None = None
    lr: float = 1e-2
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta2: float = 0.99
    clip_norm: float = 5.0
    seed: int = 0
    steps: int | None = None
    epochs: float | None = None
    time_budget: float | None = None
    eval_every: int = 500
    val_max_chars: int | None = 250_000
    log_every: int = 10

    def validate(self) -> None:
        positive = ["layers", "hidden_size", "embed_size", "batch_size", "seq_len"]
        positive += ["eval_every", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise CharlmError(f"--{name.replace('_', '-')} must be at least 1")
        if self.val_max_chars is not None and self.val_max_chars < 2:
            raise CharlmError("--val-max-chars must be at least 2")
        for name in ("steps", "decay_steps", "epochs", "time_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CharlmError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0 or self.min_lr < 0 or self.clip_norm <= 0 or self.warmup_steps < 0:
            raise CharlmError(
                "--lr and --clip-norm must be positive, --min-lr and --warmup-steps not negative"
            )
        if not 0 <= self.seed < 2**63:
            raise CharlmError("--seed must be in [0, 2**63)")
        for name in DROPOUTS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise CharlmError(
                    f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}"
                )
        if not 0.0 < self.beta2 < 1.0:
            raise CharlmError(f"--beta2 must be in (0, 1), got {self.beta2}")
        if self.cell not in model.CELLS:
            raise CharlmError(f"--cell must be one of {', '.join(model.CELLS)}")
        if self.precision not in PRECISION_CHOICES:
            raise CharlmError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}")

    def model_config(self, vocab_size: int) -> model.ModelConfig:
        """The model these options describe; precision "auto" must have been resolved first."""
        if self.precision == "auto":
            raise ValueError(
                "resolve precision 'auto' first: charlm.devices.hardware.auto_precision"
            )
        shape = {f.name for f in dataclasses.fields(model.ModelConfig)} - {"vocab_size"}
        return model.ModelConfig(vocab_size, **{name: getattr(self, name) for name in shape})


# Options that may differ when a run is resumed; every other one must match the checkpoint.
RESUMABLE = {"steps", "epochs", "time_budget", "eval_every", "log_every", "val_max_chars"}
# The options that set a run's length: on resume, those given replace all of the saved ones.
LENGTH = ("steps", "epochs", "time_budget")
