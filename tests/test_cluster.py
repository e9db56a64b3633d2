"""Runs of several processes (jax.distributed) on 127.0.0.1: the same model as one process,
resume, agreement on the validation loss, one-line errors, and a lost process.

Every process is a child with one CPU device, started with a time-out and killed if the test
ends early; the coordinator listens on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.devices import cluster

OPTIONS = dict(TINY, batch_size=8, decay_steps=8, eval_every=4)
# float32 tolerance: two processes' halves of the batch are summed in another order.
TOLERANCE = dict(rtol=2e-5, atol=2e-6)

# One process of a run, through the library, printing how its run ended.
PROCESS = r"""
import json, sys
from charlm.devices import cluster
from charlm.lm.training import train
from charlm.punctuation.training import train_tagger
coordinator, count, index, corpus, run_dir, options = sys.argv[1:7]
cluster.join(coordinator, int(count), int(index))
options = json.loads(options)
resume = options.pop("resume", False)
tagger = options.pop("tagger", None)
result = train(None if resume else corpus, run_dir=run_dir, resume=resume, progress=False,
               **options)
ended = {"step": result.step, "val_loss": result.val_loss, "best": result.best_val_loss}
if tagger is not None:
    tagged = train_tagger(corpus, run_dir=run_dir + "-tagger", progress=False, **tagger)
    ended.update(tagger_step=tagged.step, tagger_val_loss=tagged.val_loss)
print(json.dumps(ended))
"""
# A punctuation tagger's run, which the first run of two processes trains after its language
# model: the same skeleton carries it over processes.
TAGGER = dict(
    hidden_size=16, embed_size=8, layers=1, batch_size=8, seq_len=16, steps=6, eval_every=3
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    return dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """The children a test starts; any still running at its end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def start(processes: list, command: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    processes.append(process)
    return process


def run_two(processes: list, corpus: Path, run_dir: Path, options: dict) -> list[dict]:
    coordinator = f"127.0.0.1:{free_port()}"
    children = [
        start(
            processes,
            [
                sys.executable,
                "-c",
                PROCESS,
                coordinator,
                "2",
                str(index),
                str(corpus),
                str(run_dir),
                json.dumps(options),
            ],
        )
        for index in range(2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    return results


def params(run_dir: Path) -> dict[str, np.ndarray]:
    arrays = ckpt.load(run_dir / ckpt.LATEST).arrays
    return {k: v for k, v in arrays.items() if not k.startswith("opt_state/")}


def test_two_processes_train_the_model_of_one_and_resume(
    corpus_file: Path, tmp_path: Path, processes: list
):
    charlm.train(str(corpus_file), run_dir=tmp_path / "one", steps=8, progress=False, **OPTIONS)
    tagger = dict(TAGGER, precision="float32")
    charlm.train_tagger(str(corpus_file), run_dir=tmp_path / "one-tagger", progress=False, **tagger)
    options = {**OPTIONS, "steps": 8, "tagger": tagger}
    together = run_two(processes, corpus_file, tmp_path / "two", options)
    # Each process scored the held-out split on its own copy of the parameters: the same loss.
    assert together[0] == together[1]
    assert together[0]["step"] == 8
    one = params(tmp_path / "one")
    two = params(tmp_path / "two")
    assert any(name.startswith("carry/") for name in one)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], err_msg=name, **TOLERANCE)
    assert len((tmp_path / "two" / ckpt.METRICS).read_text().splitlines()) == 2
    assert together[0]["tagger_step"] == 6
    one_tagger, two_tagger = params(tmp_path / "one-tagger"), params(tmp_path / "two-tagger")
    assert any(name.startswith("params/") for name in one_tagger)
    for name in one_tagger:
        np.testing.assert_allclose(two_tagger[name], one_tagger[name], err_msg=name, **TOLERANCE)

    run_two(processes, corpus_file, tmp_path / "split", {**OPTIONS, "steps": 4})
    resumed = run_two(processes, corpus_file, tmp_path / "split", {"resume": True, "steps": 8})
    assert resumed[0]["step"] == resumed[1]["step"] == 8
    split = params(tmp_path / "split")
    for name in one:
        np.testing.assert_allclose(split[name], one[name], err_msg=name, **TOLERANCE)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--coordinator", "127.0.0.1:1234"], "--num-processes, --process-id missing"),
        (
            ["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"],
            "--coordinator must be HOST:PORT",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be from 0 to 1",
        ),
    ],
)
def test_options_that_do_not_fit_together_are_one_line(
    corpus_file: Path, options: list[str], message: str
):
    assert_one_line(["-m", "charlm", "train", str(corpus_file), *options], message)


def test_a_run_that_nobody_joins_is_one_line_after_its_time_out(
    corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    """Process 1 of 2 waits for a coordinator that is not there; JAX's runtime aborts it when
    the time-out (shortened here) is up, and the line says what to do."""
    monkeypatch.setenv("CHARLM_JOIN_TIMEOUT_S", "3")
    coordinator = f"127.0.0.1:{free_port()}"
    options = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", "1"]
    command = ["-m", "charlm", "train", str(corpus_file), "--run-dir", "r", *options]
    assert_one_line(command, f"could not join the run coordinated at {coordinator} within 3 s")


@pytest.mark.parametrize("value", ["abc", "-5", "0", "1.5"])
def test_a_bad_join_time_out_is_one_line_even_for_one_process(
    corpus_file: Path, monkeypatch: pytest.MonkeyPatch, value: str
):
    """It was read when charlm.devices.cluster was imported: a traceback for "abc" in any run,
    and a hang for "-5"."""
    from click.testing import CliRunner

    from charlm.cli import main

    monkeypatch.setenv("CHARLM_JOIN_TIMEOUT_S", value)
    result = CliRunner().invoke(main, ["train", str(corpus_file), "--steps", "1", "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"charlm: error: CHARLM_JOIN_TIMEOUT_S={value!r} is not a number of seconds; set it to "
        "a whole number of at least 1, or unset it for 120"
    ]


def assert_one_line(arguments: list[str], message: str) -> None:
    """Python with `arguments` fails with exit status 1 and one line of stderr holding
    `message`."""
    result = subprocess.run(
        [sys.executable, *arguments],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "Slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ],
)
def test_a_scheduler_that_started_several_tasks_asks_for_a_run_of_several_processes(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: str | None
):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert cluster.scheduler() == expected
    assert cluster.is_requested(None, None, None) is (expected is not None)
    # Explicit options decide over the scheduler: one process is a run of its own.
    assert cluster.is_requested("127.0.0.1:1234", 1, 0) is False


def test_the_runtime_failures_of_a_lost_process_are_told_from_other_errors():
    import jax

    assert cluster.is_runtime_failure(jax.errors.JaxRuntimeError("UNAVAILABLE: task 1"))
    # multihost_utils's collectives surface the runtime's status as a ValueError.
    failed = ValueError("UNKNOWN: Gloo all-reduce failed: Read error: Connection reset by peer")
    assert cluster.is_runtime_failure(failed)
    assert not cluster.is_runtime_failure(ValueError("operands could not be broadcast together"))
