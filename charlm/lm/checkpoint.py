"""A language model as its checkpoint holds it."""

from __future__ import annotations

import jax

from charlm.checkpoints import schema as checkpoint_meta
from charlm.checkpoints.file_format import Checkpoint
from charlm.data.text import Vocabulary
from charlm.errors import CharlmError
from charlm.lm import model


def load_model(checkpoint: Checkpoint) -> tuple[model.Params, model.ModelConfig, Vocabulary]:
    """The parameters, model config and vocabulary that a language model's checkpoint holds;
    a tagger's is refused in one line."""
    if checkpoint_meta.kind(checkpoint.meta) == checkpoint_meta.TAGGER:
        raise CharlmError(
            f"{checkpoint.path} is a punctuation tagger, not a language model; "
            "use it with charlm punctuate"
        )
    config = model.ModelConfig.from_dict(checkpoint.meta["model"])
    template = jax.eval_shape(lambda key: model.init(key, config), jax.random.key(0))
    return checkpoint.tree("params", template), config, Vocabulary(checkpoint.meta["vocab"])
