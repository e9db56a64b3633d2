"""Shared fixtures: a generated corpus that mixes Chinese and English, and tiny trained runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import charlm

# Small enough to train in a few seconds on 2 cores, large enough to learn something.
# float32 whatever the processor, so that every machine kind runs the same arithmetic; the
# tests of --precision auto and bfloat16 ask for them.
TINY = dict(
    hidden_size=32,
    embed_size=8,
    layers=2,
    batch_size=4,
    seq_len=16,
    log_every=5,
    eval_every=20,
    precision="float32",
)

SHARED_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def mixed_text(lines: int = 300, seed: int = 0) -> str:
    """Sentences of Chinese and English words, so the vocabulary mixes both scripts."""
    words = [
        "出战",
        "将军",
        "曹操",
        "刘备",
        "关羽",
        "the",
        "army",
        "rides",
        "at",
        "dawn",
        "天下",
        "大势",
    ]
    rng = random.Random(seed)
    return (
        "\n".join(" ".join(rng.choice(words) for _ in range(10)) + "。" for _ in range(lines))
        + "\n"
    )


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.txt"
    path.write_text(mixed_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The CLI keeps JAX's compilation cache under XDG_CACHE_HOME: keep the tests' out of ~.
    The tests' own trainings use it too, as the CLI does: the suite trains models of a few
    shapes many times over, and each shape is then compiled once per worker, not per run."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    from charlm.devices import process_settings

    process_settings.enable_compilation_cache()


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own working directory (runs/ and the last-run file land there),
    with its own corpus data directory and no mirror, so that no test touches ~/.cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "corpus-data"))
    monkeypatch.delenv("CHARLM_CORPUS_MIRROR", raising=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny LSTM trained for 60 steps, shared by the sampling and perplexity tests."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "mixed.txt"
    corpus.write_text(mixed_text(), encoding="utf-8")
    # Session fixtures run before the per-test working directory is set: train from root, so
    # the last-run file lands there and not in the repository.
    here = os.getcwd()
    os.chdir(root)
    try:
        result = charlm.train(str(corpus), run_dir=root / "run", steps=60, progress=False, **TINY)
    finally:
        os.chdir(here)
    return result.run_dir
