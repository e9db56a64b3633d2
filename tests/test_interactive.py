"""charlm sample --interactive and --prime-file: commands between turns, piped lines, a real
pseudo-terminal, and primes read from files."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from charlm.cli import main
from charlm.inference.interactive import Quit, Settings, apply_command
from charlm.inference.sampling import SampleError, Sampler


def expected(run: Path, prime: str, **options) -> str:
    return "".join(pieces[0] for pieces in Sampler.load(run).stream(prime, **options))


def test_commands_change_the_settings_of_later_turns():
    settings, message = apply_command(":t 0.7", Settings())
    assert settings.temperature == 0.7 and "temperature 0.7" in message
    settings, _ = apply_command(":k 40", settings)
    settings, _ = apply_command(":seed 9", settings)
    assert (settings.top_k, settings.seed) == (40, 9)
    settings, message = apply_command(":seed none", settings)
    assert settings.seed is None and "seed random" in message
    settings, message = apply_command(":greedy", settings)
    assert settings.greedy and message.startswith("greedy")
    assert apply_command(":show", settings) == (settings, settings.describe())


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        (":t 0", "temperature", "must be a positive finite number"),
        (":p 1.5", "top_p", "(0, 1]"),
        (":n -3", "length", "must be from 0 to 10,000,000, got -3"),
        (":k many", "top_k", "such as :k 40"),
        (":greedy maybe", "greedy", "such as :greedy off"),
        (":x 1", "command", "unknown command :x"),
    ],
)
def test_a_bad_command_names_what_is_wrong(line: str, field: str, words: str):
    with pytest.raises(SampleError) as caught:
        apply_command(line, Settings())
    assert caught.value.field == field and words in str(caught.value)


def test_quit():
    with pytest.raises(Quit):
        apply_command(":q", Settings())


def test_piped_lines_are_primes_and_commands(trained_run: Path):
    lines = ":t 0.5\nthe army\n:t -1\n::出战\n曹操\n:q\nnever read\n"
    result = CliRunner().invoke(
        main, ["sample", "-c", str(trained_run), "-i", "--seed", "3", "-n", "40"], input=lines
    )
    assert result.exit_code == 0, result.output
    options = dict(seed=3, length=40, temperature=0.5)
    assert expected(trained_run, "the army", **options) in result.stdout
    # A prime that starts with a colon is written with two: this one is read as the prime
    # ":出战", whose colon the model never saw, and not as a command.
    assert "never saw: ':'" in result.stderr
    assert expected(trained_run, "曹操", **options) in result.stdout
    assert "temperature must be a positive finite number" in result.stderr
    assert "never read" not in result.stdout


def test_unknown_characters_end_the_turn_not_the_session(trained_run: Path):
    result = CliRunner().invoke(
        main, ["sample", "-c", str(trained_run), "-i", "--seed", "1", "-n", "10"], input="Ω\nthe\n"
    )
    assert result.exit_code == 0
    assert "never saw: 'Ω'" in result.stderr
    assert expected(trained_run, "the", seed=1, length=10) in result.stdout


def _read_until(fd: int, marker: bytes, seen: bytearray, deadline: float) -> None:
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {marker!r}; got {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end closed
                chunk = b""
            assert chunk, f"the terminal closed before {marker!r}; got {bytes(seen)!r}"
            seen += chunk


def test_a_session_in_a_terminal(trained_run: Path):
    """Prompt, continuation, a bad command, and Ctrl-D, through a pseudo-terminal."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "sample",
            "-c",
            str(trained_run),
            "-i",
            "-n",
            "30",
            "--seed",
            "5",
        ],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        close_fds=True,
    )
    os.close(terminal)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 120
        _read_until(controller, b":help lists the commands", seen, deadline)
        _read_until(controller, b"> ", seen, deadline)
        os.write(controller, "将军\n".encode())
        encoded = expected(trained_run, "将军", seed=5, length=30).replace("\n", "\r\n").encode()
        _read_until(controller, encoded, seen, deadline)
        del seen[: seen.index(encoded) + len(encoded)]
        _read_until(controller, b"> ", seen, deadline)
        del seen[:]
        os.write(controller, b":t -2\n")
        _read_until(controller, b"temperature must be a positive finite number", seen, deadline)
        # Ctrl-D at the prompt, as a person would type it: sent before readline takes the
        # terminal, it could be read in the wrong mode.
        del seen[: seen.index(b"positive")]
        _read_until(controller, b"> ", seen, deadline)
        os.write(controller, b"\x04")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)


def test_prime_file_is_read_as_a_corpus_is(trained_run: Path, tmp_path: Path):
    prime = tmp_path / "prime.txt"
    prime.write_bytes("\ufeff曹操\r\n".encode("utf-8"))
    result = CliRunner().invoke(
        main, ["sample", "-c", str(trained_run), "--prime-file", str(prime), "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(expected(trained_run, "曹操\n", seed=2, length=500))

    chinese = tmp_path / "gbk.txt"
    chinese.write_bytes("将军".encode("gb18030"))
    undecoded = CliRunner().invoke(
        main, ["sample", "-c", str(trained_run), "--prime-file", str(chinese)]
    )
    assert undecoded.exit_code == 1 and "--encoding gb18030" in undecoded.output
    decoded = CliRunner().invoke(
        main,
        [
            "sample",
            "-c",
            str(trained_run),
            "--prime-file",
            str(chinese),
            "--encoding",
            "gb18030",
            "--seed",
            "2",
            "-n",
            "20",
        ],
    )
    assert decoded.stdout.startswith(expected(trained_run, "将军", seed=2, length=20))


def test_one_source_of_primes_at_a_time(trained_run: Path, tmp_path: Path):
    (tmp_path / "p.txt").write_text("the", encoding="utf-8")
    both = CliRunner().invoke(
        main, ["sample", "-c", str(trained_run), "-p", "the", "--prime-file", "p.txt"]
    )
    assert both.exit_code == 1 and "one of --prime, --prime-file and --interactive" in both.output
    stray = CliRunner().invoke(main, ["sample", "-c", str(trained_run), "--encoding", "gbk"])
    assert stray.exit_code == 1 and "--encoding applies to --prime-file only" in stray.output
