"""The commands about runs rather than models: charlm runs and charlm plot."""

from __future__ import annotations

import json
from pathlib import Path

import click

from charlm.cli.common import user_errors_without_jax
from charlm.errors import CharlmError


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@click.command()
@click.argument("directory", required=False, default="runs", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@user_errors_without_jax
def runs(directory: Path, as_json: bool) -> None:
    """List the runs under DIRECTORY [default: runs]: corpus, model, steps, best validation
    loss, training time, and which is the latest (the one sample and perplexity default to)."""
    from charlm.runs.listing import find_runs, latest_run, summarize

    latest = latest_run()
    latest = latest.resolve() if latest else None
    summaries = [summarize(path, latest=path.resolve() == latest) for path in find_runs(directory)]
    if as_json:
        for summary in summaries:
            click.echo(json.dumps(summary.to_dict(), ensure_ascii=False))
        return
    if not summaries:
        click.echo(f"no runs in {directory}")
        return
    width = max(len(s.path) for s in summaries) + 2
    click.echo(
        f"  {'run':<{width}}{'corpus':<20}{'model':<13}{'steps':>8}"
        f"{'best val':>10}{'bits/char':>11}{'time':>9}"
    )
    for s in summaries:
        mark = "* " if s.latest else "  "
        if s.steps is None:
            click.echo(f"{mark}{s.path:<{width}}no readable checkpoint: {s.problem}")
            continue
        best = f"{s.best_val_loss:.4f}" if s.best_val_loss is not None else "—"
        bits = f"{s.best_val_bpc:.3f}" if s.best_val_bpc is not None else "—"
        click.echo(
            f"{mark}{s.path:<{width}}{s.corpus:<20.19}{s.model:<13}{s.steps:>8,}"
            f"{best:>10}{bits:>11}{_duration(s.seconds):>9}"
            + (f"  ({s.problem})" if s.problem else "")
        )
    if any(s.latest for s in summaries):
        click.echo("* the latest run (the default of sample, perplexity and plot)")


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Picture to write (.png, .svg or .pdf). [default: RUN/loss.png for one run, "
    "loss.png here for several]",
)
@click.option(
    "--x",
    "x_axis",
    type=click.Choice(["step", "time"]),
    default="step",
    show_default=True,
    help="Horizontal axis: training steps, or wall time in minutes.",
)
@click.option("--title", help="Title of the figure. [default: the runs' names]")
@user_errors_without_jax
def plot(run_dirs: tuple[Path, ...], output: Path | None, x_axis: str, title: str | None) -> None:
    """Draw training and validation loss (nats per character, bits per character on the right)
    of RUN_DIRS on one figure, to compare them. [default: the latest run here]

    Validation loss is solid, training loss dashed in the same colour. Prints the file written.
    """
    from charlm.runs.listing import latest_run

    runs = list(run_dirs)
    if not runs:
        latest = latest_run()
        if latest is None:
            raise CharlmError("no run recorded in this directory; name the run directories to plot")
        runs = [latest]
    for run in runs:
        if not run.is_dir():
            raise CharlmError(f"no run directory {run}")
    if output is None:
        output = runs[0] / "loss.png" if len(runs) == 1 else Path("loss.png")

    from charlm.runs.plot import plot_runs

    click.echo(plot_runs(runs, output, x=x_axis, title=title))
