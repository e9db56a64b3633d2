"""Checkpoint files and run directories.

A checkpoint is one safetensors file (https://github.com/huggingface/safetensors): a JSON header
and raw little-endian arrays, so loading it never executes code and it reads the same on any
machine. The header's metadata holds the format version and a JSON document with the model
config, vocabulary, step, training config and corpus provenance, whose every field `load`
checks (`charlm.checkpoints.schema`). Arrays are named `group/path/in/pytree`, for example
`params/layers/0/w_h` or `opt_state/1/0/mu/embed`.

A file of an older format version is upgraded as it is read, with the values that each model
kind registers for the fields its older documents lack (`KindSchema.upgrades`): version 2
recorded the language model's regularisation options, version 3 the cap on the held-out
characters each evaluation reads, and version 4 a punctuation tagger's dropout.

A write goes to a temporary file in the same directory, is fsynced, then renamed over the old
file: a crash at any moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
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
    CharlmError if it is missing, damaged or foreign, a field of its metadata is wrong, or an
    array holds a value that is not finite."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"no checkpoint at {path}")
    data = path.read_bytes()
    meta = _checked_meta(_header(data, path), path)
    try:
        arrays = safetensors.numpy.load(data)
    except Exception:
        raise _damaged(path) from None
    for name, array in arrays.items():
        # A NaN loaded silently samples nonsense and scores nan; a run never saves one.
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CharlmError(
                f"{path}: array {name} holds NaN or infinite values; the checkpoint is damaged, "
                "use another one of the run (best.ckpt or latest.ckpt)"
            )
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
    meta = checkpoint_meta.upgraded(meta, str(path), version, FORMAT_VERSION)
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


def remember_run(run_dir: str | os.PathLike, kind: str | None = None) -> None:
    """Record `run_dir` as the most recent run of its `kind` (the language model when None)
    in the working directory."""
    schema = checkpoint_meta.default_kind() if kind is None else checkpoint_meta.get(kind)
    write_atomic(Path(schema.last_run_file), str(Path(run_dir).resolve()).encode())


def resolve(checkpoint: str | os.PathLike | None, kind: str | None = None) -> Path:
    """The checkpoint file that `checkpoint` names: a file, a run directory (its best checkpoint,
    else its latest) or, when None, the most recent run of `kind` (the language model when
    None) in the working directory."""
    if checkpoint is None:
        schema = checkpoint_meta.default_kind() if kind is None else checkpoint_meta.get(kind)
        last = Path(schema.last_run_file)
        if not last.is_file():
            raise CharlmError(
                "no --checkpoint given and no run recorded in this directory; "
                f"train one with `{schema.train_command}` or pass --checkpoint PATH"
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
