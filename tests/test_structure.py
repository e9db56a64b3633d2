"""The package's shape: subpackages in layers that import only downwards, small modules, and a
checkpoint schema that a new kind of model extends by registering, without a change to it."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest

import charlm
from charlm.checkpoints import schema
from charlm.errors import CharlmError

PACKAGE = Path(charlm.__file__).parent
# From the bottom up; a module may import from its own layer and the layers below it.
LAYERS = [
    {"errors", "storage", "__version__"},
    {"checkpoints", "data", "devices"},
    {"training"},
    {"lm"},
    {"punctuation", "inference"},
    {"runs"},
    {"cli", "__main__", "__init__", "corpora"},
]


def layer_of(name: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if name in names)


def charlm_imports(path: Path) -> set[str]:
    """The top-level names under charlm (subpackage, module or attribute) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("charlm"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("charlm.")}
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_lower_layers_never_import_higher_ones() -> None:
    upward = []
    for path in modules():
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        for name in charlm_imports(path) - {own}:
            if layer_of(name) > layer_of(own):
                upward.append(f"{relative} imports charlm.{name}")
    assert not upward, upward


def test_the_top_level_is_small_and_no_module_is_long() -> None:
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= 6, top
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long


def test_the_schema_names_no_kind_of_model() -> None:
    source = (PACKAGE / "checkpoints" / "schema.py").read_text(encoding="utf-8")
    for word in ("tagger", "ModelConfig", "TrainConfig", "charlm.lm", "punctuation"):
        assert word not in source, word


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    """A config section of a made-up kind of model."""

    vocab_size: int
    width: int = 4
    mirrored: bool = False


def test_a_new_kind_registers_its_sections_and_upgrades(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind that charlm's schema has never heard of checks and upgrades its documents by its
    registration alone, and the kinds already there are untouched."""
    monkeypatch.setattr(schema, "_KINDS", dict(schema.kinds()))
    schema.register(
        schema.KindSchema(
            name="echo",
            what="an echo model",
            train_command="charlm echo train FILE",
            use_command="charlm echo",
            last_run_file=".charlm-last-echo",
            configs={"echo": EchoConfig, "train": EchoConfig},
            shape="echo",
            sections={"mirror": {"axis": int}},
            scores={"best_echo": float | None},
            upgrades={3: {"echo": {"mirrored": False}, "train": {"mirrored": False}}},
        )
    )
    meta = {
        "kind": "echo",
        "charlm_version": charlm.__version__,
        "created": "2026-12-08T00:00:00+00:00",
        "vocab": "ab",
        "step": 3,
        "decay_steps": 10,
        "epoch": 0.5,
        "corpus": {
            "path": "x.txt",
            "sha256": "0" * 64,
            "encoding": None,
            "characters": 10,
            "val_fraction": 0.1,
            "split_index": 9,
        },
        "train_loss": 1.0,
        "val_loss": None,
        "echo": {"vocab_size": 2, "width": 4, "mirrored": True},
        "train": {"vocab_size": 2, "width": 4, "mirrored": True},
        "mirror": {"axis": 1},
        "best_echo": None,
    }
    schema.validate(meta, "echo.ckpt")
    bad = copy.deepcopy(meta)
    bad["mirror"]["axis"] = "one"
    with pytest.raises(
        CharlmError, match=r"echo\.ckpt: metadata field mirror\.axis must be an integer"
    ):
        schema.validate(bad, "echo.ckpt")
    old = json.loads(json.dumps(meta))
    del old["echo"]["mirrored"], old["train"]["mirrored"]
    upgraded = schema.upgraded(old, "echo.ckpt", 3, 4)
    assert upgraded["echo"]["mirrored"] is False and "mirrored" not in old["echo"]
    with pytest.raises(CharlmError, match=r"echo\.width is missing, and the echo kind has no"):
        del old["echo"]["width"]
        schema.upgraded(old, "echo.ckpt", 3, 4)
    assert {"language model", "tagger", "echo"} <= set(schema.kinds())
    assert schema.default_kind().name == "language model"
