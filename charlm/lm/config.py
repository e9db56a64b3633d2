"""The language model's options: its shape (`ModelConfig`) and its training run's
(`TrainConfig`, the run options every kind shares and the model's own), with their rules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from charlm.lm.dropout import DROPOUTS
from charlm.lm.matmul import PRECISIONS
from charlm.lm.recurrence import CELLS, GATES
from charlm.training.config import (
    RESOLVED_PRECISIONS,
    RULES,
    RunConfig,
    at_least,
    check,
    one_of,
    within,
)

# The rules of the options that shape a recurrent network, a language model's or a tagger's.
LAYER_RULES = {
    "cell": one_of(*CELLS),
    "layers": at_least(1),
    "hidden_size": at_least(1),
    "embed_size": at_least(1),
    **{name: within(0, 1) for name in DROPOUTS},
}
# A model's own config holds a resolved precision and the size of its vocabulary.
MODEL_RULES = {**LAYER_RULES, "vocab_size": at_least(1), "precision": one_of(*RESOLVED_PRECISIONS)}
TRAIN_RULES = {**RULES, **LAYER_RULES, "val_max_chars": at_least(2)}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a model, and its regularisation (see `charlm.lm.dropout`): `dropout` on
    every layer's output, `input_dropout` on the first layer's input, `embed_dropout` of whole
    characters, `weight_drop` on the recurrent matrices. With `tie_embeddings` the head's
    weights are the embedding's (Press & Wolf 2017), through a projection from the hidden size
    to the embedding size when the two differ."""

    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden_size: int = 256
    embed_size: int = 64
    dropout: float = 0.0
    precision: str = "float32"
    input_dropout: float = 0.0
    embed_dropout: float = 0.0
    weight_drop: float = 0.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        check(self, MODEL_RULES)

    @property
    def dtype(self) -> Any:
        """The operand type of the model's matmuls (`charlm.lm.matmul`): None for float32,
        which keeps the parameters' own type."""
        return PRECISIONS[self.precision]

    @property
    def gates(self) -> int:
        """How many hidden-sized blocks the cell's matrices have: 4 for the LSTM, 3, 1."""
        return GATES[self.cell]

    def describe(self) -> str:
        """The cell and the layers' shape, as the log and listings name a model: "LSTM 2×256"."""
        return f"{self.cell.upper()} {self.layers}×{self.hidden_size}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Everything that defines a language model's training run: the options every run has
    (`RunConfig`) and the model's own. `decay_steps`, where the cosine decay ends, defaults to
    the total, or for a run limited only by time, to the steps its speed allows."""

    cell: str = "lstm"  # the recurrent cell: lstm, gru or rnn
    layers: int = 2  # stacked recurrent layers
    hidden_size: int = 256  # hidden units per layer
    embed_size: int = 256  # the character embedding's size
    dropout: float = 0.2  # variational dropout on every layer's output
    input_dropout: float = 0.0  # variational dropout on the embedded characters
    embed_dropout: float = 0.1  # whole characters dropped from the embedding
    weight_drop: float = 0.25  # DropConnect on the recurrent matrices
    tie_embeddings: bool = True  # the head shares the embedding's weights
    val_max_chars: int | None = 250_000  # held-out characters each evaluation scores

    def validate(self) -> None:
        check(self, TRAIN_RULES)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model these options describe; precision "auto" must have been resolved first."""
        if self.precision == "auto":
            raise ValueError(
                "resolve precision 'auto' first: charlm.devices.hardware.auto_precision"
            )
        shape = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        return ModelConfig(vocab_size, **{name: getattr(self, name) for name in shape})
