"""`charlm train`: train a language model, or continue one."""

from __future__ import annotations

from typing import Any

import click

from charlm.cli.common import Duration, rate_option, train_a_kind, user_errors


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
@click.option("--layers", type=int, help="Stacked recurrent layers. [default: 2]")
@click.option("--hidden-size", type=int, help="Hidden units per layer. [default: 256]")
@click.option("--embed-size", type=int, help="Character embedding size. [default: 256]")
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
@click.option("--batch-size", type=int, help="Parallel streams per step. [default: 16]")
@click.option(
    "--seq-len",
    type=int,
    help="Characters per stream per step (truncated BPTT length). [default: 100]",
)
@click.option(
    "--val-fraction",
    type=float,
    help="Fraction at the end of the text held out for validation. [default: 0.1]",
)
@click.option("--encoding", help="Text encoding of CORPUS, e.g. gb18030. [default: utf-8]")
@click.option("--lr", type=float, help="Peak learning rate. [default: 0.01]")
@click.option(
    "--min-lr",
    type=float,
    help="Learning rate at the end of the cosine decay. [default: 0.0001]",
)
@click.option("--warmup-steps", type=int, help="Linear warm-up steps. [default: 100]")
@click.option(
    "--decay-steps",
    type=int,
    help="Step where the cosine decay reaches --min-lr. [default: the run's total steps]",
)
@click.option(
    "--weight-decay",
    type=float,
    help="AdamW weight decay on matrices. [default: 0.1]",
)
@click.option(
    "--beta2",
    type=float,
    help="Adam's second-moment decay rate. [default: 0.99]",
)
@click.option(
    "--clip-norm",
    type=float,
    help="Clip gradients to this global norm. [default: 5]",
)
@click.option(
    "--seed",
    type=int,
    help="Seed for initialisation and dropout. [default: 0]",
)
@click.option(
    "--steps",
    type=int,
    help="Total steps of the run; a resumed run continues up to it. [default: 10 epochs]",
)
@click.option(
    "--epochs",
    type=float,
    help="Total length in passes over the training text, instead of --steps.",
)
@click.option(
    "--time-budget",
    type=Duration(),
    help="Stop after this wall-clock time (e.g. 10m, 1h30m), saving a checkpoint. Alone (no --steps or --epochs), it also sets the run's length: the decay is fitted to the time.",
)
@click.option(
    "--eval-every",
    type=int,
    help="Validate and checkpoint every N steps. [default: 500]",
)
@click.option(
    "--val-max-chars",
    type=int,
    help="Score at most the first N held-out characters at each evaluation (charlm "
    "perplexity scores them all). [default: 250000]",
)
@click.option(
    "--log-every",
    type=int,
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
    corpus: str | None, run_dir: str | None, resume: bool, quiet: bool, **options: Any
) -> None:
    """Train a model on CORPUS: a text file, or the name of a catalog corpus (charlm corpus
    list), which is downloaded and verified, or generated, first if it is not here yet.

    The last --val-fraction of the text is held out and evaluated every --eval-every steps;
    the run directory keeps latest.ckpt, best.ckpt (lowest validation loss) and metrics.jsonl.
    Ctrl-C saves a checkpoint; --resume continues exactly where the run stopped.
    """
    train_a_kind("charlm.lm.training:train", corpus, run_dir, resume, quiet, options)
