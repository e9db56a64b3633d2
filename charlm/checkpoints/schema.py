"""The metadata document of a checkpoint: its schema, and its validation when a file is read.

The document is the JSON object that `charlm.training.loop` writes with every checkpoint (see
`charlm.checkpoints.file_format`), or `charlm.punctuation.training` with a punctuation tagger's. A tagger's
document says `"kind": "tagger"`; a language model's has no kind, as every checkpoint written
before taggers existed. The rules for the config sections (a language model's `model` and
`train`, a tagger's `tagger` and `train`) come from the fields of their dataclasses and their
annotated types, so a field added to one is checked with no change here; the other sections
are written out in `schema`.
Every problem is one CharlmError line that names the file and the field, for example
`runs/x/latest.ckpt: metadata field model.hidden_size must be an integer, got "256"`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
import typing
from typing import Any

from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.config import TrainConfig
from charlm.punctuation import model as tagger
from charlm.punctuation.config import TaggerTrainConfig
from charlm.punctuation.marks import MarkSet

# The kinds of model a checkpoint holds: its document's `kind` field, absent for a language model.
LANGUAGE_MODEL = "language model"
TAGGER = "tagger"

# A field's rule is one of the types in KINDS, a union of them such as `str | None`, or, for a
# nested object, a dict of the rules of its fields (each required, no others allowed).
Rule = Any
KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    type(None): "null",
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


def field_error(source: str, name: str, problem: str) -> CharlmError:
    """The error for metadata field `name` (dotted, as `model.cell`) of the file `source`."""
    return CharlmError(f"{source}: metadata field {name} {problem}")


def kind(meta: dict[str, Any]) -> str:
    """The kind of model that a checked metadata document describes."""
    return meta.get("kind", LANGUAGE_MODEL)


def config_classes(of: str = LANGUAGE_MODEL) -> dict[str, type]:
    """The dataclass of each config section of a document of kind `of`: a language model's
    model and train, a tagger's tagger and train."""
    if of == TAGGER:
        return {"tagger": tagger.TaggerConfig, "train": TaggerTrainConfig}
    return {"model": model.ModelConfig, "train": TrainConfig}


def config_rules(cls: type) -> dict[str, Rule]:
    """The rule of each field of the config dataclass `cls`: its annotated type."""
    hints = typing.get_type_hints(cls)
    rules = {field.name: hints[field.name] for field in dataclasses.fields(cls)}
    for name, rule in rules.items():
        if any(kind not in KINDS for kind in _kinds(rule)):
            raise TypeError(f"checkpoints cannot record {cls.__name__}.{name} of type {rule}")
    return rules


def schema(of: str = LANGUAGE_MODEL) -> dict[str, Rule]:
    """The rules of a checkpoint's whole metadata document, of kind `of`."""
    configs = {section: config_rules(cls) for section, cls in config_classes(of).items()}
    if of == TAGGER:
        own: dict[str, Rule] = {
            "kind": str,
            "tagger": configs["tagger"],
            "marks": {"label_strings": list},
        }
        # A tagger's best checkpoint is its best at breaking sentences, not its lowest loss.
        scores: dict[str, Rule] = {"val_break_f1": float | None, "best_val_break_f1": float | None}
    else:
        own = {
            "model": configs["model"],
            "data_position": {"steps_per_epoch": int, "stream_offset": int},
        }
        scores = {"best_val_loss": float | None}
    return {
        "charlm_version": str,
        "created": str,
        **own,
        "vocab": str,
        "train": configs["train"],
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
        **scores,
    }


def validate(meta: Any, source: str) -> None:
    """Check every field of the metadata document `meta` read from the file `source`: present,
    known, of its type, and a value its config accepts; raises CharlmError naming the first
    field that is not."""
    if not isinstance(meta, dict):
        raise field_error(source, "meta", f"must be a JSON object, got {_show(meta)}")
    of = kind(meta)
    if of not in (LANGUAGE_MODEL, TAGGER):
        raise field_error(
            source, "kind", f'must be "{TAGGER}" or absent (a language model), got {_show(of)}'
        )
    _check(meta, schema(of), "", source)
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
    shape = "tagger" if of == TAGGER else "model"
    if len(vocab) != meta[shape]["vocab_size"]:
        raise field_error(
            source,
            "vocab",
            f"has {len(vocab)} characters but {shape}.vocab_size is {meta[shape]['vocab_size']}",
        )
    if of == TAGGER:
        _check_marks(meta, source)
    for section, cls in config_classes(of).items():
        try:
            config = cls(**meta[section])
            if hasattr(config, "validate"):
                config.validate()
        except (ValueError, CharlmError) as err:
            raise field_error(source, section, f"is not a valid {cls.__name__}: {err}") from None


def _check_marks(meta: dict[str, Any], source: str) -> None:
    """A tagger's label set: runs of marks, one label each besides "no mark"."""
    runs = meta["marks"]["label_strings"]
    try:
        marks = MarkSet.from_dict(meta["marks"])
    except (TypeError, ValueError) as err:
        raise field_error(source, "marks.label_strings", f"is not a label set: {err}") from None
    if marks.num_labels != meta["tagger"]["num_labels"]:
        raise field_error(
            source,
            "marks.label_strings",
            f"has {len(runs)} runs of marks but tagger.num_labels is "
            f"{meta['tagger']['num_labels']} (one more, for no mark, is needed)",
        )


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
        expected = " or ".join(KINDS[kind] for kind in _kinds(rule))
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
