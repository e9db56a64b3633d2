"""`charlm punctuate`: restore punctuation with a tagger, train one, and score one.

`punctuate` is both a group (train, score) and a command on a FILE. `PunctuateGroup` is a
click Group whose first argument, when it names no subcommand, goes to the hidden tagging
command, so that `charlm punctuate FILE`, `charlm punctuate - < text` and `charlm punctuate
train CORPUS` all read as they are written. Its help shows the tagging command's options.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from charlm.cli.common import checkpoint_option, rate_option, train_a_kind, user_errors
from charlm.cli.train_command import train as train_language_model
from charlm.errors import CharlmError

TAG = "text"


class PunctuateGroup(click.Group):
    """A group that runs its hidden command `text` when its first argument is no subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [TAG, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[FILE | -] [OPTIONS]")
        formatter.write_usage(ctx.command_path, "train CORPUS [OPTIONS]", prefix="       ")
        formatter.write_usage(ctx.command_path, "score [FILE] [OPTIONS]", prefix="       ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        tag = self.commands[TAG]
        options = [param for param in tag.get_params(ctx) if isinstance(param, click.Option)]
        records = [record for param in options if (record := param.get_help_record(ctx))]
        with formatter.section("Options"):
            formatter.write_dl(records)
        self.format_commands(ctx, formatter)


@click.group(cls=PunctuateGroup)
def punctuate() -> None:
    """Restore punctuation to text with a tagger trained by `charlm punctuate train`, printing
    the text of FILE (or of stdin, with - or no FILE) punctuated.

    Marks already in the text are removed first; with --keep they stay, and predicted marks
    are added only after characters that have none. Characters the tagger never saw pass
    through unchanged (a note on stderr counts them). `charlm punctuate train` and `charlm
    punctuate score` are subcommands: a first argument that names neither is the FILE.
    """


def _read_input(file: str | None, encoding: str | None) -> str:
    """The text of `file`, or of stdin for - or None; "" for an empty one."""
    from charlm.data.text import existing_file, read_text

    if file not in (None, "-") and existing_file(file).stat().st_size == 0:
        return ""
    if file in (None, "-"):
        data = sys.stdin.buffer.read()
        try:
            return data.decode(encoding or "utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
        except (UnicodeDecodeError, LookupError) as err:
            raise CharlmError(f"stdin is not {encoding or 'utf-8'} text: {err}") from None
    return read_text(file, encoding)


@punctuate.command(TAG, hidden=True)
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@checkpoint_option
@click.option(
    "--keep", is_flag=True, help="Keep the marks in the text; add marks only where none is."
)
@click.option("--encoding", help="Text encoding of FILE or stdin. [default: utf-8]")
@user_errors
def tag_text(file: str | None, checkpoint: str | None, keep: bool, encoding: str | None) -> None:
    from charlm.punctuation.marks import runs_after
    from charlm.punctuation.tagger import Tagger

    text = _read_input(file, encoding)
    if not text:
        return
    tagger = Tagger.load(checkpoint)
    leading, stripped, present = runs_after(text)
    labels, unknown = tagger.labels(stripped)
    after = ("", *tagger.marks.label_strings)
    predicted = [after[label] for label in labels.tolist()]
    runs = [old or new for old, new in zip(present, predicted)] if keep else predicted
    click.echo((leading if keep else "") + "".join(c + r for c, r in zip(stripped, runs)), nl=False)
    if unknown:
        listed = ", ".join(
            f"{c!r}×{n}" for c, n in sorted(unknown.items(), key=lambda x: -x[1])[:10]
        )
        click.echo(
            f"charlm: note: {sum(unknown.values()):,} characters unknown to the tagger passed "
            f"through without marks ({listed})",
            err=True,
        )


# The options of a tagger's run that mean, and default to, what charlm train's do: the same
# click options, so that the two commands cannot drift apart.
SHARED_WITH_TRAIN = (
    "cell",
    "layers",
    "hidden_size",
    "embed_size",
    "precision",
    "val_fraction",
    "encoding",
    "min_lr",
    "warmup_steps",
    "decay_steps",
    "weight_decay",
    "beta2",
    "clip_norm",
    "steps",
    "epochs",
    "time_budget",
    "eval_every",
    "log_every",
    "devices",
    "coordinator",
    "num_processes",
    "process_id",
)


def shared_with_train(command: click.Command) -> click.Command:
    """`command` with charlm train's options named in SHARED_WITH_TRAIN, after its own (its
    last, --quiet, last of all)."""
    options = {param.name: param for param in train_language_model.params}
    command.params[-1:-1] = [options[name] for name in SHARED_WITH_TRAIN]
    return command


@shared_with_train
@punctuate.command()
@click.argument("corpus", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    help="Run directory. [default: runs/CORPUS-NAME-punctuate, numbered if taken]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --run-dir (default: the latest tagger run here) from its latest "
    "checkpoint.",
)
@click.option(
    "--bidirectional/--no-bidirectional",
    default=None,
    help="Run a backward recurrence beside the forward one in every layer (--hidden-size "
    "units each); --no-bidirectional is the forward-only baseline. [default: bidirectional]",
)
@click.option(
    "--init-from",
    type=click.Path(),
    help="Start the forward direction's first layer and the embedding from this language "
    "model (a checkpoint or run directory of charlm train, same cell and sizes).",
)
@click.option(
    "--max-labels",
    type=int,
    help="Label set: the commonest runs of marks in CORPUS, at most this many. [default: 32]",
)
@click.option("--batch-size", type=int, help="Windows per step. [default: 32]")
@click.option(
    "--seq-len",
    type=int,
    help="Characters per window, in training and in tagging. [default: 100]",
)
@rate_option(
    "--dropout",
    "Variational dropout on every layer's output, each direction and window its own.",
    0.4,
)
@rate_option("--embed-dropout", "Drop whole characters from the embedding, per step.", 0.1)
@rate_option(
    "--weight-drop", "DropConnect on each direction's recurrent weights W_h, per step.", 0.4
)
@click.option("--lr", type=float, help="Peak learning rate. [default: 0.005]")
@click.option(
    "--seed",
    type=int,
    help="Seed for initialisation, the training windows and dropout. [default: 0]",
)
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@user_errors
def train(
    corpus: str | None, run_dir: str | None, resume: bool, quiet: bool, **options: Any
) -> None:
    """Train a punctuation tagger on CORPUS, a punctuated text file or a catalog corpus.

    Each character is labelled with the run of marks that follows it; the marks are removed
    and a deep bidirectional RNN learns the labels from the characters on both sides. The last
    --val-fraction is held out and scored (loss and sentence-break F1) every --eval-every steps;
    the run directory keeps latest.ckpt, best.ckpt and metrics.jsonl, as charlm train's does.
    Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped. It trains
    through the same run skeleton as charlm train: --devices and runs of several processes
    work as there.
    """
    train_a_kind(
        "charlm.punctuation.training:train_tagger", corpus, run_dir, resume, quiet, options
    )


@punctuate.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@checkpoint_option
@click.option("--encoding", help="Text encoding of FILE. [default: utf-8]")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
@user_errors
def score(file: str | None, checkpoint: str | None, encoding: str | None, as_json: bool) -> None:
    """Score a tagger on a punctuated FILE, or on its training run's held-out split.

    The marks are removed, the tagger restores them, and its marks are compared with the
    original's: sentence breaks (any mark after a character) and each run of marks of the
    tagger's label set, with precision, recall, F1, support (how many the text has) and how
    many were predicted.
    """
    from charlm.punctuation.tagger import score_tagger

    result = score_tagger(checkpoint, file, encoding=encoding)
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    for line in result.table():
        click.echo(line)
