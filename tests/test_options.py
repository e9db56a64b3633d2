"""Options are declared once: the command line's options and the server's request are checked
here against the configuration they fill, names, choices and stated defaults alike."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import click
import pytest

from charlm.cli import main
from charlm.inference.interactive import Settings
from charlm.inference.sampling import check_options
from charlm.inference.server import DEFAULT_LENGTH, SampleRequest
from charlm.lm.config import TrainConfig
from charlm.lm.recurrence import CELLS
from charlm.punctuation.config import TaggerTrainConfig
from charlm.training.config import PRECISION_CHOICES

# Options of a training command that no config holds: where the run goes, and how it runs.
RUN_OPTIONS = {
    "corpus",
    "run_dir",
    "resume",
    "quiet",
    "devices",
    "coordinator",
    "num_processes",
    "process_id",
}
# How a help text states a default that is not a number.
STATED = {True: {"on", "bidirectional"}, False: {"off"}}


def command(*path: str) -> click.Command:
    found: click.Command = main
    for name in path:
        assert isinstance(found, click.Group)
        found = found.commands[name]
    return found


def default_of(path: tuple[str, ...], option: click.Parameter) -> Any:
    """The value the command receives for an option that is not given."""
    with command(*path).make_context(" ".join(path), []) as context:
        return context.params[option.name]


def stated_default(option: click.Option) -> str | None:
    """The default that an option's help text states, "[default: X]", or None."""
    match = re.search(r"\[default: ([^]]*)\]", option.help or "")
    return match.group(1) if match else None


def same(stated: str, value: Any) -> bool:
    if isinstance(value, bool):
        return stated in STATED[value]
    if isinstance(value, (int, float)):
        try:
            return float(stated) == value
        except ValueError:
            return False
    return stated == value


@pytest.mark.parametrize(
    ("path", "config"),
    [(("train",), TrainConfig), (("punctuate", "train"), TaggerTrainConfig)],
)
def test_training_options_are_the_fields_of_their_config(path: tuple[str, ...], config: type):
    options = {param.name: param for param in command(*path).params}
    fields = {field.name: field for field in dataclasses.fields(config)}
    assert set(options) - RUN_OPTIONS == set(fields)
    for name, field in fields.items():
        option = options[name]
        assert isinstance(option, click.Option)
        # None on the command line: the config's own default applies.
        assert default_of(path, option) is None, name
        stated = stated_default(option)
        if field.default is None:
            continue
        assert stated is not None, f"{name}: the help states no default"
        assert same(stated, field.default), (
            f"{name}: help says {stated}, {config.__name__} {field.default!r}"
        )
    assert list(options["precision"].type.choices) == list(PRECISION_CHOICES)
    assert list(options["cell"].type.choices) == list(CELLS)


def test_sampling_options_agree_everywhere():
    """`check_options` is where sampling options are checked; the command line, the
    interactive mode's settings and the server's request name the same options with the same
    defaults."""
    checked = {
        name: parameter.default
        for name, parameter in inspect.signature(check_options).parameters.items()
        if name != "chunk_size"
    }
    cli = {param.name: param for param in command("sample").params}
    for name, default in checked.items():
        assert default_of(("sample",), cli[name]) == default, name
    interactive = {field.name: field.default for field in dataclasses.fields(Settings)}
    assert interactive == {**checked, "greedy": False}
    request = {name: field.default for name, field in SampleRequest.model_fields.items()}
    assert {name: request[name] for name in checked if name != "length"} == {
        name: default for name, default in checked.items() if name != "length"
    }
    # The server's length is capped by its --max-length; unset, it is the command line's.
    assert request["length"] is None and checked["length"] == DEFAULT_LENGTH
    assert default_of(("sample",), cli["greedy"]) is False and request["greedy"] is False
