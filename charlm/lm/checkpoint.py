"""A language model as its checkpoint holds it: the model kind's part of the metadata
document (`charlm.checkpoints.schema`), the values that upgrade its older documents, and
loading the model back."""

from __future__ import annotations

from typing import Any

import jax

from charlm.checkpoints import schema
from charlm.checkpoints.file_format import Checkpoint
from charlm.data.text import Vocabulary
from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.config import ModelConfig, TrainConfig

LANGUAGE_MODEL = "language model"

# For each config field that a version-1 checkpoint may lack, the value that trains and runs
# the model as version 1 did. A field added to ModelConfig or TrainConfig needs its entry here:
# without one, version-1 checkpoints fail to load with an error naming the field. (`precision`
# came during version 1; the checkpoints written before it are float32.)
V1_BEHAVIOUR: dict[str, dict[str, Any]] = {
    "model": {
        "precision": "float32",
        "input_dropout": 0.0,
        "embed_dropout": 0.0,
        "weight_drop": 0.0,
        "tie_embeddings": False,
    },
    "train": {
        "precision": "float32",
        "input_dropout": 0.0,
        "embed_dropout": 0.0,
        "weight_drop": 0.0,
        "tie_embeddings": False,
        "beta2": 0.999,
        "val_max_chars": None,
    },
}
# Version 3 added `val_max_chars`; version 2 scored the whole held-out split at every evaluation.
V2_BEHAVIOUR: dict[str, dict[str, Any]] = {"train": {"val_max_chars": None}}

schema.register(
    schema.KindSchema(
        name=LANGUAGE_MODEL,
        what="a language model",
        train_command="charlm train FILE",
        use_command="charlm sample, charlm perplexity or charlm serve",
        last_run_file=".charlm-last-run",
        configs={"model": ModelConfig, "train": TrainConfig},
        shape="model",
        # Where the training streams stood, so that a resumed run reads on from there.
        sections={"data_position": {"steps_per_epoch": int, "stream_offset": int}},
        scores={"best_val_loss": float | None},
        upgrades={1: V1_BEHAVIOUR, 2: V2_BEHAVIOUR},
        names_itself=False,
    )
)


def load_model(checkpoint: Checkpoint) -> tuple[model.Params, ModelConfig, Vocabulary]:
    """The parameters, model config and vocabulary that a language model's checkpoint holds;
    a checkpoint of another kind is refused in one line."""
    kind = schema.kind_of(checkpoint.meta)
    if kind.name != LANGUAGE_MODEL:
        raise CharlmError(
            f"{checkpoint.path} is {kind.what}, not a language model; "
            f"use it with {kind.use_command}"
        )
    config = ModelConfig.from_dict(checkpoint.meta["model"])
    template = jax.eval_shape(lambda key: model.init(key, config), jax.random.key(0))
    return checkpoint.tree("params", template), config, Vocabulary(checkpoint.meta["vocab"])
