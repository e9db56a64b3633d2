"""The options of a punctuation tagger's training run (`TaggerTrainConfig`).

A tagger's run shares most of its options, and their meaning, with a language model's
(`charlm.lm.config.TrainConfig`): the shape of the recurrent layers, and through
`charlm.training.config.RunConfig` the batch, the optimizer and its schedule, the run's length.
What only a tagger has is the direction (`bidirectional`), the size of its label set, and the language
model its first layer may start from (`init_from`). Its dropout means what a language model's
does, with defaults of its own: a tagger reads each window many times over (23 epochs of
三国演义 in ten minutes on 2 cores), and more dropout than a language model's kept its held-out
loss from rising.
"""

from __future__ import annotations

from dataclasses import dataclass

from charlm.lm.config import LAYER_RULES
from charlm.punctuation.marks import DEFAULT_MAX_LABELS
from charlm.punctuation.model import TaggerConfig
from charlm.training.config import RULES, RunConfig, at_least, check, shared_fields

TAGGER_TRAIN_RULES = {**RULES, **LAYER_RULES, "max_labels": at_least(1), "seq_len": at_least(4)}


@dataclass(frozen=True)
class TaggerTrainConfig(RunConfig):
    """Everything that defines a tagger's training run: the options every run has
    (`RunConfig`, with a tagger's defaults for the batch and the learning rate) and the
    tagger's own. `seq_len` is the window a training example is, and the window that tagging
    reads a text in (each position labelled from the middle half of a window)."""

    batch_size: int = 32  # windows per step
    lr: float = 5e-3  # the peak learning rate
    cell: str = "lstm"  # the recurrent cell of both directions: lstm, gru or rnn
    layers: int = 2  # stacked bidirectional layers
    hidden_size: int = 256  # hidden units per layer and direction
    embed_size: int = 256  # the character embedding's size
    bidirectional: bool = True  # a backward recurrence beside the forward one
    dropout: float = 0.4  # variational dropout on every layer's output
    embed_dropout: float = 0.1  # whole characters dropped from the embedding
    weight_drop: float = 0.4  # DropConnect on each direction's recurrent matrix
    max_labels: int = DEFAULT_MAX_LABELS  # the commonest runs of marks that become labels
    init_from: str | None = None  # a language model to start the forward direction from

    def validate(self) -> None:
        check(self, TAGGER_TRAIN_RULES)

    def tagger_config(self, vocab_size: int, num_labels: int) -> TaggerConfig:
        """The tagger these options describe; precision "auto" must have been resolved first."""
        if self.precision == "auto":
            raise ValueError(
                "resolve precision 'auto' first: charlm.devices.hardware.auto_precision"
            )
        return TaggerConfig(
            vocab_size=vocab_size, num_labels=num_labels, **shared_fields(self, TaggerConfig)
        )
