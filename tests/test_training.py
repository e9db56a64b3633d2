"""The training loop: exact resume, checkpoints and metrics, divergence, Ctrl-C, time budget."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.devices import hardware
from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.checkpoint import load_model
from charlm.lm.config import TrainConfig
from charlm.lm.dropout import dropout_masks
from charlm.lm.loss import head_loss
from charlm.lm.step import sequence_loss
from charlm.training.loop import TrainingDiverged
from charlm.training.schedule import learning_rate


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_is_bit_for_bit(corpus_file: Path, cell: str):
    """N steps, then resume for M more, equals N+M steps in one go: parameters, optimizer state
    and carried hidden state, exactly. Every kind of dropout is on, so the PRNG state must carry
    too, and the head is tied to the embedding. The schedule's horizon is fixed when a run
    starts, so the first part plans for N+M."""
    regularised = dict(dropout=0.3, input_dropout=0.2, embed_dropout=0.1, weight_drop=0.3)
    options = dict(TINY, cell=cell, tie_embeddings=True, eval_every=7, progress=False)
    options.update(regularised)
    charlm.train(str(corpus_file), run_dir="one-go", steps=30, **options)
    charlm.train(str(corpus_file), run_dir="split", steps=12, decay_steps=30, **options)
    resumed = charlm.train(resume=True, run_dir="split", steps=30, progress=False)
    assert resumed.step == 30
    one_go = ckpt.load(Path("one-go") / ckpt.LATEST).arrays
    split = ckpt.load(Path("split") / ckpt.LATEST).arrays
    assert one_go.keys() == split.keys()
    assert any(name.startswith("carry/") for name in one_go)
    for name in one_go:
        np.testing.assert_array_equal(one_go[name], split[name], err_msg=name)


def test_run_directory_checkpoints_and_metrics(corpus_file: Path):
    result = charlm.train(str(corpus_file), steps=45, progress=False, **TINY)
    assert result.run_dir == Path("runs/mixed")
    assert result.stop == "done"
    records = [
        json.loads(line) for line in (result.run_dir / ckpt.METRICS).read_text().splitlines()
    ]
    # Evaluations at steps 20 and 40, and a last one at the end.
    assert [r["step"] for r in records] == [20, 40, 45]
    assert all(math.isfinite(r["val_loss"]) and r["val_bpc"] > 0 for r in records)
    best = min(r["val_loss"] for r in records)
    assert ckpt.load(result.run_dir / ckpt.BEST).meta["val_loss"] == best
    latest = ckpt.load(result.run_dir / ckpt.LATEST).meta
    assert latest["step"] == 45
    assert latest["corpus"]["sha256"] and latest["corpus"]["split_index"] > 0
    assert latest["model"]["cell"] == "lstm"
    assert Path(".charlm-last-run").read_text().strip() == str(result.run_dir.resolve())
    # A second run of the same corpus does not touch the first one's directory.
    again = charlm.train(str(corpus_file), steps=5, progress=False, **TINY)
    assert again.run_dir == Path("runs/mixed-2")


def test_a_checkpoint_left_half_written_by_a_crash_is_removed_on_the_next_start(
    corpus_file: Path, capsys: pytest.CaptureFixture[str]
):
    run = charlm.train(str(corpus_file), steps=5, progress=False, **TINY).run_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        crashed = run / f".{ckpt.LATEST}.tmp-{dead.pid}"
        writing = run / f".{ckpt.BEST}.tmp-{alive.pid}"
        unrelated = run / f".{ckpt.LATEST}.tmp-notes"
        for path in (crashed, writing, unrelated):
            path.write_bytes(b"half a checkpoint")
        charlm.train(run_dir=run, resume=True, steps=10, progress=True)
        assert not crashed.exists()
        assert writing.exists() and unrelated.exists()
        assert f"removed {crashed.name}, a checkpoint left half-written" in capsys.readouterr().err
        assert ckpt.load(run / ckpt.LATEST).meta["step"] == 10
    finally:
        alive.kill()
        alive.wait()


def test_explicit_run_dir_is_never_overwritten(corpus_file: Path):
    charlm.train(str(corpus_file), run_dir="mine", steps=5, progress=False, **TINY)
    before = (Path("mine") / ckpt.LATEST).read_bytes()
    with pytest.raises(CharlmError, match="already holds a run; continue it with --resume"):
        charlm.train(str(corpus_file), run_dir="mine", steps=5, progress=False, **TINY)
    assert (Path("mine") / ckpt.LATEST).read_bytes() == before


def test_resume_refuses_changed_model_or_corpus(corpus_file: Path, tmp_path: Path):
    charlm.train(str(corpus_file), run_dir="r", steps=5, progress=False, **TINY)
    with pytest.raises(CharlmError, match="--hidden-size cannot change when resuming"):
        charlm.train(resume=True, run_dir="r", hidden_size=64, progress=False)
    corpus_file.write_text(corpus_file.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    with pytest.raises(CharlmError, match="sha256 differs"):
        charlm.train(resume=True, run_dir="r", steps=10, progress=False)


def test_nan_or_exploding_loss_stops_and_keeps_last_good_checkpoint(corpus_file: Path):
    # The first update runs at lr 0 (warm-up), so the checkpoint at step 1 is good; the second,
    # at lr 3333, wrecks the weights, which the validation before the step-2 save catches.
    options = dict(TINY, lr=1e4, warmup_steps=3, clip_norm=1e9, eval_every=1, log_every=1)
    message = (
        r"validation loss (became nan|exploded).* at step 2; .*last good checkpoint \(step 1\)"
    )
    with pytest.raises(TrainingDiverged, match=message):
        charlm.train(str(corpus_file), run_dir="d", steps=50, progress=False, **options)
    kept = ckpt.load(Path("d") / ckpt.LATEST)
    assert kept.meta["step"] == 1
    assert all(np.isfinite(a).all() for a in kept.arrays.values() if a.dtype.kind == "f")


def test_time_budget_stops_and_saves(corpus_file: Path):
    start = time.monotonic()
    result = charlm.train(str(corpus_file), time_budget=3.0, progress=False, **TINY)
    assert result.stop == "time budget"
    assert time.monotonic() - start < 3.0 + 5.0  # one last evaluation and save at most
    assert ckpt.load(result.run_dir / ckpt.LATEST).meta["step"] == result.step > 0


def test_budget_spent_before_the_first_step_still_saves(corpus_file: Path):
    result = charlm.train(str(corpus_file), time_budget=1e-9, progress=True, **TINY)
    assert (result.stop, result.step, result.train_loss) == ("time budget", 0, None)
    assert ckpt.load(result.run_dir / ckpt.LATEST).meta["step"] == 0


def test_ctrl_c_saves_and_resuming_ends_where_an_uninterrupted_run_does(corpus_file: Path):
    options = dict(hidden_size=32, batch_size=4, seq_len=16, eval_every=5, steps=600)
    run = Path("interrupted")
    command = [sys.executable, "-m", "charlm", "train", str(corpus_file), "--run-dir", str(run)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / ckpt.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Resume with: charlm train --resume --run-dir {run}" in stderr
    interrupted_at = ckpt.load(run / ckpt.LATEST).meta["step"]
    assert 5 <= interrupted_at < 600

    resumed = charlm.train(resume=True, run_dir=run, progress=False)
    assert resumed.step == 600
    charlm.train(str(corpus_file), run_dir="uninterrupted", progress=False, **options)
    expected = ckpt.load(Path("uninterrupted") / ckpt.LATEST).arrays
    actual = ckpt.load(run / ckpt.LATEST).arrays
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_divergence_without_held_out_text_keeps_a_sane_checkpoint(corpus_file: Path):
    """With --val-fraction 0 there is no validation loss: a forward pass on the next batch
    vouches for the parameters of every checkpoint instead."""
    options = dict(TINY, lr=1e4, warmup_steps=3, clip_norm=1e9, eval_every=1, log_every=1)
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 1\)"):
        charlm.train(
            str(corpus_file), run_dir="d", steps=50, val_fraction=0.0, progress=False, **options
        )
    for name in (ckpt.LATEST, ckpt.BEST):
        kept = ckpt.load(Path("d") / name)
        assert kept.meta["step"] == 1
        assert all(np.abs(a).max() < 100 for a in kept.arrays.values() if a.dtype.kind == "f")


def test_resume_length_options_replace_the_saved_ones(corpus_file: Path):
    charlm.train(str(corpus_file), run_dir="r", steps=10, progress=False, **TINY)
    steps_per_epoch = ckpt.load(Path("r") / ckpt.LATEST).meta["data_position"]["steps_per_epoch"]
    resumed = charlm.train(resume=True, run_dir="r", epochs=1, progress=False)
    assert resumed.step == steps_per_epoch > 10


def test_resumed_time_budget_run_keeps_its_schedule(corpus_file: Path):
    """The decay fitted to the first session's budget is kept: a resumed session must not
    jump the learning rate back up. No warm-up, so that the rate falls from the first step
    however few steps a loaded machine makes in the budget."""
    options = dict(TINY, warmup_steps=0, progress=False)
    first = charlm.train(str(corpus_file), run_dir="t", time_budget=4.0, **options)
    horizon = ckpt.load(Path("t") / ckpt.LATEST).meta["decay_steps"]
    charlm.train(resume=True, run_dir="t", time_budget=2.0, progress=False)
    assert ckpt.load(Path("t") / ckpt.LATEST).meta["decay_steps"] == horizon
    records = [json.loads(line) for line in (first.run_dir / ckpt.METRICS).read_text().splitlines()]
    resumed_rates = [r["lr"] for r in records if r["step"] > first.step]
    assert resumed_rates and max(resumed_rates) <= records[-len(resumed_rates) - 1]["lr"] + 1e-12


def test_unwritable_run_directory_is_one_line(corpus_file: Path):
    from click.testing import CliRunner

    from charlm.cli import main

    result = CliRunner().invoke(main, ["train", str(corpus_file), "--run-dir", "/proc/charlm-run"])
    assert result.exit_code == 1
    assert result.stderr.startswith("charlm: error: ") and "/proc/charlm-run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("steps", [3, 13])
@pytest.mark.parametrize("regularised", [False, True])
def test_sequence_loss_in_time_chunks_equals_the_whole_window(steps: int, regularised: bool):
    """`sequence_loss` runs the window in chunks of time; its loss, state and gradients are
    those of the whole window run at once, for windows shorter than the number of chunks and
    for windows that do not split evenly, and with dropout the same masks span every chunk."""
    rates = dict(dropout=0.3, input_dropout=0.3, embed_dropout=0.2, weight_drop=0.3)
    config = model.ModelConfig(
        vocab_size=11,
        hidden_size=8,
        embed_size=4,
        tie_embeddings=True,
        **(rates if regularised else {}),
    )
    params = model.init(jax.random.key(0), config)
    tokens = np.random.default_rng(0).integers(0, 11, (3, steps + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    carry = jax.tree.map(lambda s: s + 0.1, model.initial_state(config, 3))
    masks = dropout_masks(jax.random.key(1), config, 3) if regularised else None

    def whole(params):
        x, state = model.features(params, jnp.asarray(inputs.T), carry, config, masks)
        w, b = model.head_weight(params, config), params["head"]["b"]
        return head_loss(x, w, b, jnp.asarray(targets.T), None), state

    def chunked(params):
        return sequence_loss(params, inputs, targets, carry, config, masks)

    (loss, state), grads = jax.value_and_grad(chunked, has_aux=True)(params)
    (whole_loss, whole_state), whole_grads = jax.value_and_grad(whole, has_aux=True)(params)
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((state, grads)), jax.tree.leaves((whole_state, whole_grads))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_warms_up_then_decays_to_min():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, config, 110) == 0.0
    assert learning_rate(5, config, 110) == pytest.approx(5e-4)
    assert learning_rate(10, config, 110) == pytest.approx(1e-3)
    assert learning_rate(60, config, 110) == pytest.approx(5.5e-4)
    assert learning_rate(110, config, 110) == pytest.approx(1e-4)
    assert learning_rate(500, config, 110) == pytest.approx(1e-4)


def test_invalid_options_are_refused(corpus_file: Path):
    with pytest.raises(CharlmError, match="--batch-size must be at least 1"):
        charlm.train(str(corpus_file), batch_size=0, progress=False)
    with pytest.raises(CharlmError, match="give a text file"):
        charlm.train(progress=False)
    with pytest.raises(CharlmError, match="--seed must be in"):
        charlm.train(str(corpus_file), seed=2**64, progress=False)
    assert not os.path.exists("runs")


def test_train_takes_a_catalog_name():
    """charlm.train, like the CLI, accepts a catalog name: `addition` is generated locally."""
    result = charlm.train("addition", steps=3, progress=False, **TINY)
    corpus = ckpt.load(result.run_dir / ckpt.LATEST).meta["corpus"]
    assert result.run_dir == Path("runs/addition")
    assert corpus["path"].endswith("addition.txt") and set(Path(corpus["path"]).read_text()) <= set(
        "01+=\n"
    )


@pytest.mark.parametrize("processor", ["bfloat16", "float32"])
def test_auto_precision_is_chosen_once_and_kept_on_resume(
    corpus_file: Path, monkeypatch: pytest.MonkeyPatch, capsys, processor: str
):
    """The default precision, auto, becomes the processor's choice when a run starts; the
    checkpoint records that choice and a resume keeps it, on any processor."""
    choice = {"bfloat16": ("bfloat16", "the CPU has avx512_bf16")}.get(
        processor, ("float32", "the CPU lacks bfloat16 arithmetic")
    )
    monkeypatch.setattr(hardware, "auto_precision", lambda device: choice)
    options = dict(TINY, run_dir="auto", precision="auto")
    result = charlm.train(str(corpus_file), steps=10, **options)
    assert f"in {choice[0]} (auto: {choice[1]})" in capsys.readouterr().err
    meta = ckpt.load(ckpt.resolve(result.run_dir)).meta
    assert meta["model"]["precision"] == meta["train"]["precision"] == processor
    other = "float32" if processor == "bfloat16" else "bfloat16"
    monkeypatch.setattr(hardware, "auto_precision", lambda device: (other, "another machine"))
    resumed = charlm.train(str(corpus_file), resume=True, steps=15, progress=False, **options)
    assert resumed.step == 15
    assert ckpt.load(ckpt.resolve(result.run_dir)).meta["model"]["precision"] == processor
    with pytest.raises(CharlmError, match="precision"):
        charlm.train(str(corpus_file), resume=True, steps=20, **{**options, "precision": other})


def test_bfloat16_run_trains_resumes_and_records_its_precision(corpus_file: Path):
    """--precision bfloat16 end to end: it trains like float32, the checkpoint records the
    precision, the run resumes, and a resume cannot switch it."""
    options = dict(TINY, precision="bfloat16", progress=False, run_dir="bf16")
    result = charlm.train(str(corpus_file), steps=40, **options)
    loaded = ckpt.load(ckpt.resolve(result.run_dir))
    assert loaded.meta["model"]["precision"] == "bfloat16"
    plain = charlm.train(
        str(corpus_file), steps=40, **{**options, "precision": "float32", "run_dir": "f32"}
    )
    # The same run in float32 ends within bfloat16 rounding of it, but not identical.
    assert result.train_loss != plain.train_loss
    assert result.train_loss == pytest.approx(plain.train_loss, abs=0.05)
    resumed = charlm.train(str(corpus_file), resume=True, steps=50, **options)
    assert resumed.step == 50
    with pytest.raises(CharlmError, match="precision"):
        charlm.train(str(corpus_file), resume=True, steps=60, **{**options, "precision": "float32"})
    with pytest.raises(CharlmError, match="--precision must be one of auto, float32, bfloat16"):
        charlm.train(str(corpus_file), steps=5, **{**options, "precision": "float16"})


def test_each_evaluation_reads_at_most_val_max_chars(corpus_file: Path):
    """The recorded validation loss is the score of the first --val-max-chars held-out
    characters, not of the whole split (which is much longer)."""
    from charlm.data.corpus import load_corpus
    from charlm.lm.evaluation import Validation

    result = charlm.train(str(corpus_file), steps=5, val_max_chars=300, progress=False, **TINY)
    loaded = ckpt.load(result.run_dir / ckpt.LATEST)
    params, config, vocab = load_model(loaded)
    data = load_corpus(corpus_file, vocab=vocab)
    assert len(data.val_tokens) > 3 * 300
    capped = Validation(data.train_tokens, data.val_tokens, len(vocab), 300)
    whole = Validation(data.train_tokens, data.val_tokens, len(vocab))
    assert len(capped.tokens) == 300
    assert loaded.meta["val_loss"] == pytest.approx(capped.loss(params, config), rel=1e-6)
    assert loaded.meta["val_loss"] != pytest.approx(whole.loss(params, config), rel=1e-4)
    assert loaded.meta["train"]["val_max_chars"] == 300


def test_one_writer_per_run_directory(corpus_file: Path, tmp_path: Path):
    """While a run trains, a second writer (a new run, or --resume of the same) is refused in
    one line naming the process that holds the run; a reader is not; and when the writer is
    killed, the kernel drops its lock, so the run resumes at once."""
    from click.testing import CliRunner

    from charlm.cli import main

    def cli(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    run = tmp_path / "run"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in dict(TINY, eval_every=5).items()]
    command = [sys.executable, "-m", "charlm", "train", str(corpus_file), "--run-dir", str(run)]
    writer = subprocess.Popen(
        [*command, *options, "--steps", "100000", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / ckpt.LATEST).is_file():
            assert writer.poll() is None, writer.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        refused = cli("train", "--resume", "--run-dir", str(run))
        assert refused.exit_code == 1
        assert refused.stderr.strip().splitlines() == [
            f"charlm: error: {run} is being trained by another charlm process (pid "
            f"{writer.pid}); wait for it to end, or train in another --run-dir"
        ]
        assert cli("sample", "-c", str(run), "-n", "5", "--seed", "1").exit_code == 0
    finally:
        writer.kill()
        writer.wait(timeout=30)
    step = ckpt.load(run / ckpt.LATEST).meta["step"]
    resumed = cli("train", "--resume", "--run-dir", str(run), "--steps", str(step + 5), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert ckpt.load(run / ckpt.LATEST).meta["step"] == step + 5


@pytest.mark.parametrize("trainer", ["train", "train_tagger"])
def test_a_new_run_in_a_locked_directory_is_refused(corpus_file: Path, tmp_path: Path, trainer):
    """Two new runs started at once in one --run-dir both find it empty; the lock lets one
    train. The lock is the run skeleton's, so every kind of model has it."""
    from charlm.storage import run_lock

    refused = pytest.raises(CharlmError, match=f"another charlm process \\(pid {os.getpid()}\\)")
    with run_lock(tmp_path / "run"), refused:
        getattr(charlm, trainer)(str(corpus_file), run_dir=tmp_path / "run", steps=2, **TINY)
    assert not (tmp_path / "run" / ckpt.LATEST).exists()
