"""Perplexity: one carried-state pass, independent of chunking, with unknown characters counted."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, mixed_text
from test_cli import assert_one_line_error, run

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.cli import main
from charlm.errors import CharlmError
from charlm.inference.dynamic_evaluation import (
    DEFAULT_DECAY,
    DEFAULT_LR,
    DEFAULT_SEGMENT_LEN,
    DynamicEvaluation,
)
from charlm.inference.evaluation import Perplexity
from charlm.lm import model
from charlm.lm.checkpoint import load_model
from charlm.lm.evaluation import total_nats, unigram_nats


def test_unigram_baseline_is_the_add_one_frequency_model():
    train = np.array([0, 0, 1])
    # Counts plus one: 3, 2, 1 out of 6; a character never seen in training still gets 1/6.
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_nats(train, np.array([0, 2]), 3) == pytest.approx(expected, rel=1e-12)


def test_result_does_not_depend_on_chunk_size(trained_run: Path):
    small = charlm.perplexity(trained_run, chunk_size=37)
    large = charlm.perplexity(trained_run, chunk_size=4096)
    assert small.characters == large.characters > 1000
    assert small.nats_per_char == pytest.approx(large.nats_per_char, rel=1e-5)


def test_matches_one_uncut_forward_pass(trained_run: Path):
    params, config, vocab = load_model(ckpt.load(ckpt.resolve(trained_run)))
    tokens = vocab.encode("出战 the army rides at dawn 天下大势。\n将军 关羽")
    logits, _ = model.apply(
        params, jnp.asarray(tokens[None, :-1]), model.initial_state(config, 1), config
    )
    expected = optax.softmax_cross_entropy_with_integer_labels(
        logits[0], jnp.asarray(tokens[1:])
    ).sum()
    nats, count = total_nats(params, config, tokens, chunk_size=4)
    assert count == len(tokens) - 1
    assert nats == pytest.approx(float(expected), rel=1e-5)


def test_a_bfloat16_model_is_evaluated_in_float32(trained_run: Path):
    """precision is how a model was trained; one stream is scored in float32 (faster there)."""
    params, config, vocab = load_model(ckpt.load(ckpt.resolve(trained_run)))
    assert config.precision == "float32"
    rounded = dataclasses.replace(config, precision="bfloat16")
    tokens = vocab.encode("出战 the army rides at dawn 天下大势。\n将军 关羽")
    assert total_nats(params, rounded, tokens) == total_nats(params, config, tokens)


def test_held_out_split_scores_as_the_last_validation(trained_run: Path):
    result = charlm.perplexity(trained_run / ckpt.LATEST)
    last = json.loads((trained_run / ckpt.METRICS).read_text().splitlines()[-1])
    assert result.nats_per_char == pytest.approx(last["val_loss"], rel=1e-6)
    assert result.bits_per_char == pytest.approx(result.nats_per_char / math.log(2))
    assert result.perplexity == pytest.approx(math.exp(result.nats_per_char))
    assert "held-out" in result.source


def test_unknown_characters_are_removed_and_counted(trained_run: Path, tmp_path: Path):
    clean = tmp_path / "clean.txt"
    clean.write_text("出战 the army rides at dawn。\n" * 5, encoding="utf-8")
    noisy = tmp_path / "noisy.txt"
    noisy.write_text("出战 the Xarmy rides at dawn。QQ\n" * 5, encoding="utf-8")
    clean_score = charlm.perplexity(trained_run, clean)
    noisy_score = charlm.perplexity(trained_run, noisy)
    assert noisy_score.unknown == {"Q": 10, "X": 5}
    assert noisy_score.characters == clean_score.characters
    assert noisy_score.nats_per_char == pytest.approx(clean_score.nats_per_char, rel=1e-6)
    assert noisy_score.to_dict()["unknown_characters"] == 15


def test_changed_corpus_or_nothing_held_out(corpus_file: Path, tmp_path: Path):
    run = charlm.train(
        str(corpus_file),
        run_dir="nothing-held-out",
        steps=3,
        val_fraction=0.0,
        progress=False,
        **TINY,
    )
    with pytest.raises(CharlmError, match="held nothing out"):
        charlm.perplexity(run.run_dir)
    run = charlm.train(str(corpus_file), run_dir="changed", steps=3, progress=False, **TINY)
    corpus_file.write_text("出战", encoding="utf-8")
    with pytest.raises(CharlmError, match="has changed since training"):
        charlm.perplexity(run.run_dir)


def test_empty_text_has_nothing_to_evaluate(trained_run: Path, tmp_path: Path):
    single = tmp_path / "one.txt"
    single.write_text("出", encoding="utf-8")
    with pytest.raises(CharlmError, match="fewer than 2"):
        charlm.perplexity(trained_run, single)
    assert total_nats(*load_model(ckpt.load(ckpt.resolve(trained_run)))[:2], np.array([1])) == (
        0.0,
        0,
    )


# Trained on 12 words in random order (conftest.mixed_text); here 4 of them in a fixed order.
SHIFTED = "曹操 rides at dawn。\n" * 100


@pytest.fixture
def shifted(tmp_path: Path) -> Path:
    path = tmp_path / "shifted.txt"
    path.write_text(SHIFTED, encoding="utf-8")
    return path


def dynamic_score(run: Path, text: Path, chunk_size: int = 1024, **settings) -> Perplexity:
    return charlm.perplexity(
        run, text, chunk_size=chunk_size, dynamic=DynamicEvaluation(**settings)
    )


def test_dynamic_evaluation_adapts_to_a_shifted_text(trained_run: Path, shifted: Path):
    """Adapting the weights to what has been read learns the new pattern: the tiny model's
    score drops by more than a 10% margin (3.12 to 2.70 nats/char for the tied, dropout-trained
    model of today's defaults; 3.17 to 1.67 for the untied one before; η = 3 diverges)."""
    result = dynamic_score(trained_run, shifted, lr=1.0, segment_len=10)
    assert result.dynamic is not None
    assert result.dynamic.nats_per_char < 0.9 * result.nats_per_char
    assert result.nats_per_char == charlm.perplexity(trained_run, shifted).nats_per_char


def test_dynamic_evaluation_is_deterministic(trained_run: Path, shifted: Path):
    first = dynamic_score(trained_run, shifted, lr=0.3, decay=0.01, segment_len=10)
    second = dynamic_score(trained_run, shifted, lr=0.3, decay=0.01, segment_len=10)
    assert first == second


def test_dynamic_evaluation_with_lr_0_is_the_static_score(trained_run: Path, shifted: Path):
    """With η = 0 the weights never move, whatever λ: only the cutting into calls differs
    (segments of 10, 102 to a call, against static evaluation's 1,024 characters a call)."""
    result = dynamic_score(trained_run, shifted, lr=0.0, decay=0.5, segment_len=10)
    assert result.dynamic is not None
    assert result.dynamic.nats_per_char == pytest.approx(result.nats_per_char, rel=1e-5)


def test_dynamic_evaluation_does_not_depend_on_chunk_size(trained_run: Path, shifted: Path):
    """A compiled call scans chunk_size // segment_len segments, at least one: here 1 or all."""
    one = dynamic_score(trained_run, shifted, 3, lr=0.5, segment_len=10).dynamic
    every = dynamic_score(trained_run, shifted, 4096, lr=0.5, segment_len=10).dynamic
    assert one is not None and every is not None
    assert one.nats_per_char == pytest.approx(every.nats_per_char, rel=1e-5)


def test_dynamic_evaluation_through_the_cli(trained_run: Path, shifted: Path):
    args = ["perplexity", str(shifted), "-c", str(trained_run), "--dynamic"]
    args += ["--dynamic-lr", "1", "--segment-len", "10"]
    as_json = json.loads(run(*args, "--json").stdout)
    dynamic = as_json["dynamic"]
    assert (dynamic["lr"], dynamic["decay"], dynamic["segment_len"]) == (1.0, 0.0, 10)
    assert dynamic["nats_per_char"] < 0.9 * as_json["nats_per_char"]
    assert dynamic["perplexity"] == pytest.approx(math.exp(dynamic["nats_per_char"]))
    text = run(*args).stdout
    assert "dynamic evaluation (η=1, λ=0, segments of 10)" in text
    nats = f"nats/char:       {dynamic['nats_per_char']:<12.4f}{as_json['nats_per_char']:.4f}"
    assert nats in text
    static = run("perplexity", str(shifted), "-c", str(trained_run), "--json").stdout
    assert "dynamic" not in json.loads(static)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dynamic", "--dynamic-lr", "-0.1"], "--dynamic-lr must be a number ≥ 0"),
        (["--dynamic", "--dynamic-lr", "nan"], "--dynamic-lr must be a number ≥ 0"),
        (["--dynamic", "--dynamic-decay", "1.5"], "--dynamic-decay must be between 0 and 1"),
        (["--dynamic", "--segment-len", "0"], "--segment-len must be at least 1"),
        (["--segment-len", "20"], "need --dynamic"),
    ],
)
def test_bad_dynamic_options_are_one_line_errors(
    trained_run: Path, options: list[str], message: str
):
    assert_one_line_error(run("perplexity", "-c", str(trained_run), *options), message)


