"""The metadata document of a checkpoint: its schema, the registry of model kinds that extend
it, and its validation when a file is read.

Every checkpoint's document has the fields that `COMMON` lists: the version that wrote it,
the vocabulary, the training run's options, the step, the schedule's horizon, the corpus and
the losses. A model kind adds its own (`KindSchema`): the config sections of its model and
run, whose rules come from the fields of their dataclasses and their annotated types (a field
added to one is checked with no change here), its other sections and scores, the values that
upgrade its older documents, and a check of its own. Kinds register themselves when their
module is imported (`register`); the modules are named as entry points of the group
`charlm.model_kinds` (pyproject.toml), which this module loads the first time a kind is
needed, so that it names no kind itself. A document names its kind in `kind`; the language
model's documents, older than kinds, have none, and belong to the kind registered with
`names_itself=False`.
Every problem is one CharlmError line that names the file and the field, for example
`runs/x/latest.ckpt: metadata field model.hidden_size must be an integer, got "256"`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from charlm.errors import CharlmError

ENTRY_POINTS = "charlm.model_kinds"

# A field's rule is one of the types in TYPES, a union of them such as `str | None`, or, for a
# nested object, a dict of the rules of its fields (each required, no others allowed).
Rule = Any
TYPES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    type(None): "null",
}
# The fields of every kind's document, besides the kind's own.
COMMON: dict[str, Rule] = {
    "charlm_version": str,
    "created": str,
    "vocab": str,
    "step": int,
    "decay_steps": int,
    "epoch": float,
    "corpus": {
        "path": str,
        "sha256": str,
        "encoding": str | None,
        "characters": int,
        "val_fraction": float,
        "split_index": int,
    },
    "train_loss": float | None,
    "val_loss": float | None,
}
# The least value of the numbers outside the configs, whose own checks bound theirs.
MINIMUM = {
    "step": 0,
    "decay_steps": 1,
    "epoch": 0,
    "data_position.steps_per_epoch": 1,
    "data_position.stream_offset": 0,
    "corpus.characters": 0,
    "corpus.val_fraction": 0,
    "corpus.split_index": 0,
}


@dataclass(frozen=True)
class KindSchema:
    """What one kind of model adds to a checkpoint's document, and how charlm names it."""

    name: str  # the document's `kind`
    what: str  # the kind as a message names it: "a language model"
    train_command: str  # how one is trained: "charlm train FILE"
    use_command: str  # what uses its checkpoints: "charlm sample"
    last_run_file: str  # the working directory's record of its latest run
    configs: dict[str, type]  # its config sections and their dataclasses
    shape: str  # the config section whose vocab_size the vocabulary must match
    sections: dict[str, Rule] = field(default_factory=dict)  # its other sections' rules
    scores: dict[str, Rule] = field(default_factory=dict)  # its scores' rules
    # For each older format version, the value of each config field that documents of that
    # version lack which trains and runs the model as that version did.
    upgrades: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    check: Callable[[dict[str, Any], str], None] | None = None  # its own check of a document
    names_itself: bool = True  # whether its documents carry `kind`

    def schema(self) -> dict[str, Rule]:
        """The rules of a whole document of this kind."""
        configs = {section: config_rules(cls) for section, cls in self.configs.items()}
        own = {"kind": str} if self.names_itself else {}
        return {**COMMON, **own, **configs, **self.sections, **self.scores}


_KINDS: dict[str, KindSchema] = {}


def register(kind: KindSchema) -> None:
    """Add a kind of model; its module calls this when it is imported."""
    _KINDS[kind.name] = kind


@functools.cache
def _load_entry_points() -> None:
    """Import the modules that the entry points name, whose import registers their kinds:
    once, as reading the installed packages' metadata takes milliseconds."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        entry.load()


def kinds() -> dict[str, KindSchema]:
    """Every registered kind, by name; the entry points' modules are imported first."""
    _load_entry_points()
    return _KINDS


def get(name: str) -> KindSchema:
    """The registered kind of this `name`."""
    known = kinds()
    if name not in known:
        raise CharlmError(f"charlm knows no model kind {name!r}: reinstall charlm")
    return known[name]


def default_kind() -> KindSchema:
    """The kind whose documents carry no `kind`: the language model, older than kinds."""
    return next(kind for kind in kinds().values() if not kind.names_itself)


def kind_of(meta: dict[str, Any]) -> KindSchema:
    """The kind of a metadata document that names a registered kind, or carries none."""
    return get(meta["kind"]) if "kind" in meta else default_kind()


def field_error(source: str, name: str, problem: str) -> CharlmError:
    """The error for metadata field `name` (dotted, as `model.cell`) of the file `source`."""
    return CharlmError(f"{source}: metadata field {name} {problem}")


