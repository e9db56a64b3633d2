"""The `charlm` command: a thin click shell over charlm.train, charlm.sample, charlm.perplexity,
the punctuation tagger (charlm.punctuation.training, charlm.punctuation.tagger) and the corpus catalog
(charlm.data.catalog).

Nothing here imports JAX at module level, so `charlm --help` answers at once: each command
imports what it runs when it runs. A CharlmError becomes one line on stderr and exit status 1
(charlm.cli.common).
"""

from __future__ import annotations

import click

from charlm import __version__
from charlm.cli.corpus_commands import corpus, corpus_get, corpus_list
from charlm.cli.model_commands import perplexity, sample
from charlm.cli.punctuate_command import punctuate
from charlm.cli.run_commands import plot, runs
from charlm.cli.serve_command import serve
from charlm.cli.train_command import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="charlm")
def main() -> None:
    """Train character-level LSTM, GRU and RNN language models, and sample from them."""


for command in (train, sample, perplexity, punctuate, runs, plot, serve, corpus):
    main.add_command(command)

__all__ = ["corpus_get", "corpus_list", "main", "perplexity", "sample", "train"]
