"""The commands end to end through the CLI, and every bad input as one line and exit 1."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SHARED_CORPORA

from charlm import __version__
from charlm.cli import main
from charlm.data import addition, catalog

TINY_ARGS = ["--hidden-size", "32", "--embed-size", "8", "--batch-size", "4", "--seq-len", "16"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_sample_perplexity_end_to_end(corpus_file: Path):
    trained = run("train", str(corpus_file), *TINY_ARGS, "--steps", "80", "--eval-every", "40")
    assert trained.exit_code == 0, trained.output
    assert "val loss" in trained.stderr and "runs/mixed" in trained.stderr
    # Each validation loss is shown beside the two baselines a model must beat.
    vocab = len(set(corpus_file.read_text(encoding="utf-8")))
    assert re.search(
        rf"bits/char; unigram \d\.\d{{3}}, uniform {math.log(vocab):.3f}\)", trained.stderr
    )
    assert sorted(p.name for p in Path("runs/mixed").iterdir()) == [
        "best.ckpt",
        "latest.ckpt",
        "metrics.jsonl",
        "run.lock",
    ]

    # No --checkpoint: the most recent run of this directory is used.
    sampled = run("sample", "--prime", "出战", "--length", "50", "--seed", "4")
    assert sampled.exit_code == 0
    assert sampled.stdout.startswith("出战") and len(sampled.stdout) == 2 + 50 + 1
    again = run("sample", "-p", "出战", "-n", "50", "--seed", "4", "-c", "runs/mixed")
    assert again.stdout == sampled.stdout

    several = run("sample", "-p", "将军", "-n", "30", "--seed", "1", "--num-samples", "3")
    assert several.exit_code == 0
    assert several.stdout.count("-" * 40) == 2

    scored = run("perplexity")
    assert scored.exit_code == 0
    for label in ("characters:", "nats/char:", "bits/char:", "perplexity:"):
        assert label in scored.stdout
    as_json = json.loads(run("perplexity", "--json").stdout)
    assert as_json["bits_per_char"] == pytest.approx(as_json["nats_per_char"] / 0.6931471805599453)
    assert f"{as_json['perplexity']:.3f}" in scored.stdout

    other = corpus_file.with_name("other.txt")
    other.write_text("出战 the army 骑马\n", encoding="utf-8")
    with_unknown = run("perplexity", str(other))
    assert with_unknown.exit_code == 0
    assert "unknown chars:   2 removed" in with_unknown.stdout

    resumed = run("train", "--resume", "--steps", "90")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr and "at step 80" in resumed.stderr


@pytest.mark.parametrize(
    "kind", ["missing", "directory", "empty", "binary", "undecodable", "short"]
)
def test_bad_corpus_gives_one_line(tmp_path: Path, kind: str):
    path = tmp_path / "corpus.txt"
    expected = {
        "missing": "no such file",
        "directory": "is a directory",
        "empty": "is empty",
        "binary": "binary",
        "undecodable": "--encoding",
        "short": "too few for one batch",
    }[kind]
    if kind == "directory":
        path.mkdir()
    elif kind != "missing":
        path.write_bytes(
            {
                "empty": b"",
                "binary": bytes(range(256)) * 4,
                "undecodable": b"na\xefve " * 50,
                "short": "出战".encode() * 10,
            }[kind]
        )
    assert_one_line_error(run("train", str(path), *TINY_ARGS), expected)
    assert not Path("runs").exists()


def test_gbk_corpus_names_the_option_that_loads_it(tmp_path: Path):
    path = tmp_path / "gbk.txt"
    path.write_bytes(("话说天下大势，分久必合，合久必分。" * 40 + "\n").encode("gbk"))
    assert_one_line_error(run("train", str(path), *TINY_ARGS), "--encoding gb18030")
    loaded = run("train", str(path), "--encoding", "gb18030", *TINY_ARGS, "--steps", "2", "--quiet")
    assert loaded.exit_code == 0, loaded.output


def test_sample_and_perplexity_without_a_run(tmp_path: Path):
    assert_one_line_error(run("sample"), "no run recorded")
    assert_one_line_error(run("perplexity"), "no run recorded")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00" * 100)
    assert_one_line_error(run("sample", "-c", str(broken)), "not a readable charlm checkpoint")


def test_sample_prime_outside_vocabulary(trained_run: Path):
    assert_one_line_error(
        run("sample", "-c", str(trained_run), "-p", "出Ω"), "'Ω'", "--drop-unknown"
    )
    dropped = run(
        "sample", "-c", str(trained_run), "-p", "出Ω", "-n", "5", "--drop-unknown", "--seed", "0"
    )
    assert dropped.exit_code == 0 and dropped.stdout.startswith("出")


def test_options_are_validated_in_one_place(corpus_file: Path, trained_run: Path):
    """click parses an option's type; its range is checked with the other options of its kind
    (the run's config, or the sampling options), as one line naming it."""
    bad = run("train", "x.txt", "--time-budget", "ten minutes")
    assert bad.exit_code == 2 and "is not a duration" in bad.stderr
    cases = [
        (["train", str(corpus_file), "--layers", "0"], "--layers must be at least 1"),
        (["train", str(corpus_file), "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train", str(corpus_file), "--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (
            ["punctuate", "train", str(corpus_file), "--seq-len", "3"],
            "--seq-len must be at least 4",
        ),
        (
            ["sample", "-c", str(trained_run), "--temperature", "0"],
            "temperature must be a positive finite number",
        ),
        (["sample", "-c", str(trained_run), "--seed", str(2**64)], "seed must be in [0, 2**63)"),
        (["sample", "-c", str(trained_run), "-t", "inf"], "temperature must be a positive finite"),
        (["sample", "-c", str(trained_run), "-n", "99999999999999999999"], "length must be from 0"),
    ]
    for args, message in cases:
        assert_one_line_error(run(*args), message)


def test_version_and_help():
    assert run("--version").stdout.strip() == f"charlm, version {__version__}"
    for command in (["train"], ["sample"], ["perplexity"], ["corpus"], ["corpus", "get"]):
        assert run(*command, "--help").exit_code == 0


@pytest.mark.parametrize("command", [["--help"], ["corpus", "list"]])
def test_help_and_corpus_commands_do_not_import_jax(command: list[str]):
    """`charlm --help` and the corpus commands answer at once: only the commands that train or
    run a model import JAX."""
    code = (
        "import sys; from charlm.cli import main; "
        f"main({command!r}, standalone_mode=False); print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.skipif(not (SHARED_CORPORA / "sanguo.txt").exists(), reason="needs ../shared/corpora")
def test_real_chinese_corpus_trains_briefly(tmp_path: Path):
    corpus = str(SHARED_CORPORA / "sanguo.txt")
    trained = run("train", corpus, *TINY_ARGS, "--steps", "3", "--eval-every", "100", "--quiet")
    assert trained.exit_code == 0, trained.output
    sampled = run("sample", "-p", "出战", "-n", "20", "--seed", "0")
    assert sampled.exit_code == 0 and sampled.stdout.startswith("出战")


def test_train_help_states_the_real_defaults():
    """The CLI must not import JAX for --help, so train's defaults are written into its help
    text by hand; they must equal TrainConfig's."""
    import dataclasses
    import re

    from charlm.cli import train
    from charlm.lm.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in train.params:
        if param.name not in defaults or defaults[param.name] is None:
            continue
        stated = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        assert stated, f"--{param.name} states no default"
        value = defaults[param.name]
        if isinstance(value, bool):
            assert stated.group(1) == ("on" if value else "off"), param.name
        elif isinstance(value, str):
            assert stated.group(1) == value
        else:
            assert float(stated.group(1)) == float(value), param.name
        checked += 1
    assert checked >= 15


def test_corpus_list_and_get():
    listed = run("corpus", "list")
    assert listed.exit_code == 0
    for name in ("sanguo", "tinyshakespeare", "addition"):
        assert re.search(rf"^{name} +missing ", listed.stdout, re.MULTILINE), listed.stdout
    assert "1,804,353" in listed.stdout and "public domain" in listed.stdout

    got = run("corpus", "get", "addition", "--lines", "50", "--bits", "4", "--seed", "2")
    assert got.exit_code == 0, got.output
    assert "generated with bits=4, lines=50, seed=2" in got.stdout
    path = catalog.local_path("addition")
    assert path.read_text() == addition.corpus_text(lines=50, bits=4, seed=2)
    # 50 lines of "abcd+efgh=ijklm\n", 16 bytes each.
    assert re.search(r"^addition +present +800 ", run("corpus", "list").stdout, re.MULTILINE)

    assert_one_line_error(run("corpus", "get", "nope"), "no corpus named 'nope'", "sanguo")
    assert_one_line_error(run("corpus", "get", "sanguo", "--bits", "4"), "only to addition")


def test_corpus_get_help_states_the_catalog_defaults():
    """The addition options' defaults are written into the help by hand (reading the catalog
    for --help would slow it); they must be the catalog's."""
    from charlm.cli import corpus_get

    defaults = catalog.load_catalog()["addition"].defaults
    for param in corpus_get.params:
        if param.name in defaults:
            stated = re.search(r"\[default: ([^\]]+)\]", param.help)
            assert int(stated.group(1)) == defaults[param.name], param.name


@pytest.mark.skipif(not (SHARED_CORPORA / "sanguo.txt").exists(), reason="needs ../shared/corpora")
def test_get_and_train_by_name_through_the_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv(catalog.MIRROR_VARIABLE, str(empty))
    assert_one_line_error(run("train", "tinyshakespeare", "--quiet"), "mirror has no")
    assert not Path("runs").exists()

    monkeypatch.setenv(catalog.MIRROR_VARIABLE, str(SHARED_CORPORA))
    got = run("corpus", "get", "sanguo", "--quiet")
    assert got.exit_code == 0, got.output
    assert "1,804,353 bytes" in got.stdout and "sha256 verified" in got.stdout
    trained = run("train", "tinyshakespeare", *TINY_ARGS, "--steps", "2", "--quiet")
    assert trained.exit_code == 0, trained.output
    from charlm.checkpoints import file_format as ckpt

    meta = ckpt.load(Path("runs/tinyshakespeare") / ckpt.LATEST).meta
    assert meta["corpus"]["path"] == str(catalog.local_path("tinyshakespeare").resolve())
    assert meta["corpus"]["sha256"] == catalog.load_catalog()["tinyshakespeare"].sha256