def config_rules(cls: type) -> dict[str, Rule]:
    """The rule of each field of the config dataclass `cls`: its annotated type."""
    hints = typing.get_type_hints(cls)
    rules = {field.name: hints[field.name] for field in dataclasses.fields(cls)}
    for name, rule in rules.items():
        if any(kind not in TYPES for kind in _kinds(rule)):
            raise TypeError(f"checkpoints cannot record {cls.__name__}.{name} of type {rule}")
    return rules


def upgraded(meta: Any, source: str, version: int, current: int) -> Any:
    """The document of the current format version of the version-`version` metadata `meta`
    (of the file `source`): each config field that its kind's config classes have and `meta`
    lacks, filled from the kind's `upgrades` of each version from `version` on. A field that
    none gives raises CharlmError naming it; other faults are left to `validate`."""
    if not isinstance(meta, dict) or not isinstance(meta.get("kind", ""), str):
        return meta
    kind = kinds().get(meta["kind"]) if "kind" in meta else default_kind()
    if kind is None:
        return meta
    for old in range(version, current):
        behaviour = kind.upgrades.get(old, {})
        meta = dict(meta)
        for section, cls in kind.configs.items():
            config = meta.get(section)
            if not isinstance(config, dict):
                continue
            meta[section] = filled = dict(config)
            for config_field in dataclasses.fields(cls):
                if config_field.name in filled:
                    continue
                if config_field.name not in behaviour.get(section, {}):
                    raise field_error(
                        source,
                        f"{section}.{config_field.name}",
                        f"is missing, and the {kind.name} kind has no version-{old} value "
                        "for it (KindSchema.upgrades)",
                    )
                filled[config_field.name] = behaviour[section][config_field.name]
    return meta


def validate(meta: Any, source: str) -> None:
    """Check every field of the metadata document `meta` read from the file `source`: present,
    known, of its type, and a value its config accepts; raises CharlmError naming the first
    field that is not."""
    if not isinstance(meta, dict):
        raise field_error(source, "meta", f"must be a JSON object, got {_show(meta)}")
    named = [kind.name for kind in kinds().values() if kind.names_itself]
    if "kind" in meta and meta["kind"] not in named:
        choices = " or ".join(f'"{name}"' for name in named)
        raise field_error(
            source,
            "kind",
            f"must be {choices} or absent ({default_kind().what}), got {_show(meta['kind'])}",
        )
    kind = kind_of(meta)
    _check(meta, kind.schema(), "", source)
    for name, least in MINIMUM.items():
        section, _, key = name.rpartition(".")
        value = meta.get(section, {}).get(key) if section else meta[key]
        if value is not None and value < least:
            raise field_error(source, name, f"must be at least {least}, got {_show(value)}")
    vocab = meta["vocab"]
    if not vocab or any(a >= b for a, b in itertools.pairwise(vocab)):
        raise field_error(
            source, "vocab", "must be one or more distinct characters in code-point order"
        )
    size = meta[kind.shape]["vocab_size"]
    if len(vocab) != size:
        raise field_error(
            source, "vocab", f"has {len(vocab)} characters but {kind.shape}.vocab_size is {size}"
        )
    if kind.check is not None:
        kind.check(meta, source)
    for section, cls in kind.configs.items():
        try:
            config = cls(**meta[section])
            if hasattr(config, "validate"):
                config.validate()
        except (ValueError, CharlmError) as err:
            raise field_error(source, section, f"is not a valid {cls.__name__}: {err}") from None


def _check(value: Any, rule: Rule, name: str, source: str) -> None:
    """Check `value`, the field `name` ("" for the whole document), against its `rule`."""
    if isinstance(rule, dict):
        if not isinstance(value, dict):
            raise field_error(source, name, f"must be an object, got {_show(value)}")
        prefix = f"{name}." if name else ""
        for key in value:
            if key not in rule:
                raise CharlmError(
                    f"{source}: unknown metadata field {prefix}{key} (written by a newer charlm?)"
                )
        for key, field_rule in rule.items():
            if key not in value:
                raise field_error(source, prefix + key, "is missing")
            _check(value[key], field_rule, prefix + key, source)
    elif not any(_is(value, kind) for kind in _kinds(rule)):
        expected = " or ".join(TYPES[kind] for kind in _kinds(rule))
        raise field_error(source, name, f"must be {expected}, got {_show(value)}")


def _kinds(rule: Rule) -> tuple[Any, ...]:
    """The types a rule allows: those of a union, or the rule itself."""
    if typing.get_origin(rule) in (typing.Union, types.UnionType):
        return typing.get_args(rule)
    return (rule,)


def _is(value: Any, kind: Any) -> bool:
    """Whether a JSON value is of `kind`; true and false are not numbers, and a number is finite."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is type(None):
        return value is None
    return isinstance(value, kind)


def _show(value: Any) -> str:
    """A value as JSON, shortened; a list or object by its kind alone."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:39] + "…"
