"""Checkpoints written by an earlier charlm still load and behave as they did.

tests/data/format4 holds checkpoints of format version 4 written by charlm at b038b12, before
the package was split into subpackages, and what that charlm printed for them (its README
says how they were made). Today's charlm must read them, score and sample the same, and
resume them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from charlm.cli import main

FORMAT4 = Path(__file__).parent / "data" / "format4"
EXPECTED = json.loads((FORMAT4 / "expected.json").read_text(encoding="utf-8"))
LANGUAGE_MODELS = ["lm-lstm-float32.ckpt", "lm-gru-bfloat16.ckpt"]


def charlm(*args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_language_model_of_format_4_scores_and_samples_as_before(name: str) -> None:
    checkpoint, corpus = str(FORMAT4 / name), str(FORMAT4 / "sanguo-mini.txt")
    scored = json.loads(charlm("perplexity", "-c", checkpoint, corpus, "--json"))
    assert scored["nats_per_char"] == pytest.approx(EXPECTED[name]["perplexity"], rel=1e-5)
    sampled = charlm("sample", "-c", checkpoint, "--prime", "曹操", "-n", "20", "--seed", "3")
    assert sampled == EXPECTED[name]["sample"]


def test_tagger_of_format_4_punctuates_and_scores_as_before() -> None:
    checkpoint, corpus = str(FORMAT4 / "tagger.ckpt"), str(FORMAT4 / "sanguo-mini.txt")
    expected = EXPECTED["tagger.ckpt"]
    assert (
        charlm("punctuate", "-c", checkpoint, input="曹操引兵出战关羽大怒\n")
        == expected["punctuate"]
    )
    scores = json.loads(charlm("punctuate", "score", "-c", checkpoint, corpus, "--json"))
    assert scores["breaks"]["f1"] == pytest.approx(expected["break_f1"], rel=1e-6)


@pytest.mark.parametrize(
    ("name", "command"),
    [("lm-lstm-float32.ckpt", ["train"]), ("tagger.ckpt", ["punctuate", "train"])],
)
def test_run_of_format_4_resumes(tmp_path: Path, name: str, command: list[str]) -> None:
    """A run directory whose latest checkpoint an earlier charlm wrote trains on from its step;
    its corpus is given again, since the recorded path was the writer's."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FORMAT4 / name, run / "latest.ckpt")
    corpus = str(FORMAT4 / "sanguo-mini.txt")
    charlm(*command, corpus, "--resume", "--run-dir", str(run), "--steps", "6", "--quiet")
    listed = [json.loads(line) for line in charlm("runs", str(tmp_path), "--json").splitlines()]
    assert [run["steps"] for run in listed] == [6]
