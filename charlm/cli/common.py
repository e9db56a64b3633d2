"""What every charlm command shares: duration and rate options, joining a run of several
processes, and turning a CharlmError into one line on stderr and exit status 1."""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from charlm.devices import process_settings as runtime
from charlm.errors import CharlmError

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


class Duration(click.ParamType):
    """A time span such as 90, 90s, 10m or 1h30m, in seconds."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        match = _DURATION.fullmatch(str(value).strip())
        if not value or not match or not any(match.groups()):
            self.fail(
                f"{value!r} is not a duration; write it like 600, 90s, 10m or 1h30m", param, ctx
            )
        hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        return hours * 3600 + minutes * 60 + seconds


# The model that sample, perplexity and serve use.
checkpoint_option = click.option(
    "--checkpoint",
    "-c",
    type=click.Path(),
    help="Checkpoint file or run directory. [default: the latest run here]",
)


def rate_option(flag: str, what: str, default: float) -> Callable[..., Any]:
    """A probability option in [0, 1), such as a dropout rate. Its default is only stated in
    the help, and its range checked with the other options (`charlm.training.config.check`):
    the config holds both, and the CLI does not import it (nor JAX) for --help."""
    return click.option(flag, type=float, help=f"{what} [default: {default:g}]")


def user_errors(command: Callable[..., Any], *, compiles: bool = True) -> Callable[..., Any]:
    """Print a CharlmError as one line and exit 1; never show a traceback for bad input.
    A command that `compiles` first makes the process settings of `charlm.devices.process_settings`; the others
    (the corpus commands) never import JAX."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if compiles:
                runtime.reuse_freed_memory()
                runtime.enable_compilation_cache()
            return command(*args, **kwargs)
        except CharlmError as err:
            click.echo(f"charlm: error: {err}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except OSError as err:
            # A run directory that cannot be made, a full disk, a file that cannot be read.
            where = f": {err.filename}" if err.filename else ""
            click.echo(f"charlm: error: {err.strerror or err}{where}", err=True)
            sys.exit(1)

    return wrapper


user_errors_without_jax = functools.partial(user_errors, compiles=False)


def join_run(
    run_dir: str | None,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Make this process one of a run of several, when the options (or a scheduler) ask for
    it: the process the user started supervises a child that does the work (and exits with
    it), and the child joins the other processes before anything else of JAX's runs."""
    from charlm.devices import cluster

    cluster.join_timeout()  # checked in every run, as an option is, used or not
    if cluster.is_requested(coordinator, num_processes, process_id):
        if run_dir is None:
            raise CharlmError(
                "a run of several processes needs --run-dir, the same for every process "
                "(on a file system they share, to resume)"
            )
        if not os.environ.get(cluster.WORKER):
            command = [sys.executable, "-m", "charlm", *sys.argv[1:]]
            sys.exit(cluster.supervise(command, Path(run_dir), process_id, coordinator))
    cluster.join(coordinator, num_processes, process_id)


def train_a_kind(
    trainer: str, corpus: str | None, run_dir: str | None, resume: bool, quiet: bool, options: Any
) -> None:
    """What a training command does, for the kind whose train function `trainer` names
    ("module:function", imported once the process has joined its run): join the run's
    processes, train with the options given (the others keep their config's defaults), and
    exit with status 130 when Ctrl-C stopped the run."""
    cluster = {name: options.pop(name) for name in ("coordinator", "num_processes", "process_id")}
    join_run(run_dir, **cluster)
    module, _, function = trainer.partition(":")
    train = getattr(importlib.import_module(module), function)
    devices = options.pop("devices")
    overrides = {name: value for name, value in options.items() if value is not None}
    progress = not quiet
    result = train(
        corpus, run_dir=run_dir, resume=resume, progress=progress, devices=devices, **overrides
    )
    if result.stop == "interrupted":
        sys.exit(130)
