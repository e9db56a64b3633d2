"""The `charlm` command: a thin click shell over charlm.train, charlm.sample, charlm.perplexity
and the corpus catalog (charlm.catalog).

Nothing here imports JAX at module level, so `charlm --help` answers at once. A CharlmError
becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from charlm import __version__, runtime
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


def _rate_option(flag: str, what: str, default: float) -> Callable[..., Any]:
    """A probability option in [0, 1), such as a dropout rate. Its default is only stated in
    the help: TrainConfig holds it, and the CLI does not import it (nor JAX) for --help."""
    return click.option(
        flag, type=click.FloatRange(0, 1, max_open=True), help=f"{what} [default: {default:g}]"
    )


def _user_errors(command: Callable[..., Any], *, compiles: bool = True) -> Callable[..., Any]:
    """Print a CharlmError as one line and exit 1; never show a traceback for bad input.
    A command that `compiles` first makes the process settings of `charlm.runtime`; the others
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


_user_errors_without_jax = functools.partial(_user_errors, compiles=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="charlm")
def main() -> None:
    """Train character-level LSTM, GRU and RNN language models, and sample from them."""


@main.command()
@click.argument("corpus", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    help="Run directory. [default: runs/CORPUS-NAME, numbered if taken]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --run-dir (default: the latest run here) from its latest checkpoint.",
)
@click.option(
    "--cell", type=click.Choice(["lstm", "gru", "rnn"]), help="Recurrent cell. [default: lstm]"
)
@click.option("--layers", type=click.IntRange(min=1), help="Stacked recurrent layers. [default: 2]")
@click.option(
    "--hidden-size", type=click.IntRange(min=1), help="Hidden units per layer. [default: 256]"
)
@click.option(
    "--embed-size", type=click.IntRange(min=1), help="Character embedding size. [default: 256]"
)
@_rate_option("--dropout", "Variational dropout on every layer's output, one mask per stream.", 0.2)
@_rate_option(
    "--input-dropout", "Variational dropout on the embedded characters, one mask per stream.", 0
)
@_rate_option("--embed-dropout", "Drop whole characters from the embedding, per step.", 0.1)
@_rate_option("--weight-drop", "DropConnect on the recurrent weights W_h, one mask per step.", 0.25)
@click.option(
    "--tie-embeddings/--no-tie-embeddings",
    default=None,
    help="Share the embedding with the output layer (with a projection if the sizes differ). "
    "[default: on]",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    help="Operand type of the matrix multiplies; state, sums and parameters stay float32. "
    "auto: bfloat16 where the processor computes in it (AVX-512 BF16 or AMX, recent GPUs, "
    "TPUs), float32 elsewhere. [default: auto]",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Parallel streams per step. [default: 16]"
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    help="Characters per stream per step (truncated BPTT length). [default: 100]",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    help="Fraction at the end of the text held out for validation. [default: 0.1]",
)
@click.option("--encoding", help="Text encoding of CORPUS, e.g. gb18030. [default: utf-8]")
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate. [default: 0.01]"
)
@click.option(
    "--min-lr",
    type=click.FloatRange(min=0),
    help="Learning rate at the end of the cosine decay. [default: 0.0001]",
)
@click.option(
    "--warmup-steps", type=click.IntRange(min=0), help="Linear warm-up steps. [default: 100]"
)
@click.option(
    "--decay-steps",
    type=click.IntRange(min=1),
    help="Step where the cosine decay reaches --min-lr. [default: the run's total steps]",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    help="AdamW weight decay on matrices. [default: 0.1]",
)
@click.option(
    "--beta2",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Adam's second-moment decay rate. [default: 0.99]",
)
@click.option(
    "--clip-norm",
    type=click.FloatRange(min=0, min_open=True),
    help="Clip gradients to this global norm. [default: 5]",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    help="Seed for initialisation and dropout. [default: 0]",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="Total steps of the run; a resumed run continues up to it. [default: 10 epochs]",
)
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True),
    help="Total length in passes over the training text, instead of --steps.",
)
@click.option(
    "--time-budget",
    type=Duration(),
    help="Stop after this wall-clock time (e.g. 10m, 1h30m), saving a checkpoint. Alone (no --steps or --epochs), it also sets the run's length: the decay is fitted to the time.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    help="Validate and checkpoint every N steps. [default: 500]",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    help="Update the loss shown every N steps. [default: 10]",
)
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@_user_errors
def train(
    corpus: str | None, run_dir: str | None, resume: bool, quiet: bool, **options: Any
) -> None:
    """Train a model on CORPUS: a text file, or the name of a catalog corpus (charlm corpus
    list), which is downloaded and verified, or generated, first if it is not here yet.

    The last --val-fraction of the text is held out and evaluated every --eval-every steps;
    the run directory keeps latest.ckpt, best.ckpt (lowest validation loss) and metrics.jsonl.
    Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped.
    """
    from charlm.training import train as run_training

    overrides = {name: value for name, value in options.items() if value is not None}
    result = run_training(corpus, run_dir=run_dir, resume=resume, progress=not quiet, **overrides)
    if result.stop == "interrupted":
        sys.exit(130)


