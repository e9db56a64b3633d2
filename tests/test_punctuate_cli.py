"""`charlm punctuate`, `charlm punctuate train` and `charlm punctuate score` from the command
line: the group that falls back to tagging a FILE, its outputs, and its one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_tagging import TINY_TAGGER, punctuated_text, working_directory

from charlm.checkpoints import file_format as ckpt
from charlm.cli import main

TINY_ARGS = [
    arg
    for name, value in TINY_TAGGER.items()
    for arg in (f"--{name.replace('_', '-')}", str(value))
]
MARKS = "，。？：“”"


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, prog_name="charlm")


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`charlm punctuate train` on a punctuated text for 400 steps, from a directory of its own
    (where it records itself as the latest tagger run)."""
    root = tmp_path_factory.mktemp("cli-tagger")
    corpus = root / "story.txt"
    corpus.write_text(punctuated_text(), encoding="utf-8")
    with working_directory(root):
        trained = run("punctuate", "train", str(corpus), *TINY_ARGS, "--steps", "400")
    assert trained.exit_code == 0, trained.output
    first = re.search(r"^.*training tagger BiLSTM 1×16 \(.*$", trained.stderr, re.M)
    assert first and first.group().endswith("run directory runs/story-punctuate")
    assert re.search(
        r"(?:^|\r)step 20: train loss [\d.]+, val loss [\d.]+, break F1 [\d.]+",
        trained.stderr,
        re.M,
    )
    assert "stopped at step 400 (done); checkpoints in runs/story-punctuate" in trained.stderr
    return root / "runs" / "story-punctuate"


def test_punctuate_a_file_stdin_and_keep(cli_run: Path, tmp_path: Path):
    text = punctuated_text(10, seed=9)
    stripped = "".join(c for c in text if c not in MARKS)
    (tmp_path / "in.txt").write_text(stripped, encoding="utf-8")
    from_file = run("punctuate", "in.txt", "-c", str(cli_run))
    assert from_file.exit_code == 0, from_file.output
    out = from_file.stdout
    assert "".join(c for c in out if c not in MARKS) == stripped
    assert out.count("\n") == stripped.count("\n") and re.search("[。？]", out)
    # Marks present are removed first: the punctuated text comes out as the stripped one does.
    assert run("punctuate", "-c", str(cli_run), input=text).stdout == out
    assert run("punctuate", "-", "-c", str(cli_run), input=text).stdout == out
    assert run("punctuate", "--checkpoint", str(cli_run), "in.txt").stdout == out
    # --keep leaves every mark that is there, and adds marks only where none was.
    kept = run(
        "punctuate", "--keep", "-c", str(cli_run), input="！" + stripped[:8] + "；" + stripped[8:]
    )
    assert kept.exit_code == 0
    assert kept.stdout.startswith("！") and kept.stdout.count("；") == 1
    position = kept.stdout.index("；")
    assert kept.stdout[position - 1] == stripped[7] and kept.stdout[position + 1] == stripped[8]


def test_unknown_characters_pass_through_and_are_counted(cli_run: Path):
    result = run("punctuate", "-c", str(cli_run), input="曹操出战Zebra将军\n")
    assert result.exit_code == 0, result.output
    assert "Zebra" in result.stdout
    assert "".join(c for c in result.stdout if c not in MARKS) == "曹操出战Zebra将军\n"
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("charlm: note: 5 characters unknown")


def test_empty_input_prints_nothing(cli_run: Path, tmp_path: Path):
    assert (r := run("punctuate", "-c", str(cli_run), input="")).exit_code == 0 and r.output == ""
    (tmp_path / "empty.txt").write_text("")
    assert (r := run("punctuate", "empty.txt", "-c", "nowhere")).exit_code == 0 and r.output == ""


