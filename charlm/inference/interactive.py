"""`charlm sample --interactive`: one loaded model, many primes.

Each line read is a prime whose continuation is streamed; a line that starts with a colon is a
command that changes the settings of the turns after it (`:t 0.7`, `:k 40`, `:help`). The model
is loaded and compiled once, before the first prompt, so every turn answers at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from charlm.inference.sampling import SampleError, Sampler, check_options

HELP = """\
Type a prime and press Enter to continue it; an empty line starts a fresh paragraph.
Commands (a prime that starts with a colon is written with two, "::"):
  :t T       temperature (e.g. :t 0.7)      :n N      characters per continuation
  :k K       top-k (0: all)                 :p P      top-p (1: all)
  :seed S    fixed seed (:seed none for random)
  :greedy    argmax on or off (:greedy off)  :show     the current settings
  :help      this text                       :q        quit (or Ctrl-D)
Ctrl-C stops a continuation."""


@dataclass(frozen=True)
class Settings:
    """The options of every turn, as `Sampler.stream` takes them."""

    length: int = 500
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False
    num_samples: int = 1

    def describe(self) -> str:
        seed = "random" if self.seed is None else self.seed
        mode = "greedy" if self.greedy else f"temperature {self.temperature:g}"
        return (
            f"{mode}, top-k {self.top_k}, top-p {self.top_p:g}, "
            f"{self.length} characters, seed {seed}"
        )


# A command's name: the Settings field it sets, how its argument is read, and an example.
_COMMANDS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "t": ("temperature", float, ":t 0.7"),
    "n": ("length", int, ":n 300"),
    "k": ("top_k", int, ":k 40"),
    "p": ("top_p", float, ":p 0.9"),
    "seed": ("seed", lambda text: None if text in ("none", "random") else int(text), ":seed 7"),
    "greedy": ("greedy", lambda text: {"on": True, "off": False, "": True}[text], ":greedy off"),
}


class Quit(Exception):
    """The user asked to end the session."""


def apply_command(line: str, settings: Settings) -> tuple[Settings, str]:
    """The settings after the command `line` (":t 0.7"), and the line to show the user.
    Raises SampleError for a value out of range or a command that does not exist, and Quit
    for :q."""
    name, _, argument = line[1:].strip().partition(" ")
    argument = argument.strip().lower()
    if name in ("q", "quit"):
        raise Quit
    if name == "help":
        return settings, HELP
    if name == "show":
        return settings, settings.describe()
    if name not in _COMMANDS:
        raise SampleError("command", f"unknown command :{name}; :help lists them")
    field, parse, example = _COMMANDS[name]
    try:
        value = parse(argument)
    except (ValueError, KeyError):
        raise SampleError(field, f":{name} needs a value, such as {example}") from None
    changed = dataclasses.replace(settings, **{field: value})
    options = dataclasses.asdict(changed)
    del options["greedy"]
    check_options(**options)
    return changed, changed.describe()


def session(
    sampler: Sampler,
    settings: Settings,
    lines: Iterable[str],
    print_samples: Callable[[Iterator[list[str]]], None],
    note: Callable[[str], None],
    *,
    drop_unknown: bool = False,
) -> None:
    """Answer each line of `lines` until they end or :q: a command changes `settings`, any
    other line is a prime whose sample stream (`Sampler.stream`) goes to `print_samples`.
    Problems with a line go to `note` and the session goes on. Ctrl-C (KeyboardInterrupt) while a continuation
    streams ends that continuation only."""
    for line in lines:
        if line.startswith(":") and not line.startswith("::"):
            try:
                settings, message = apply_command(line, settings)
            except SampleError as err:
                message = f"error: {err}"
            except Quit:
                return
            note(message)
            continue
        prime = line[1:] if line.startswith("::") else line
        try:
            print_samples(
                sampler.stream(prime, drop_unknown=drop_unknown, **dataclasses.asdict(settings))
            )
        except SampleError as err:
            note(f"error: {err}")
        except KeyboardInterrupt:
            note("\n(stopped)")


def terminal_lines(prompt: str) -> Iterator[str]:
    """Lines typed at `prompt`, with line editing and history where readline exists; Ctrl-C
    at the prompt gives a fresh one, Ctrl-D ends the lines."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() edits lines and keeps history once imported)
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
