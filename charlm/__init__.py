"""charlm: character-level recurrent language models in JAX.

    import charlm
    result = charlm.train("sanguo.txt", steps=2000)
    print(charlm.sample(prime="出战", length=200, seed=1)[0])
    print(charlm.perplexity().bits_per_char)

The heavy modules (JAX) load on first use, so `import charlm` and `charlm --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "train": "charlm.lm.training",
    "TrainConfig": "charlm.lm.config",
    "train_tagger": "charlm.punctuation.training",
    "TaggerTrainConfig": "charlm.punctuation.config",
    "TrainResult": "charlm.training.loop",
    "sample": "charlm.inference.sampling",
    "perplexity": "charlm.inference.evaluation",
    "ModelConfig": "charlm.lm.config",
    "CharlmError": "charlm.errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
