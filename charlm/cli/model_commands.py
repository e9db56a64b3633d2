"""The model commands: train, sample and perplexity."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from charlm.cli.common import Duration, checkpoint_option, rate_option, user_errors
from charlm.errors import CharlmError


@click.command()
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
@rate_option("--dropout", "Variational dropout on every layer's output, one mask per stream.", 0.2)
@rate_option(
    "--input-dropout", "Variational dropout on the embedded characters, one mask per stream.", 0
)
@rate_option("--embed-dropout", "Drop whole characters from the embedding, per step.", 0.1)
@rate_option("--weight-drop", "DropConnect on the recurrent weights W_h, one mask per step.", 0.25)
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
    "--val-max-chars",
    type=click.IntRange(min=2),
    help="Score at most the first N held-out characters at each evaluation (charlm "
    "perplexity scores them all). [default: 250000]",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    help="Update the loss shown every N steps. [default: 10]",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    help="Share each batch over the first N local devices (GPUs, or CPU devices that "
    "JAX_NUM_CPU_DEVICES makes); 1 turns data parallelism off. A run may resume on another "
    "number. [default: all]",
)
@click.option(
    "--coordinator",
    envvar="CHARLM_COORDINATOR",
    help="HOST:PORT of process 0, for a run of several processes (see docs/scaling-out.md). "
    "[env: CHARLM_COORDINATOR]",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    envvar="CHARLM_NUM_PROCESSES",
    help="Processes in the run. [env: CHARLM_NUM_PROCESSES]",
)
@click.option(
    "--process-id",
    type=click.IntRange(min=0),
    envvar="CHARLM_PROCESS_ID",
    help="This process's number, from 0. [env: CHARLM_PROCESS_ID]",
)
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@user_errors
def train(
    corpus: str | None,
    run_dir: str | None,
    resume: bool,
    quiet: bool,
    devices: int | None,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    **options: Any,
) -> None:
    """Train a model on CORPUS: a text file, or the name of a catalog corpus (charlm corpus
    list), which is downloaded and verified, or generated, first if it is not here yet.

    The last --val-fraction of the text is held out and evaluated every --eval-every steps;
    the run directory keeps latest.ckpt, best.ckpt (lowest validation loss) and metrics.jsonl.
    Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped.
    """
    from charlm.devices import cluster

    if cluster.is_requested(coordinator, num_processes, process_id):
        if run_dir is None:
            raise CharlmError(
                "a run of several processes needs --run-dir, the same for every process "
                "(on a file system they share, to resume)"
            )
        if not os.environ.get(cluster.WORKER):
            command = [sys.executable, "-m", "charlm", *sys.argv[1:]]
            sys.exit(cluster.supervise(command, Path(run_dir), process_id, coordinator))
    # Before anything else of JAX's: a process joins its run first.
    cluster.join(coordinator, num_processes, process_id)
    from charlm.training.loop import train as run_training

    overrides = {name: value for name, value in options.items() if value is not None}
    result = run_training(
        corpus, run_dir=run_dir, resume=resume, progress=not quiet, devices=devices, **overrides
    )
    if result.stop == "interrupted":
        sys.exit(130)


@click.command()
@checkpoint_option
@click.option("--prime", "-p", help="Text to start from. [default: a new line]")
@click.option(
    "--prime-file",
    type=click.Path(dir_okay=False, path_type=str),
    help="Start from the text of this file instead (read as a corpus is, with --encoding).",
)
@click.option("--encoding", help="Text encoding of --prime-file, e.g. gb18030. [default: utf-8]")
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
@click.option(
    "--interactive",
    "-i",
    is_flag=True,
    help="Load the model once, then continue each line typed as a prime; :help lists the "
    "commands that change the options between turns. Ctrl-D ends it.",
)
@user_errors
def sample(
    checkpoint: str | None,
    prime: str | None,
    prime_file: str | None,
    encoding: str | None,
    interactive: bool,
    drop_unknown: bool,
    **options: Any,
) -> None:
    """Generate text from a trained model, streaming it as it is produced.

    With several samples the first streams and the others follow, separated by a line of dashes.
    """
    from charlm.data.text import read_text
    from charlm.inference.sampling import Sampler

    if sum(given is not None for given in (prime, prime_file)) + interactive > 1:
        raise CharlmError("give one of --prime, --prime-file and --interactive")
    if encoding is not None and prime_file is None:
        raise CharlmError("--encoding applies to --prime-file only")
    if prime_file is not None:
        prime = read_text(prime_file, encoding)
    sampler = Sampler.load(checkpoint)
    if interactive:
        _interactive(sampler, drop_unknown, **options)
        return
    _print_samples(sampler.stream(prime or "", drop_unknown=drop_unknown, **options))


def _print_samples(stream: Iterator[list[str]]) -> None:
    """Stream the first sample as it comes; print the others after it."""
    texts: list[str] = []
    for pieces in stream:
        click.echo(pieces[0], nl=False)
        sys.stdout.flush()
        texts = [text + piece for text, piece in zip(texts, pieces)] if texts else pieces
    click.echo()
    for text in texts[1:]:
        click.echo("-" * 40)
        click.echo(text)


def _interactive(sampler: Any, drop_unknown: bool, **options: Any) -> None:
    """The prompt loop of --interactive (charlm.inference.interactive), on a terminal or piped lines."""
    from charlm.inference.interactive import Settings, session, terminal_lines

    settings = Settings(**options)
    sampler.compile(settings.num_samples)
    terminal = sys.stdin.isatty()
    if terminal:
        config = sampler.config
        click.echo(
            f"{config.describe()}, vocabulary "
            f"{config.vocab_size:,}; {settings.describe()}. :help lists the commands; "
            "Ctrl-D quits.",
            err=True,
        )
    lines = terminal_lines("> ") if terminal else (line.rstrip("\n") for line in sys.stdin)
    session(
        sampler,
        settings,
        lines,
        _print_samples,
        lambda message: click.echo(message, err=True),
        drop_unknown=drop_unknown,
    )


@click.command()
@click.argument("text_file", required=False, type=click.Path(path_type=str))
@checkpoint_option
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
@user_errors
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
    from charlm.inference.dynamic_evaluation import DynamicEvaluation
    from charlm.inference.evaluation import perplexity as score

    options: dict[str, Any] = {"lr": dynamic_lr, "decay": dynamic_decay, "segment_len": segment_len}
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
