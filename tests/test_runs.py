"""charlm runs and charlm plot: listing run directories and drawing their losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from charlm.checkpoints import file_format as ckpt
from charlm.cli import main
from charlm.errors import CharlmError
from charlm.runs.listing import find_runs, read_metrics, summarize, training_seconds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_runs(trained_run: Path, tmp_path: Path) -> Path:
    """runs/ holding a copy of the trained run, a copy with its checkpoint cut short, and a
    directory that is no run at all."""
    root = tmp_path / "runs"
    shutil.copytree(trained_run, root / "good")
    shutil.copytree(trained_run, root / "torn")
    latest = root / "torn" / ckpt.LATEST
    latest.write_bytes(latest.read_bytes()[:-100])
    (root / "notes").mkdir()
    return root


def test_training_seconds_continue_across_resumed_sessions():
    records = [{"elapsed": 10.0}, {"elapsed": 20.0}, {"elapsed": 4.0}, {"elapsed": 9.0}]
    assert training_seconds(records) == [10.0, 20.0, 24.0, 29.0]


def test_read_metrics_leaves_out_a_torn_last_line(tmp_path: Path):
    lines = [json.dumps({"step": 20, "val_loss": 3.0}), json.dumps({"step": 40}), '{"step": 6']
    (tmp_path / ckpt.METRICS).write_text("\n".join(lines), encoding="utf-8")
    assert [r["step"] for r in read_metrics(tmp_path)] == [20, 40]
    (tmp_path / ckpt.METRICS).write_text("", encoding="utf-8")
    with pytest.raises(CharlmError, match="no evaluation yet"):
        read_metrics(tmp_path)


def test_summaries_read_the_checkpoint_and_name_a_broken_one(two_runs: Path):
    assert [p.name for p in find_runs(two_runs)] == ["good", "torn"]
    good = summarize(two_runs / "good")
    meta = ckpt.load(two_runs / "good" / ckpt.LATEST).meta
    assert good.steps == meta["step"] == 60
    assert good.best_val_loss == meta["best_val_loss"]
    assert good.corpus == "mixed.txt" and good.model == "LSTM 2×32"
    assert good.seconds == read_metrics(two_runs / "good")[-1]["elapsed"]
    torn = summarize(two_runs / "torn")
    assert torn.steps is None and "damaged or truncated" in torn.problem


def test_read_meta_agrees_with_load(trained_run: Path):
    path = trained_run / ckpt.LATEST
    assert ckpt.read_meta(path) == ckpt.load(path).meta


def test_runs_command_lists_runs_and_marks_the_latest(two_runs: Path, tmp_path: Path):
    ckpt.remember_run(two_runs / "good")
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 0, result.output
    good_line = next(line for line in result.output.splitlines() if "runs/good" in line)
    assert good_line.startswith("* ") and "mixed.txt" in good_line and "LSTM 2×32" in good_line
    torn_line = next(line for line in result.output.splitlines() if "runs/torn" in line)
    assert torn_line.startswith("  ") and "no readable checkpoint" in torn_line
    assert "notes" not in result.output

    as_json = CliRunner().invoke(main, ["runs", "--json"])
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert [(Path(r["path"]).name, r["latest"], r["steps"]) for r in rows] == [
        ("good", True, 60),
        ("torn", False, None),
    ]


def test_runs_command_without_runs_says_so(tmp_path: Path):
    missing = CliRunner().invoke(main, ["runs"])
    assert missing.exit_code == 1 and "no directory runs" in missing.output
    (tmp_path / "runs").mkdir()
    empty = CliRunner().invoke(main, ["runs"])
    assert empty.exit_code == 0 and "no runs in runs" in empty.output


def test_plot_writes_a_picture_of_one_run_or_several(two_runs: Path, tmp_path: Path):
    ckpt.remember_run(two_runs / "good")
    one = CliRunner().invoke(main, ["plot"])
    assert one.exit_code == 0, one.output
    picture = two_runs / "good" / "loss.png"
    assert one.output.strip() == str(picture)
    assert picture.read_bytes().startswith(PNG_MAGIC)

    svg = tmp_path / "compare.svg"
    both = CliRunner().invoke(
        main,
        ["plot", str(two_runs / "good"), str(two_runs / "torn"), "-o", str(svg), "--x", "time"],
    )
    assert both.exit_code == 0, both.output
    drawing = svg.read_text(encoding="utf-8")
    assert (
        "<svg" in drawing and "wall time (minutes)" in drawing and "bits per character" in drawing
    )


def test_plot_refuses_what_it_cannot_draw(two_runs: Path, tmp_path: Path):
    bad_suffix = CliRunner().invoke(main, ["plot", str(two_runs / "good"), "-o", "loss.txt"])
    assert bad_suffix.exit_code == 1 and "cannot write a .txt picture" in bad_suffix.output
    assert not (tmp_path / "loss.txt").exists()
    no_run = CliRunner().invoke(main, ["plot"])
    assert no_run.exit_code == 1 and "no run recorded" in no_run.output
    not_a_run = CliRunner().invoke(main, ["plot", str(two_runs / "notes")])
    assert not_a_run.exit_code == 1 and "has no metrics.jsonl" in not_a_run.output


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (b'{"step": 30, "val_loss": 3.0, "note": "\xff\xfe"}', "'utf-8' codec can't decode"),
        (b'{"step": 30, "elapsed": NaN}', "NaN is not a number JSON allows"),
        (b'{"step": 30, "val_loss": 1e999}', "val_loss is inf"),
        (b'{"step": 30, "elapsed": "ten"}', "elapsed is not a number"),
    ],
)
def test_a_damaged_metrics_line_is_listed_as_the_runs_problem(
    two_runs: Path, damage: bytes, why: str
):
    """One bad line made `charlm runs` and `charlm plot` fail with a traceback, and
    `runs --json` print NaN, which is not JSON; the run is now listed with its problem."""
    metrics = two_runs / "good" / ckpt.METRICS
    lines = metrics.read_bytes().splitlines()
    metrics.write_bytes(b"\n".join([lines[0], damage, *lines[1:]]) + b"\n")
    listed = CliRunner().invoke(main, ["runs", str(two_runs), "--json"])
    assert listed.exit_code == 0, listed.output
    good = next(
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
        for line in listed.stdout.splitlines()
    )
    assert good["steps"] == 60 and good["seconds"] is not None
    assert (
        good["problem"].startswith(f"{ckpt.METRICS} line 2 is damaged (") and why in good["problem"]
    )
    table = CliRunner().invoke(main, ["runs", str(two_runs)])
    assert table.exit_code == 0 and f"({ckpt.METRICS} line 2 is damaged" in table.stdout
    plotted = CliRunner().invoke(main, ["plot", str(two_runs / "good"), "-o", "loss.png"])
    assert plotted.exit_code == 0, plotted.output
