"""Checkpoint files and run directories.

A checkpoint is one safetensors file (https://github.com/huggingface/safetensors): a JSON header
and raw little-endian arrays, so loading it never executes code and it reads the same on any
machine. The header's metadata holds the format version and a JSON document with the model
config, vocabulary, step, training config and corpus provenance. Arrays are named
`group/path/in/pytree`, for example `params/layers/0/w_h` or `opt_state/1/0/mu/embed`.

A write goes to a temporary file in the same directory, is fsynced, then renamed over the old
file: a crash at any moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from charlm import model
from charlm.corpus import Vocabulary
from charlm.errors import CharlmError
from charlm.files import write_atomic  # part of this module's interface: ckpt.write_atomic

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest.ckpt"
BEST = "best.ckpt"
METRICS = "metrics.jsonl"
LAST_RUN_FILE = ".charlm-last-run"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its metadata document and its arrays by name."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def tree(self, group: str, template: Any) -> Any:
        """The pytree of `group` (for example "params"), shaped like `template`.

        `template` may hold arrays or `jax.ShapeDtypeStruct`s; every leaf must be present with
        the template's shape.
        """
        leaves = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
            name = _array_name(group, path)
            if name not in self.arrays:
                raise CharlmError(
                    f"{self.path} lacks the array {name}; it is not a complete checkpoint"
                )
            array = self.arrays[name]
            if array.shape != tuple(leaf.shape):
                raise CharlmError(
                    f"{self.path}: array {name} has shape {array.shape}, expected {tuple(leaf.shape)}"
                )
            leaves.append(array)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def _array_name(group: str, path: tuple[Any, ...]) -> str:
    return "/".join([group, *(jax.tree_util.keystr((key,), simple=True) for key in path)])


def encode(meta: Mapping[str, Any], trees: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint holding `meta` and each pytree of `trees` under its group name."""
    arrays: dict[str, np.ndarray] = {}
    for group, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            arrays[_array_name(group, path)] = np.asarray(leaf, order="C")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta, ensure_ascii=False),
    }
    return safetensors.numpy.save(arrays, metadata=metadata)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint file; raises CharlmError if it is missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"no checkpoint at {path}")
    data = path.read_bytes()
    damaged = CharlmError(f"{path} is not a readable charlm checkpoint (damaged or truncated)")
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        arrays = safetensors.numpy.load(data)
    except Exception:
        raise damaged from None
    if metadata.get("format") != FORMAT:
        raise CharlmError(f"{path} is a safetensors file but not a charlm checkpoint")
    version = int(metadata.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CharlmError(
            f"{path} has checkpoint format {version}, newer than this charlm reads "
            f"({FORMAT_VERSION}); upgrade charlm"
        )
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError):
        raise damaged from None
    return Checkpoint(path, meta, arrays)


def load_model(checkpoint: Checkpoint) -> tuple[model.Params, model.ModelConfig, Vocabulary]:
    """The parameters, model config and vocabulary that a checkpoint holds."""
    config = model.ModelConfig.from_dict(checkpoint.meta["model"])
    template = jax.eval_shape(lambda key: model.init(key, config), jax.random.key(0))
    return checkpoint.tree("params", template), config, Vocabulary(checkpoint.meta["vocab"])


def remember_run(run_dir: str | os.PathLike) -> None:
    """Record `run_dir` as the most recent run of the working directory."""
    write_atomic(Path(LAST_RUN_FILE), str(Path(run_dir).resolve()).encode())


def resolve(checkpoint: str | os.PathLike | None) -> Path:
    """The checkpoint file that `checkpoint` names: a file, a run directory (its best checkpoint,
    else its latest) or, when None, the most recent run of the working directory."""
    if checkpoint is None:
        last = Path(LAST_RUN_FILE)
        if not last.is_file():
            raise CharlmError(
                "no --checkpoint given and no run recorded in this directory; "
                "train one with `charlm train FILE` or pass --checkpoint PATH"
            )
        checkpoint = last.read_text(encoding="utf-8").strip()
    path = Path(checkpoint)
    if path.is_dir():
        for name in (BEST, LATEST):
            if (path / name).is_file():
                return path / name
        raise CharlmError(f"the run directory {path} holds no checkpoint yet")
    if not path.exists():
        raise CharlmError(f"no checkpoint at {path}")
    return path