def test_dynamic_defaults_in_the_help_are_the_real_ones():
    """The CLI states the defaults in its help without importing JAX: they must be these."""
    defaults = {"dynamic_lr": DEFAULT_LR, "dynamic_decay": DEFAULT_DECAY}
    defaults["segment_len"] = DEFAULT_SEGMENT_LEN
    for param in main.commands["perplexity"].params:
        if param.name in defaults:
            stated = re.search(r"\[default: ([^\]]+)\]", getattr(param, "help", "") or "")
            assert stated is not None and float(stated.group(1)) == defaults.pop(param.name)
    assert not defaults


# ---------------------------------------------------------------------------------------------
# Validation during training: the held-out text as parallel streams.


@pytest.mark.parametrize(("streams", "overlap"), [(3, 0), (4, 5), (7, 11)])
def test_streams_score_every_character_exactly_once(streams: int, overlap: int):
    """With no recurrence (W_h = 0, one layer) a character's score does not depend on the state,
    so parallel streams must give the exact one-stream total: a character scored twice or
    missed would show."""
    config = model.ModelConfig(vocab_size=13, cell="rnn", layers=1, hidden_size=8, embed_size=4)
    params = model.init(jax.random.key(0), config)
    params["layers"][0]["w_h"] = jnp.zeros_like(params["layers"][0]["w_h"])
    tokens = np.random.default_rng(0).integers(0, 13, 200)
    exact, count = total_nats(params, config, tokens, chunk_size=16)
    nats, streamed_count = total_nats(params, config, tokens, 16, streams, overlap)
    assert streamed_count == count == 199
    assert nats == pytest.approx(exact, rel=1e-5)


def test_streams_with_overlap_come_close_to_the_exact_score(trained_run: Path):
    """A trained model remembers: streams read from a zero state lose context, which the
    overlap gives back. Cold streams score worse than the exact pass; warm ones come closer."""
    params, config, vocab = load_model(ckpt.load(ckpt.resolve(trained_run)))
    tokens = vocab.encode(mixed_text(lines=60, seed=3))
    exact, _ = total_nats(params, config, tokens)
    cold, _ = total_nats(params, config, tokens, streams=8)
    warm, _ = total_nats(params, config, tokens, streams=8, overlap=30)
    assert cold > exact
    assert abs(warm - exact) < abs(cold - exact)
    assert warm == pytest.approx(exact, rel=0.01)
