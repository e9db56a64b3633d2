"""The options of a punctuation tagger's training run (`TaggerTrainConfig`).

A tagger's run shares most of its options, and their meaning, with a language model's
(`charlm.lm.config.TrainConfig`): the shape of the recurrent layers, the batch, the optimizer and
its schedule, the run's length. `TaggerTrainConfig.shared` is the language model's config with
those options, which checks them and drives `charlm.lm.step`'s schedule and optimizer; what only
a tagger has is the direction (`bidirectional`), the size of its label set, and the language
model its first layer may start from (`init_from`). Its dropout means what a language model's
does, with defaults of its own: a tagger reads each window many times over (23 epochs of
三国演义 in ten minutes on 2 cores), and more dropout than a language model's kept its held-out
loss from rising.
"""

from __future__ import annotations

from dataclasses import dataclass

from charlm.errors import CharlmError
from charlm.lm.config import TrainConfig, shared_fields
from charlm.punctuation.marks import DEFAULT_MAX_LABELS
from charlm.punctuation.model import TaggerConfig


@dataclass(frozen=True)
class TaggerTrainConfig:
    """Everything that defines a tagger's training run. `seq_len` is the window a training
    example is, and the window that tagging reads a text in (each position labelled from the
    middle half of a window). The other options mean what `TrainConfig`'s do."""

    cell: str = "lstm"
    layers: int = 2
    hidden_size: int = 256
    embed_size: int = 256
    bidirectional: bool = True
    precision: str = "auto"
    dropout: float = 0.4
    embed_dropout: float = 0.1
    weight_drop: float = 0.4
    max_labels: int = DEFAULT_MAX_LABELS
    batch_size: int = 32
    seq_len: int = 100
    val_fraction: float = 0.1
    encoding: str | None = None
    lr: float = 5e-3
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
    log_every: int = 10
    init_from: str | None = None

    @property
    def shared(self) -> TrainConfig:
        """The language model's TrainConfig with the options the two runs share (its own
        defaults for the rest, which nothing of a tagger's run reads)."""
        return TrainConfig(**shared_fields(self, TrainConfig))

    def validate(self) -> None:
        self.shared.validate()
        if self.max_labels < 1:
            raise CharlmError("--max-labels must be at least 1")

    def tagger_config(self, vocab_size: int, num_labels: int) -> TaggerConfig:
        """The tagger these options describe; precision "auto" must have been resolved first."""
        if self.precision == "auto":
            raise ValueError(
                "resolve precision 'auto' first: charlm.devices.hardware.auto_precision"
            )
        return TaggerConfig(
            vocab_size=vocab_size, num_labels=num_labels, **shared_fields(self, TaggerConfig)
        )
