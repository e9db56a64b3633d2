"""A lost process of a run of several (jax.distributed) on 127.0.0.1: the others stop with one
line, and the run resumes. A file of its own, so that a worker of the test suite can run it
beside tests/test_cluster.py: each of the two waits mostly on child processes.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from conftest import TINY
from test_cluster import free_port, processes, start

from charlm.checkpoints import file_format as ckpt
from charlm.devices import cluster

__all__ = ["processes"]  # the fixture, shared with tests/test_cluster.py


def cli_process(corpus: Path, run_dir: Path, coordinator: str, index: int, *extra: str) -> list:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return [
        sys.executable,
        "-m",
        "charlm",
        "train",
        str(corpus),
        "--run-dir",
        str(run_dir),
        *options,
        "--coordinator",
        coordinator,
        "--num-processes",
        "2",
        "--process-id",
        str(index),
        *extra,
    ]


def test_a_lost_process_stops_the_others_with_one_line_and_the_run_resumes(
    corpus_file: Path, tmp_path: Path, processes: list
):
    run_dir = tmp_path / "run"
    coordinator = f"127.0.0.1:{free_port()}"
    extra = ("--steps", "100000", "--eval-every", "20", "--quiet")
    children = [
        start(processes, cli_process(corpus_file, run_dir, coordinator, i, *extra))
        for i in range(2)
    ]
    deadline = time.monotonic() + 180
    while not (run_dir / ckpt.LATEST).exists():
        assert time.monotonic() < deadline, children[0].communicate(timeout=5)
        assert children[0].poll() is None, children[0].communicate()[1][-2000:]
        time.sleep(0.2)
    time.sleep(2)
    children[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = children[0].communicate(timeout=cluster.HEARTBEAT_TIMEOUT_S * 4 + 30)
    waited = time.monotonic() - killed
    assert children[0].returncode not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("charlm: error: process 1 of the run stopped"), lines[0]
    assert "--resume" in lines[0]
    assert waited < cluster.HEARTBEAT_TIMEOUT_S * 4 + 30
    saved = ckpt.load(run_dir / ckpt.LATEST).meta["step"]
    assert saved >= 20 and saved % 20 == 0

    coordinator = f"127.0.0.1:{free_port()}"
    again = [
        start(
            processes,
            cli_process(
                corpus_file,
                run_dir,
                coordinator,
                i,
                "--resume",
                "--steps",
                str(saved + 5),
                "--quiet",
            ),
        )
        for i in range(2)
    ]
    for child in again:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
    assert ckpt.load(run_dir / ckpt.LATEST).meta["step"] == saved + 5