@main.command()
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(),
    help="Checkpoint file or run directory. [default: the latest run here]",
)
@click.option("--prime", "-p", default="", help="Text to start from. [default: a new line]")
@click.option(
    "--length",
    "-n",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Characters to generate per sample.",
)
@click.option(
    "--temperature",
    "-t",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Softmax temperature; lower is more conservative.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Draw only from the k most likely characters (0: all).",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Draw only from the smallest set of characters with this total probability.",
)
@click.option("--greedy", is_flag=True, help="Always take the most likely character (argmax).")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    help="Random seed; the same seed gives the same text. [default: random]",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Independent samples, drawn in parallel.",
)
@click.option(
    "--drop-unknown",
    is_flag=True,
    help="Leave out prime characters the model never saw, instead of failing.",
)
@_user_errors
def sample(checkpoint: str | None, num_samples: int, **options: Any) -> None:
    """Generate text from a trained model, streaming it as it is produced.

    With several samples the first streams and the others follow, separated by a line of dashes.
    """
    from charlm.sampling import sample_stream

    texts = [""] * num_samples
    for pieces in sample_stream(checkpoint, num_samples=num_samples, **options):
        click.echo(pieces[0], nl=False)
        sys.stdout.flush()
        texts = [text + piece for text, piece in zip(texts, pieces)]
    click.echo()
    for text in texts[1:]:
        click.echo("-" * 40)
        click.echo(text)


@main.command()
@click.argument("text_file", required=False, type=click.Path(path_type=str))
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(),
    help="Checkpoint file or run directory. [default: the latest run here]",
)
@click.option("--encoding", help="Text encoding of TEXT_FILE. [default: utf-8]")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Characters per compiled call (memory only; the result does not depend on it).",
)
@click.option(
    "--dynamic",
    is_flag=True,
    help="Also score by dynamic evaluation: after scoring each segment, take a gradient step "
    "on it (Krause et al. 2018).",
)
@click.option(
    "--dynamic-lr",
    type=float,
    help="Dynamic evaluation's step size η. [default: 0.05]",
)
@click.option(
    "--dynamic-decay",
    type=float,
    help="Dynamic evaluation's decay λ toward the trained weights, per segment. [default: 0]",
)
@click.option(
    "--segment-len",
    type=int,
    help="Characters per dynamic-evaluation segment (one step each). [default: 50]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@_user_errors
def perplexity(
    text_file: str | None,
    checkpoint: str | None,
    encoding: str | None,
    chunk_size: int,
    dynamic: bool,
    dynamic_lr: float | None,
    dynamic_decay: float | None,
    segment_len: int | None,
    as_json: bool,
) -> None:
    """Score a model on TEXT_FILE, or on its training run's held-out split.

    Prints the characters evaluated, nats and bits per character, and perplexity. Characters
    outside the model's vocabulary are removed from the text before scoring, and counted. With
    --dynamic it prints the dynamic-evaluation score and the static one beside it.
    """
    from charlm.dynamic import DynamicEvaluation
    from charlm.evaluation import perplexity as score

    options = {"lr": dynamic_lr, "decay": dynamic_decay, "segment_len": segment_len}
    given = {name: value for name, value in options.items() if value is not None}
    if given and not dynamic:
        raise CharlmError("--dynamic-lr, --dynamic-decay and --segment-len need --dynamic")
    settings = DynamicEvaluation(**given) if dynamic else None
    result = score(
        checkpoint, text_file, encoding=encoding, chunk_size=chunk_size, dynamic=settings
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo(f"text:            {result.source}")
    click.echo(f"characters:      {result.characters:,}")
    if result.dynamic is None:
        click.echo(f"nats/char:       {result.nats_per_char:.4f}")
        click.echo(f"bits/char:       {result.bits_per_char:.4f}")
        click.echo(f"perplexity:      {result.perplexity:.3f}")
    else:
        adapted = result.dynamic
        click.echo(f"{'':17}{'dynamic':12}static")
        click.echo(f"nats/char:       {adapted.nats_per_char:<12.4f}{result.nats_per_char:.4f}")
        click.echo(f"bits/char:       {adapted.bits_per_char:<12.4f}{result.bits_per_char:.4f}")
        click.echo(f"perplexity:      {adapted.perplexity:<12.3f}{result.perplexity:.3f}")
        click.echo(adapted.settings.describe())
    if result.unknown:
        listed = ", ".join(
            f"{ch!r}×{n}" for ch, n in sorted(result.unknown.items(), key=lambda x: -x[1])[:10]
        )
        click.echo(f"unknown chars:   {sum(result.unknown.values()):,} removed ({listed})")


@main.group()
def corpus() -> None:
    """The catalog of named corpora: list it, and download or generate a corpus.

    Corpora are kept in $CHARLM_DATA_DIR (default ~/.cache/charlm/corpora). Set
    CHARLM_CORPUS_MIRROR to a directory or base URL holding NAME.txt files to work offline.
    """


@corpus.command("list")
@_user_errors_without_jax
def corpus_list() -> None:
    """Show the catalog, and which corpora are here (with their sizes)."""
    from charlm import catalog

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
@_user_errors_without_jax
def corpus_get(name: str, timeout: float, quiet: bool, **options: Any) -> None:
    """Download the catalog corpus NAME, check its sha256, normalise it, check it again and
    put it in place; or generate it (addition). Prints where it is.

    A corpus already here and intact is kept. Nothing is left behind when a download fails.
    """
    from charlm import catalog

    given = {key: value for key, value in options.items() if value is not None}
    fetched = catalog.get(name, timeout=timeout, progress=not quiet, **given)
    click.echo(f"{name}: {fetched.path} ({fetched.size:,} bytes, {fetched.origin})")
