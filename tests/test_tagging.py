"""The tagger's training run, windows, checkpoints and scores (charlm.punctuation.tagger,
charlm.punctuation.training, charlm.punctuation.scores)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints import schema as checkpoint_meta
from charlm.errors import CharlmError
from charlm.lm.checkpoint import load_model
from charlm.punctuation.checkpoint import NO_TAGGER_DROPOUT
from charlm.punctuation.scores import score_labels
from charlm.punctuation.tagger import Tagger, score_tagger, window_batch, window_plan
from charlm.punctuation.training import train_tagger

# A tagger small enough to train in a few seconds on 2 cores; float32 on every machine.
TINY_TAGGER = dict(
    hidden_size=16,
    embed_size=8,
    layers=1,
    batch_size=8,
    seq_len=24,
    log_every=5,
    eval_every=20,
    lr=1e-2,
    warmup_steps=10,
    precision="float32",
)
WORDS = ["将军", "曹操", "刘备", "关羽", "天下", "大势", "出战", "兵马", "城池", "谋士"]


def punctuated_text(lines: int = 300, seed: int = 0) -> str:
    """Clauses of 2 to 5 words, each ending in ， and each line in 。 or ？, some followed by a
    quotation opened with ：“ and closed with 。”."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        clauses = ["".join(rng.choices(WORDS, k=rng.randint(2, 5))) for _ in range(2)]
        line = clauses[0] + "，" + clauses[1] + rng.choice("。。？")
        if rng.random() < 0.3:
            line += "曰：“" + clauses[0] + "。”"
        out.append(line)
    return "\n".join(out) + "\n"


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Module fixtures run before each test's own working directory is set: they train from
    theirs, so that the last-run files land there and not in the repository."""
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bidirectional tagger trained for 400 steps on `punctuated_text`."""
    root = tmp_path_factory.mktemp("tagger")
    corpus = root / "punctuated.txt"
    corpus.write_text(punctuated_text(), encoding="utf-8")
    with working_directory(root):
        result = train_tagger(str(corpus), run_dir="run", steps=400, progress=False, **TINY_TAGGER)
    return root / result.run_dir


def test_window_plan_labels_each_position_where_it_is_most_central():
    for length in (1, 23, 24, 25, 100, 101, 250):
        starts, owner, offset = window_plan(length, 24)
        assert len(owner) == length and (np.diff(owner) >= 0).all()
        assert (offset >= 0).all() and (offset < 24).all()
        assert (starts[owner] + offset == np.arange(length)).all()
        inner = (np.arange(length) >= 6) & (np.arange(length) < length - 6)
        # Away from the text's ends, a quarter window of context on each side.
        if length > 24:
            assert ((offset[inner] >= 6) & (offset[inner] < 18)).all()


def test_training_windows_are_a_function_of_seed_and_step():
    tokens = np.arange(1000)
    labels = tokens % 3
    a = window_batch(tokens, labels, 4, 10, seed=1, step=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, window_batch(tokens, labels, 4, 10, 1, 7)))
    assert not np.array_equal(a[0], window_batch(tokens, labels, 4, 10, 1, 8)[0])
    assert not np.array_equal(a[0], window_batch(tokens, labels, 4, 10, 2, 7)[0])
    assert np.array_equal(a[1], a[0] % 3) and (np.diff(a[0], axis=1) == 1).all()


def test_tagger_learns_to_punctuate_and_its_checkpoint_says_so(tagger_run: Path):
    loaded = ckpt.load(tagger_run / ckpt.BEST)
    assert loaded.meta["kind"] == "tagger"
    assert loaded.meta["marks"]["label_strings"][:2] == ["，", "。"]
    assert loaded.meta["tagger"]["bidirectional"] is True
    assert "，" not in loaded.meta["vocab"] and "曹" in loaded.meta["vocab"]
    last = tagger_run.parent / ".charlm-last-tagger"
    assert last.read_text().strip() == str(tagger_run.resolve())
    tagger = Tagger.load(tagger_run)
    text = punctuated_text(20, seed=5)
    stripped = "".join(c for c in text if c not in "，。？：“”")
    labels, unknown = tagger.labels(stripped)
    assert not unknown
    newline = np.array([c == "\n" for c in stripped])
    # Every line ends in 。 ？ or 。”: before each newline is a break.
    assert (labels[np.flatnonzero(newline) - 1] > 0).mean() > 0.9


