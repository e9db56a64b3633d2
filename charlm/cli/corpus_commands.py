"""The corpus catalog's commands: charlm corpus list and charlm corpus get."""

from __future__ import annotations

import os
from typing import Any

import click

from charlm.cli.common import user_errors_without_jax


@click.group()
def corpus() -> None:
    """The catalog of named corpora: list it, and download or generate a corpus.

    Corpora are kept in $CHARLM_DATA_DIR (default ~/.cache/charlm/corpora). Set
    CHARLM_CORPUS_MIRROR to a directory or base URL holding NAME.txt files to work offline.
    """


@corpus.command("list")
@user_errors_without_jax
def corpus_list() -> None:
    """Show the catalog, and which corpora are here (with their sizes)."""
    from charlm.data import catalog

    entries = catalog.load_catalog().values()
    width = max(len(entry.name) for entry in entries) + 2
    click.echo(f"{'name':<{width}}{'here':<10}{'bytes':>11}  description")
    for entry in entries:
        state = catalog.local_state(entry)
        if state != "missing":
            size = f"{catalog.local_path(entry.name).stat().st_size:,}"
        else:
            size = "generated" if entry.generated else f"{entry.size:,}"
        about = f"{entry.description} ({entry.language}; {entry.licence})"
        click.echo(f"{entry.name:<{width}}{state:<10}{size:>11}  {about}")
    mirror = os.environ.get(catalog.MIRROR_VARIABLE) or "none"
    click.echo(f"\nkept in {catalog.data_dir()} (${catalog.DATA_DIR_VARIABLE})")
    click.echo(f"mirror: {mirror} (${catalog.MIRROR_VARIABLE})")


@corpus.command("get")
@click.argument("name")
@click.option(
    "--lines", type=click.IntRange(min=1), help="addition only: lines to generate. [default: 50000]"
)
@click.option(
    "--bits", type=click.IntRange(min=1), help="addition only: bits per operand. [default: 8]"
)
@click.option(
    "--seed", type=int, help="addition only: the same seed gives the same file. [default: 0]"
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the network before giving up.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors_without_jax
def corpus_get(name: str, timeout: float, quiet: bool, **options: Any) -> None:
    """Download the catalog corpus NAME, check its sha256, normalise it, check it again and
    put it in place; or generate it (addition). Prints where it is.

    A corpus already here and intact is kept. Nothing is left behind when a download fails.
    """
    from charlm.data import catalog

    given = {key: value for key, value in options.items() if value is not None}
    fetched = catalog.get(name, timeout=timeout, progress=not quiet, **given)
    click.echo(f"{name}: {fetched.path} ({fetched.size:,} bytes, {fetched.origin})")
