"""Checkpoint metadata: every field checked on reading, and version-1 checkpoints upgraded."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from click.testing import CliRunner
from conftest import TINY

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.cli import main
from charlm.errors import CharlmError
from charlm.lm import checkpoint as lm_checkpoint
from charlm.lm import model
from charlm.lm.checkpoint import load_model
from charlm.lm.config import TrainConfig


def run_meta(vocab: str = "ab出战") -> dict[str, Any]:
    """A valid metadata document of the current format, with whatever fields the configs have."""
    train = TrainConfig(
        hidden_size=8, embed_size=4, batch_size=4, seq_len=16, steps=60, precision="float32"
    )
    return {
        "charlm_version": charlm.__version__,
        "created": "2026-11-24T03:00:00+00:00",
        "model": train.model_config(len(vocab)).to_dict(),
        "vocab": vocab,
        "train": dataclasses.asdict(train),
        "step": 3,
        "decay_steps": 60,
        "epoch": 0.25,
        "data_position": {"steps_per_epoch": 12, "stream_offset": 48},
        "corpus": {
            "path": "/data/mixed.txt",
            "sha256": "0" * 64,
            "encoding": None,
            "characters": 1000,
            "val_fraction": 0.1,
            "split_index": 900,
        },
        "train_loss": 2.5,
        "val_loss": None,
        "best_val_loss": None,
    }


# A version-1 document exactly as charlm wrote it before the regularisation options.
V1_META = {
    "charlm_version": "0.1.0",
    "created": "2026-11-24T02:55:29+00:00",
    "model": {
        "vocab_size": 4,
        "cell": "lstm",
        "layers": 2,
        "hidden_size": 8,
        "embed_size": 4,
        "dropout": 0.0,
        "precision": "float32",
    },
    "vocab": "ab出战",
    "train": {
        "cell": "lstm",
        "layers": 2,
        "hidden_size": 8,
        "embed_size": 4,
        "dropout": 0.0,
        "precision": "float32",
        "batch_size": 4,
        "seq_len": 16,
        "val_fraction": 0.1,
        "encoding": None,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "decay_steps": None,
        "weight_decay": 0.01,
        "clip_norm": 5.0,
        "seed": 0,
        "steps": 60,
        "epochs": None,
        "time_budget": None,
        "eval_every": 20,
        "log_every": 5,
    },
    "step": 60,
    "decay_steps": 60,
    "epoch": 1.5,
    "data_position": {"steps_per_epoch": 40, "stream_offset": 320},
    "corpus": {
        "path": "/data/mixed.txt",
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "encoding": None,
        "characters": 3300,
        "val_fraction": 0.1,
        "split_index": 2970,
    },
    "train_loss": 2.31,
    "val_loss": 2.4,
    "best_val_loss": 2.4,
}


def v1_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters of V1_META's model (a 2-layer LSTM), by their version-1 array names."""
    rng = np.random.default_rng(seed)
    vocab, embed, hidden = 4, 4, 8
    shapes = {
        "params/embed": (vocab, embed),
        "params/layers/0/w_x": (embed, 4 * hidden),
        "params/layers/0/w_h": (hidden, 4 * hidden),
        "params/layers/0/b": (4 * hidden,),
        "params/layers/1/w_x": (hidden, 4 * hidden),
        "params/layers/1/w_h": (hidden, 4 * hidden),
        "params/layers/1/b": (4 * hidden,),
        "params/head/w": (hidden, vocab),
        "params/head/b": (vocab,),
    }
    return {name: rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()}


def v1_logits(arrays: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """The logits of the version-1 model: an LSTM with gates i, f, g, o and an untied head."""

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    xs = [arrays["params/embed"][t] for t in tokens]
    for n in range(2):
        w_x, w_h, b = (arrays[f"params/layers/{n}/{k}"] for k in ("w_x", "w_h", "b"))
        h = c = np.zeros(w_h.shape[0])
        out = []
        for x in xs:
            i, f, g, o = np.split(x @ w_x + h @ w_h + b, 4)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            out.append(h)
        xs = out
    return np.stack(xs) @ arrays["params/head/w"] + arrays["params/head/b"]


def write(path: Path, meta: Any, /, *, arrays: dict | None = None, **header: str | None) -> Path:
    """A checkpoint file with `meta` (JSON-encoded unless a str) and header fields replaced;
    a header field given as None is left out."""
    metadata = {
        "format": ckpt.FORMAT,
        "format_version": str(ckpt.FORMAT_VERSION),
        "meta": meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False),
        **header,
    }
    metadata = {key: value for key, value in metadata.items() if value is not None}
    tensors = arrays if arrays is not None else {"params/embed": np.zeros((4, 4), np.float32)}
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    return path