def test_labels_do_not_depend_on_an_unrelated_prefix(tagger_run: Path):
    tagger = Tagger.load(tagger_run)
    text = "".join(c for c in punctuated_text(40, seed=3) if c not in "，。？：“”")
    alone, _ = tagger.labels(text)
    for prefix in ("天下大势", "出战" * 57 + "\n"):
        after, _ = tagger.labels(prefix + text)
        # Past the first half window, the text reads the same context either way.
        np.testing.assert_array_equal(after[len(prefix) + 12 :], alone[12:])


def test_resume_continues_bit_for_bit(tmp_path: Path):
    corpus = tmp_path / "p.txt"
    corpus.write_text(punctuated_text(150), encoding="utf-8")
    # The same schedule for both: a run of 20 steps would decay its rate by step 20.
    options = dict(TINY_TAGGER, eval_every=10, decay_steps=40)
    train_tagger(str(corpus), run_dir="whole", steps=40, progress=False, **options)
    half = train_tagger(str(corpus), run_dir="halves", steps=20, progress=False, **options)
    assert half.step == 20
    resumed = train_tagger(resume=True, run_dir="halves", steps=40, progress=False)
    assert resumed.step == 40
    expected = ckpt.load(Path("whole") / ckpt.LATEST)
    actual = ckpt.load(Path("halves") / ckpt.LATEST)
    # Dropout is on by default: its masks, too, are a function of the seed and the step.
    assert expected.meta["tagger"]["dropout"] > 0 and expected.meta["tagger"]["weight_drop"] > 0
    assert set(actual.arrays) == set(expected.arrays)
    for name in expected.arrays:
        np.testing.assert_array_equal(actual.arrays[name], expected.arrays[name], err_msg=name)
    assert actual.meta["val_loss"] == expected.meta["val_loss"]
    # Scoring the held-out split needs the corpus unchanged, as charlm perplexity does.
    assert score_tagger("halves").breaks.support > 0
    corpus.write_text(punctuated_text(150, seed=1), encoding="utf-8")
    with pytest.raises(CharlmError, match="has changed since training"):
        score_tagger("halves")


def test_kinds_of_checkpoint_are_not_confused(tagger_run: Path, trained_run: Path):
    with pytest.raises(CharlmError, match="is a punctuation tagger, not a language model"):
        load_model(ckpt.load(tagger_run / ckpt.LATEST))
    with pytest.raises(CharlmError, match="is a language model, not a punctuation tagger"):
        Tagger.load(trained_run)
    with pytest.raises(
        CharlmError, match="punctuation tagger's run; resume it with charlm punctuate"
    ):
        charlm.train(resume=True, run_dir=tagger_run, progress=False)
    with pytest.raises(CharlmError, match="language model's run; resume it with charlm train"):
        train_tagger(resume=True, run_dir=trained_run, progress=False)


def test_a_tagger_metadata_is_checked_field_by_field(tagger_run: Path):
    meta = ckpt.load(tagger_run / ckpt.LATEST).meta
    checkpoint_meta.validate(meta, "t")
    bad = {**meta, "kind": "translator"}
    with pytest.raises(CharlmError, match='metadata field kind must be "tagger" or absent'):
        checkpoint_meta.validate(bad, "t")
    bad = {**meta, "marks": {"label_strings": ["，", "x"]}}
    with pytest.raises(CharlmError, match=r"marks\.label_strings is not a label set"):
        checkpoint_meta.validate(bad, "t")
    bad = {**meta, "marks": {"label_strings": meta["marks"]["label_strings"][:-1]}}
    with pytest.raises(CharlmError, match=r"tagger\.num_labels"):
        checkpoint_meta.validate(bad, "t")
    bad = {**meta, "train": {**meta["train"], "bidirectional": "yes"}}
    with pytest.raises(CharlmError, match=r"train\.bidirectional must be true or false"):
        checkpoint_meta.validate(bad, "t")
    without_kind = {name: value for name, value in meta.items() if name != "kind"}
    with pytest.raises(CharlmError, match="unknown metadata field"):
        checkpoint_meta.validate(without_kind, "t")


