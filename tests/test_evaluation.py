"""Perplexity: one carried-state pass, independent of chunking, with unknown characters counted."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY

import charlm
from charlm import checkpoint as ckpt
from charlm import model
from charlm.errors import CharlmError
from charlm.evaluation import total_nats


def test_result_does_not_depend_on_chunk_size(trained_run: Path):
    small = charlm.perplexity(trained_run, chunk_size=37)
    large = charlm.perplexity(trained_run, chunk_size=4096)
    assert small.characters == large.characters > 1000
    assert small.nats_per_char == pytest.approx(large.nats_per_char, rel=1e-5)


def test_matches_one_uncut_forward_pass(trained_run: Path):
    params, config, vocab = ckpt.load_model(ckpt.load(ckpt.resolve(trained_run)))
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
    params, config, vocab = ckpt.load_model(ckpt.load(ckpt.resolve(trained_run)))
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
    assert total_nats(
        *ckpt.load_model(ckpt.load(ckpt.resolve(trained_run)))[:2], np.array([1])
    ) == (0.0, 0)