def changed(edit: Callable[[dict], Any]) -> dict:
    meta = run_meta()
    edit(meta)
    return meta


# (metadata document or raw meta string, header fields, the field the error names, its words)
MALFORMED = {
    "missing field": (changed(lambda m: m.pop("step")), {}, "step", "is missing"),
    "missing model field": (
        changed(lambda m: m["model"].pop("hidden_size")),
        {},
        "model.hidden_size",
        "is missing",
    ),
    "unknown field": (changed(lambda m: m.update(colour="red")), {}, "colour", "unknown"),
    "unknown train field": (
        changed(lambda m: m["train"].update(momentum=0.9)),
        {},
        "train.momentum",
        "unknown",
    ),
    "wrong type for a model field": (
        changed(lambda m: m["model"].update(cell=3)),
        {},
        "model.cell",
        "must be a string, got 3",
    ),
    "bool for an int": (
        changed(lambda m: m["model"].update(layers=True)),
        {},
        "model.layers",
        "must be an integer, got true",
    ),
    "string number": (
        changed(lambda m: m["model"].update(hidden_size="256")),
        {},
        "model.hidden_size",
        'must be an integer, got "256"',
    ),
    "null for a number": (
        changed(lambda m: m["train"].update(lr=None)),
        {},
        "train.lr",
        "must be a number, got null",
    ),
    "corpus not an object": (
        changed(lambda m: m.update(corpus=["mixed.txt"])),
        {},
        "corpus",
        "must be an object",
    ),
    "corpus field": (
        changed(lambda m: m["corpus"].update(sha256=None)),
        {},
        "corpus.sha256",
        "must be a string, got null",
    ),
    "negative step": (changed(lambda m: m.update(step=-1)), {}, "step", "at least 0"),
    "loss a string": (
        changed(lambda m: m.update(val_loss="2.5")),
        {},
        "val_loss",
        "must be a number or null",
    ),
    "vocab length mismatch": (
        changed(lambda m: m.update(vocab="abc出战")),
        {},
        "vocab",
        "has 5 characters but model.vocab_size is 4",
    ),
    "vocab repeats a character": (
        changed(lambda m: m.update(vocab="aa出战")),
        {},
        "vocab",
        "distinct characters",
    ),
    "unknown cell": (
        changed(lambda m: m["model"].update(cell="transformer")),
        {},
        "model",
        "--cell must be one of lstm, gru, rnn",
    ),
    "train config out of range": (
        changed(lambda m: m["train"].update(batch_size=0)),
        {},
        "train",
        "--batch-size",
    ),
    "format_version abc": (run_meta(), {"format_version": "abc"}, "format_version", '"abc"'),
    "format_version 0": (run_meta(), {"format_version": "0"}, "format_version", '"0"'),
    "format_version 99": (run_meta(), {"format_version": "99"}, "format_version", "upgrade"),
    "format_version missing": (run_meta(), {"format_version": None}, "format_version", "missing"),
    "meta not JSON": ('{"step": 3', {}, "meta", "is not JSON"),
    "meta a JSON list": ("[1, 2]", {}, "meta", "must be a JSON object, got a list"),
    "meta missing": (run_meta(), {"meta": None}, "meta", "is missing"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_metadata_is_one_line_naming_the_field_and_file(tmp_path: Path, case: str):
    meta, header, field, words = MALFORMED[case]
    path = write(tmp_path / "latest.ckpt", meta, **header)
    with pytest.raises(CharlmError) as err:
        ckpt.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert f"metadata field {field} " in message and words in message


@pytest.mark.parametrize("case", ["string number", "unknown field", "format_version abc"])
def test_cli_reports_malformed_metadata_in_one_line(tmp_path: Path, case: str):
    meta, header, field, words = MALFORMED[case]
    path = write(tmp_path / "latest.ckpt", meta, **header)
    result = CliRunner().invoke(main, ["sample", "-c", str(path)], catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"charlm: error: {path}: "), result.stderr
    assert f"metadata field {field} " in lines[0] and words in lines[0]


def test_cli_process_reports_malformed_metadata_without_traceback(tmp_path: Path):
    path = write(tmp_path / "latest.ckpt", MALFORMED["meta not JSON"][0])
    command = [sys.executable, "-m", "charlm", "perplexity", "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"charlm: error: {path}: metadata field meta is not JSON"


def test_current_metadata_loads_unchanged(tmp_path: Path):
    meta = run_meta()
    assert ckpt.load(write(tmp_path / "a.ckpt", meta)).meta == meta


def test_whole_numbers_are_numbers(tmp_path: Path):
    meta = changed(lambda m: m.update(epoch=2, train_loss=3, train={**m["train"], "lr": 1}))
    assert ckpt.load(write(tmp_path / "a.ckpt", meta)).meta == meta


def test_version_1_checkpoint_is_upgraded_and_its_model_runs_as_before(tmp_path: Path):
    arrays = v1_params()
    path = write(tmp_path / "v1.ckpt", V1_META, arrays=arrays, format_version="1")
    loaded = ckpt.load(path)

    for section, cls in (("model", model.ModelConfig), ("train", TrainConfig)):
        names = {field.name for field in dataclasses.fields(cls)}
        added = {k: v for k, v in lm_checkpoint.V1_BEHAVIOUR[section].items() if k in names}
        assert loaded.meta[section] == {**added, **V1_META[section]}
        assert set(loaded.meta[section]) == names
    assert TrainConfig(**loaded.meta["train"]).lr == 2e-3  # the version-1 value, not the default
    assert {k: v for k, v in loaded.meta.items() if k not in ("model", "train")} == {
        k: v for k, v in V1_META.items() if k not in ("model", "train")
    }

    params, config, vocab = load_model(loaded)
    assert vocab.chars == "ab出战"
    assert params["embed"].shape == (4, 4) and params["layers"][1]["w_h"].shape == (8, 32)
    tokens = [0, 2, 3, 1, 1, 2]
    logits, _ = model.apply(params, jnp.asarray([tokens]), model.initial_state(config, 1), config)
    np.testing.assert_allclose(logits[0], v1_logits(arrays, tokens), rtol=1e-4, atol=1e-5)


def test_version_1_fills_only_the_fields_the_configs_have(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(lm_checkpoint.V1_BEHAVIOUR["model"], "not_a_field", 1.0)
    path = write(tmp_path / "v1.ckpt", V1_META, arrays=v1_params(), format_version="1")
    assert "not_a_field" not in ckpt.load(path).meta["model"]


def test_version_1_field_without_a_version_1_value_is_named(tmp_path: Path):
    meta = copy.deepcopy(V1_META)
    del meta["model"]["hidden_size"]
    path = write(tmp_path / "v1.ckpt", meta, format_version="1")
    with pytest.raises(
        CharlmError,
        match=r"model\.hidden_size is missing, and the language model kind has no version-1 value",
    ):
        ckpt.load(path)


def as_version_1(path: Path) -> None:
    """Rewrite a checkpoint as charlm wrote it at format version 1: the configs' fields cut
    down to version 1's, the same arrays."""
    loaded = ckpt.load(path)
    meta = copy.deepcopy(loaded.meta)
    for section in ("model", "train"):
        meta[section] = {k: v for k, v in meta[section].items() if k in V1_META[section]}
    write(path, meta, arrays=loaded.arrays, format_version="1")


def test_version_1_run_samples_scores_and_resumes(corpus_file: Path):
    # Train with version 1's behaviour, so that its version-1 rewrite describes the same model.
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    as_before = {k: v for k, v in lm_checkpoint.V1_BEHAVIOUR["train"].items() if k in names}
    options = {**TINY, "eval_every": 10, **as_before}
    run_dir = charlm.train(str(corpus_file), steps=20, progress=False, **options).run_dir
    for name in (ckpt.LATEST, ckpt.BEST):
        as_version_1(run_dir / name)

    def cli(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    sampled = cli("sample", "-c", str(run_dir), "-p", "出战", "-n", "20", "--seed", "3")
    assert sampled.exit_code == 0, sampled.output
    assert sampled.stdout.startswith("出战")
    scored = cli("perplexity", "-c", str(run_dir), "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["characters"] > 0
    resumed = cli("train", "--resume", "--run-dir", str(run_dir), "--steps", "30")
    assert resumed.exit_code == 0, resumed.output
    assert "at step 20" in resumed.stderr
    latest = run_dir / ckpt.LATEST
    assert ckpt.load(latest).meta["step"] == 30
    with safetensors.safe_open(latest, "numpy") as f:
        assert f.metadata()["format_version"] == str(ckpt.FORMAT_VERSION)


def test_version_2_checkpoint_scores_its_whole_held_out_split_as_it_did(tmp_path: Path):
    """Version 3 added train.val_max_chars; a version-2 file lacks it and read it as None,
    the whole split, which is what version 2 evaluated."""
    meta = run_meta()
    del meta["train"]["val_max_chars"]
    loaded = ckpt.load(write(tmp_path / "v2.ckpt", meta, format_version="2"))
    assert loaded.meta["train"]["val_max_chars"] is None
    assert loaded.meta == {**meta, "train": {**meta["train"], "val_max_chars": None}}
    missing = copy.deepcopy(meta)
    del missing["train"]["lr"]
    with pytest.raises(
        CharlmError,
        match=r"train\.lr is missing, and the language model kind has no version-2 value",
    ):
        ckpt.load(write(tmp_path / "bad.ckpt", missing, format_version="2"))
