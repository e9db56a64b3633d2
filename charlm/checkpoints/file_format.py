"""Checkpoint files and run directories.

A checkpoint is one safetensors file (https://github.com/huggingface/safetensors): a JSON header
and raw little-endian arrays, so loading it never executes code and it reads the same on any
machine. The header's metadata holds the format version and a JSON document with the model
config, vocabulary, step, training config and corpus provenance, whose every field `load`
checks (`charlm.checkpoints.schema`). Arrays are named `group/path/in/pytree`, for example
`params/layers/0/w_h` or `opt_state/1/0/mu/embed`.

A file of an older format version is upgraded as it is read (`UPGRADES`): version 2 records the
regularisation options, which version 1 did not have, version 3 the cap on the held-out
characters each evaluation reads, and version 4 a punctuation tagger's dropout;
`V1_BEHAVIOUR`, `V2_BEHAVIOUR` and `V3_BEHAVIOUR` give the values that behave as those versions
did.

A write goes to a temporary file in the same directory, is fsynced, then renamed over the old
file: a crash at any moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from charlm.checkpoints import schema as checkpoint_meta
from charlm.errors import CharlmError
from charlm.storage import write_atomic  # part of this module's interface: ckpt.write_atomic

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 4
LATEST = "latest.ckpt"
BEST = "best.ckpt"
METRICS = "metrics.jsonl"
# The most recent run of the working directory, of each kind, which commands default to.
LAST_RUN_FILE = ".charlm-last-run"
LAST_TAGGER_FILE = ".charlm-last-tagger"
LAST_RUN = {checkpoint_meta.LANGUAGE_MODEL: LAST_RUN_FILE, checkpoint_meta.TAGGER: LAST_TAGGER_FILE}
TRAIN_COMMAND = {
    checkpoint_meta.LANGUAGE_MODEL: "charlm train FILE",
    checkpoint_meta.TAGGER: "charlm punctuate train FILE",
}

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
V2_BEHAVIOUR: dict[str, dict[str, Any]] = {"model": {}, "train": {"val_max_chars": None}}
# Version 4 added a tagger's dropout rates; the taggers of version 3 trained without dropout.
NO_TAGGER_DROPOUT = {"dropout": 0.0, "embed_dropout": 0.0, "weight_drop": 0.0}
V3_BEHAVIOUR: dict[str, dict[str, Any]] = {"tagger": NO_TAGGER_DROPOUT, "train": NO_TAGGER_DROPOUT}


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
    """Read and check a checkpoint file, upgraded to the current format version; raises
    CharlmError if it is missing, damaged or foreign, or a field of its metadata is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"no checkpoint at {path}")
    data = path.read_bytes()
    meta = _checked_meta(_header(data, path), path)
    try:
        arrays = safetensors.numpy.load(data)
    except Exception:
        raise _damaged(path) from None
    return Checkpoint(path, meta, arrays)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked metadata of a checkpoint file, read from its header alone (for listings:
    the arrays are not read, only their extent checked against the file's size)."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        data = head + f.read(min(header_len, 100_000_000))
    header = _header(data, path)
    meta = _checked_meta(header, path)
    try:
        ends = [
            entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
        ]
        whole = path.stat().st_size == 8 + header_len + max(ends, default=0)
    except Exception:
        whole = False
    if not whole:
        raise _damaged(path)
    return meta


def _damaged(path: Path) -> CharlmError:
    return CharlmError(f"{path} is not a readable charlm checkpoint (damaged or truncated)")


def _header(data: bytes, path: Path) -> dict[str, Any]:
    """The safetensors header (a JSON object) at the start of `data`."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except Exception:
        raise _damaged(path) from None
    if not isinstance(header, dict):
        raise _damaged(path)
    return header


def _checked_meta(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The charlm metadata in a safetensors header, upgraded and checked."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise _damaged(path)
    if metadata.get("format") != FORMAT:
        raise CharlmError(f"{path} is a safetensors file but not a charlm checkpoint")
    version = _format_version(metadata, str(path))
    if "meta" not in metadata:
        raise checkpoint_meta.field_error(str(path), "meta", "is missing")
    try:
        meta = json.loads(metadata["meta"])
    except ValueError:
        raise checkpoint_meta.field_error(str(path), "meta", "is not JSON") from None
    for old in range(version, FORMAT_VERSION):
        meta = UPGRADES[old](meta, str(path))
    checkpoint_meta.validate(meta, str(path))
    return meta


def _format_version(metadata: Mapping[str, str], source: str) -> int:
    """The format version that a checkpoint's header states: from 1 to FORMAT_VERSION."""
    if "format_version" not in metadata:
        raise checkpoint_meta.field_error(source, "format_version", "is missing")
    text = metadata["format_version"]
    if not re.fullmatch(r"[1-9][0-9]{0,8}", text):
        raise checkpoint_meta.field_error(
            source, "format_version", f"must be a positive whole number, got {json.dumps(text)}"
        )
    if int(text) > FORMAT_VERSION:
        raise checkpoint_meta.field_error(
            source,
            "format_version",
            f"is {text}, newer than this charlm reads ({FORMAT_VERSION}); upgrade charlm",
        )
    return int(text)


def _filled(meta: Any, source: str, version: int, behaviour: dict[str, dict[str, Any]]) -> Any:
    """The next version's document of the version-`version` metadata `meta` (of the file
    `source`): each config field that the config classes have and `meta` lacks, filled from
    `behaviour`. A field that neither gives raises CharlmError naming it; other faults are
    left to `checkpoint_meta.validate`."""
    if not isinstance(meta, dict):
        return meta
    upgraded = dict(meta)
    for section, cls in checkpoint_meta.config_classes(checkpoint_meta.kind(meta)).items():
        config = meta.get(section)
        if not isinstance(config, dict):
            continue
        upgraded[section] = filled = dict(config)
        for field in dataclasses.fields(cls):
            if field.name in filled:
                continue
            if field.name not in behaviour.get(section, {}):
                raise checkpoint_meta.field_error(
                    source,
                    f"{section}.{field.name}",
                    f"is missing, and charlm.checkpoints.file_format.V{version}_BEHAVIOUR has no "
                    f"version-{version} value for it",
                )
            filled[field.name] = behaviour[section][field.name]
    return upgraded


def upgrade_v1(meta: Any, source: str) -> Any:
    return _filled(meta, source, 1, V1_BEHAVIOUR)


def upgrade_v2(meta: Any, source: str) -> Any:
    return _filled(meta, source, 2, V2_BEHAVIOUR)


def upgrade_v3(meta: Any, source: str) -> Any:
    return _filled(meta, source, 3, V3_BEHAVIOUR)


# The upgrade from each older format version to the next.
UPGRADES: dict[int, Callable[[Any, str], Any]] = {1: upgrade_v1, 2: upgrade_v2, 3: upgrade_v3}


def remember_run(run_dir: str | os.PathLike, kind: str = checkpoint_meta.LANGUAGE_MODEL) -> None:
    """Record `run_dir` as the most recent run of its `kind` in the working directory."""
    write_atomic(Path(LAST_RUN[kind]), str(Path(run_dir).resolve()).encode())


def resolve(
    checkpoint: str | os.PathLike | None, kind: str = checkpoint_meta.LANGUAGE_MODEL
) -> Path:
    """The checkpoint file that `checkpoint` names: a file, a run directory (its best checkpoint,
    else its latest) or, when None, the most recent run of `kind` in the working directory."""
    if checkpoint is None:
        last = Path(LAST_RUN[kind])
        if not last.is_file():
            raise CharlmError(
                "no --checkpoint given and no run recorded in this directory; "
                f"train one with `{TRAIN_COMMAND[kind]}` or pass --checkpoint PATH"
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