def test_a_version_3_tagger_loads_as_the_tagger_without_dropout_it_was(
    tagger_run: Path, tmp_path: Path
):
    """Version 4 added the tagger's dropout rates; version 3's taggers trained without any."""
    with safetensors.safe_open(tagger_run / ckpt.LATEST, "numpy") as f:
        header = f.metadata()
    arrays = safetensors.numpy.load_file(tagger_run / ckpt.LATEST)
    meta = json.loads(header["meta"])
    for section in ("tagger", "train"):
        for name in NO_TAGGER_DROPOUT:
            del meta[section][name]
    old = tmp_path / "v3.ckpt"
    header.update(format_version="3", meta=json.dumps(meta, ensure_ascii=False))
    safetensors.numpy.save_file(arrays, str(old), metadata=header)
    loaded = Tagger.load(old)
    assert (loaded.config.dropout, loaded.config.embed_dropout, loaded.config.weight_drop) == (
        0,
        0,
        0,
    )
    assert loaded.meta["train"]["dropout"] == 0
    text = "刘备曰天下大势分久必合合久必分"
    current = Tagger.load(tagger_run / ckpt.LATEST)
    np.testing.assert_array_equal(loaded.labels(text)[0], current.labels(text)[0])


def test_init_from_copies_the_language_model_through_the_vocabularies(tmp_path: Path):
    text = punctuated_text(150)
    corpus = tmp_path / "p.txt"
    corpus.write_text(text, encoding="utf-8")
    shape = dict(hidden_size=16, embed_size=8, layers=1, precision="float32")
    lm = charlm.train(
        str(corpus), run_dir="lm", steps=5, batch_size=4, seq_len=16, progress=False, **shape
    )
    options = dict(TINY_TAGGER, steps=1, eval_every=1, lr=1e-9, warmup_steps=0, min_lr=1e-9)
    train_tagger(str(corpus), run_dir="t", init_from=str(lm.run_dir), progress=False, **options)
    lm_params, _, lm_vocab = load_model(ckpt.load(lm.run_dir / ckpt.LATEST))
    tagger = Tagger.load("t")
    assert tagger.meta["train"]["init_from"] == str(lm.run_dir)
    forward = tagger.params["layers"][0]["forward"]
    for name in ("w_x", "w_h", "b"):
        np.testing.assert_allclose(forward[name], lm_params["layers"][0][name], atol=1e-6)
    for char in "曹操\n":
        np.testing.assert_allclose(
            tagger.params["embed"][tagger.vocab.chars.index(char)],
            lm_params["embed"][lm_vocab.chars.index(char)],
            atol=1e-6,
        )
    with pytest.raises(CharlmError, match="same --cell, --hidden-size and --embed-size"):
        train_tagger(
            str(corpus),
            run_dir="t2",
            init_from=str(lm.run_dir),
            progress=False,
            **{**options, "hidden_size": 12},
        )


def test_break_and_mark_scores():
    gold = np.array([0, 1, 0, 2, 0, 1, 0, 3])
    predicted = np.array([0, 1, 1, 1, 0, 0, 0, 3])
    breaks, marks = score_labels(gold, predicted, ["，", "。", "？"])
    # Breaks: gold at 1, 3, 5, 7; predicted at 1, 2, 3, 7.
    assert (breaks.precision, breaks.recall, breaks.support, breaks.predicted) == (0.75, 0.75, 4, 4)
    assert breaks.f1 == pytest.approx(0.75)
    # ，: gold at 1, 5; predicted at 1, 2, 3.
    assert marks["，"].precision == pytest.approx(1 / 3) and marks["，"].recall == 0.5
    assert marks["，"].f1 == pytest.approx(0.4)
    assert marks["。"].predicted == 0 and marks["。"].f1 == 0.0 and marks["。"].support == 1
    assert marks["？"].f1 == 1.0
