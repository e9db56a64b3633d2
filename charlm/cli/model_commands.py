"""The commands that use a trained language model: sample and perplexity."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click

from charlm.cli.common import checkpoint_option, user_errors
from charlm.errors import CharlmError


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
    type=int,
    default=500,
    show_default=True,
    help="Characters to generate per sample.",
)
@click.option(
    "--temperature",
    "-t",
    type=float,
    default=1.0,
    show_default=True,
    help="Softmax temperature; lower is more conservative.",
)
@click.option(
    "--top-k",
    type=int,
    default=0,
    show_default=True,
    help="Draw only from the k most likely characters (0: all).",
)
@click.option(
    "--top-p",
    type=float,
    default=1.0,
    show_default=True,
    help="Draw only from the smallest set of characters with this total probability.",
)
@click.option("--greedy", is_flag=True, help="Always take the most likely character (argmax).")
@click.option(
    "--seed",
    type=int,
    help="Random seed; the same seed gives the same text. [default: random]",
)
@click.option(
    "--num-samples",
    type=int,
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