def test_score_held_out_and_a_file(cli_run: Path, tmp_path: Path):
    table = run("punctuate", "score", "-c", str(cli_run))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].endswith("story.txt (held-out last 0.1)")
    assert re.fullmatch(r"breaks +[\d.]+ +[\d.]+ +[\d.]+ +[\d,]+ +[\d,]+", lines[3])
    assert any(line.startswith("，") for line in lines[4:])
    scores = json.loads(run("punctuate", "score", "-c", str(cli_run), "--json").stdout)
    assert scores["breaks"]["f1"] > 0.5
    assert set(scores["marks"]) >= {"，", "。", "？"}
    assert scores["breaks"]["support"] == sum(m["support"] for m in scores["marks"].values())
    # The original text, scored as a file, is perfectly punctuated by itself: scored against
    # its own marks, a file gets the same break F1 as its held-out split where they coincide.
    (tmp_path / "p.txt").write_text(punctuated_text(30, seed=4), encoding="utf-8")
    scored = json.loads(run("punctuate", "score", "p.txt", "-c", str(cli_run), "--json").stdout)
    assert scored["source"] == "p.txt" and 0 < scored["breaks"]["f1"] <= 1


def test_bad_input_is_one_line(cli_run: Path, trained_run: Path, tmp_path: Path):
    (tmp_path / "plain.txt").write_text("曹操出战将军\n" * 50, encoding="utf-8")
    assert_one_line_error(
        run("punctuate", "train", "plain.txt", *TINY_ARGS),
        "no punctuation marks: nothing to learn from",
    )
    assert_one_line_error(run("punctuate", "train", "missing.txt"), "no such file: missing.txt")
    assert_one_line_error(run("punctuate", "missing.txt", "-c", str(cli_run)), "no such file")
    assert_one_line_error(
        run("punctuate", "-c", str(trained_run), input="曹操"), "is a language model"
    )
    assert_one_line_error(run("punctuate", "score", "-c", str(trained_run)), "is a language model")
    assert_one_line_error(run("punctuate", input="曹操"), "charlm punctuate train FILE")
    for command in (["sample", "-n", "3"], ["perplexity"]):
        assert_one_line_error(run(*command, "-c", str(cli_run)), "is a punctuation tagger")
    assert_one_line_error(
        run("punctuate", "train", str(cli_run.parents[1] / "story.txt"), "--run-dir", str(cli_run)),
        "already holds a run",
    )
    (tmp_path / "plain2.txt").write_text("曹操出战将军\n", encoding="utf-8")
    assert_one_line_error(
        run("punctuate", "score", "plain2.txt", "-c", str(cli_run)), "nothing to score"
    )


def test_help_shows_the_tagging_options_and_the_subcommands():
    shown = run("punctuate", "--help").stdout
    assert "Usage: charlm punctuate [FILE | -] [OPTIONS]" in shown
    for part in ("--checkpoint", "--keep", "--encoding", "train", "score"):
        assert part in shown
    assert run("punctuate", "train", "--help").exit_code == 0


def test_train_help_states_the_real_defaults():
    from charlm.cli.punctuate_command import train
    from charlm.punctuation.config import TaggerTrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TaggerTrainConfig)}
    checked = 0
    for param in train.params:
        if (
            param.name not in defaults
            or defaults[param.name] is None
            or param.name == "bidirectional"
        ):
            continue
        stated = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        assert stated, f"--{param.name} states no default"
        value = defaults[param.name]
        if isinstance(value, str):
            assert stated.group(1) == value
        else:
            assert float(stated.group(1).split()[0]) == float(value), param.name
        checked += 1
    assert checked >= 15


def test_ctrl_c_saves_and_exits_130(tmp_path: Path):
    corpus = tmp_path / "p.txt"
    corpus.write_text(punctuated_text(), encoding="utf-8")
    command = [sys.executable, "-m", "charlm", "punctuate", "train", str(corpus), "--run-dir", "r"]
    proc = subprocess.Popen(
        [*command, *TINY_ARGS, "--eval-every", "5", "--steps", "100000"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (Path("r") / ckpt.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Resume with: charlm punctuate train --resume --run-dir r" in stderr
    assert 5 <= ckpt.load(Path("r") / ckpt.LATEST).meta["step"] < 100000


def test_runs_lists_a_tagger_run(cli_run: Path):
    listed = run("runs", str(cli_run.parent))
    assert listed.exit_code == 0, listed.output
    assert re.search(r"runs/story-punctuate +story\.txt +BiLSTM 1×16 +400 +— +—", listed.stdout)
