"""Checkpoint files: round trip, no pickle, atomic replacement, damaged files, run resolution."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint_meta import run_meta

from charlm.checkpoints import file_format as ckpt
from charlm.errors import CharlmError


def _trees(scale: float) -> dict:
    return {
        "params": {"layers": [{"w": np.full((3, 4), scale, np.float32)}], "b": np.zeros(2)},
        "opt_state": ({"count": jnp.asarray(7, jnp.int32)},),
        "rng": np.array([1, 2], np.uint32),
    }


def test_round_trip_keeps_values_shapes_and_meta(tmp_path: Path):
    path = tmp_path / "a.ckpt"
    meta = run_meta(vocab="ab出战")
    ckpt.write_atomic(path, ckpt.encode(meta, _trees(1.5)))
    loaded = ckpt.load(path)
    assert loaded.meta == meta
    template = _trees(0.0)
    params = loaded.tree("params", template["params"])
    np.testing.assert_array_equal(params["layers"][0]["w"], np.full((3, 4), 1.5))
    count = loaded.tree("opt_state", template["opt_state"])[0]["count"]
    assert count.shape == () and int(count) == 7  # 0-d arrays stay 0-d


def test_file_is_safetensors_not_pickle(tmp_path: Path):
    path = tmp_path / "a.ckpt"
    ckpt.write_atomic(path, ckpt.encode({"step": 1}, _trees(1.0)))
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{"  # a JSON header, then raw arrays
    assert b"charlm-checkpoint" in data[8 : 8 + header_len]
    assert not data.startswith(b"\x80")  # pickle protocol marker


def test_missing_array_or_wrong_shape_is_reported(tmp_path: Path):
    path = tmp_path / "a.ckpt"
    ckpt.write_atomic(path, ckpt.encode(run_meta(), {"params": {"w": np.zeros((2, 2))}}))
    loaded = ckpt.load(path)
    with pytest.raises(CharlmError, match="lacks the array params/v"):
        loaded.tree("params", {"v": np.zeros(2)})
    with pytest.raises(CharlmError, match="has shape"):
        loaded.tree("params", {"w": np.zeros(3)})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_or_foreign_file_gives_one_line(tmp_path: Path, damage: str):
    import safetensors.numpy

    path = tmp_path / "a.ckpt"
    good = ckpt.encode({"step": 1}, _trees(1.0))
    content = {
        "truncate": good[: len(good) // 2],
        "garbage": b"not a checkpoint at all",
        "foreign": safetensors.numpy.save({"x": np.zeros(2)}),
    }[damage]
    path.write_bytes(content)
    with pytest.raises(CharlmError, match="charlm checkpoint") as err:
        ckpt.load(path)
    assert "\n" not in str(err.value)


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path: Path, monkeypatch):
    path = tmp_path / "latest.ckpt"
    ckpt.write_atomic(path, ckpt.encode(dict(run_meta(), step=1), _trees(1.0)))

    def crash(fd):
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError):
        ckpt.write_atomic(path, ckpt.encode(dict(run_meta(), step=2), _trees(2.0)))
    assert ckpt.load(path).meta["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.ckpt"]


def test_process_killed_while_writing_leaves_a_whole_checkpoint(tmp_path: Path):
    """SIGKILL a process that rewrites a large checkpoint in a loop: whatever moment it dies,
    the file on disk is one of the complete versions."""
    path = tmp_path / "latest.ckpt"
    writer = textwrap.dedent(
        f"""
        import json
        import numpy as np
        from charlm.checkpoints import file_format as ckpt
        meta = json.loads({json.dumps(run_meta())!r})
        blobs = [
            ckpt.encode(dict(meta, step=s), {{"w": np.full(4_000_000, s, np.float32)}})
            for s in (1, 2)
        ]
        ckpt.write_atomic({str(path)!r}, blobs[0])
        print("ready", flush=True)
        n = 0
        while True:
            n += 1
            ckpt.write_atomic({str(path)!r}, blobs[n % 2])
        """
    )
    for delay in (0.05, 0.2, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = ckpt.load(path)
        step = loaded.meta["step"]
        assert step in (1, 2)
        np.testing.assert_array_equal(loaded.arrays["w"], np.full(4_000_000, step, np.float32))


def test_resolve_run_directory_and_last_run(tmp_path: Path):
    run = tmp_path / "runs" / "x"
    with pytest.raises(CharlmError, match="no run recorded"):
        ckpt.resolve(None)
    run.mkdir(parents=True)
    with pytest.raises(CharlmError, match="holds no checkpoint"):
        ckpt.resolve(run)
    (run / ckpt.LATEST).write_bytes(b"x")
    assert ckpt.resolve(run) == run / ckpt.LATEST
    (run / ckpt.BEST).write_bytes(b"x")
    assert ckpt.resolve(run) == run / ckpt.BEST
    ckpt.remember_run(run)
    assert ckpt.resolve(None) == run.resolve() / ckpt.BEST
    with pytest.raises(CharlmError, match="no checkpoint at"):
        ckpt.resolve(tmp_path / "nope.ckpt")


@pytest.mark.parametrize(
    ("name", "command", "array"),
    [
        ("lm-lstm-float32.ckpt", ["sample", "-p", "出战", "-n", "5"], "params/embed"),
        ("lm-lstm-float32.ckpt", ["perplexity"], "params/layers/0/w_h"),
        ("tagger.ckpt", ["punctuate"], "params/head/w"),
    ],
)
def test_a_parameter_that_is_not_finite_is_refused_on_load(
    tmp_path: Path, name: str, command: list[str], array: str
):
    """One NaN made `sample` print 出战？？？？ and `perplexity` print nan, with exit 0."""
    import safetensors.numpy
    from click.testing import CliRunner

    from charlm.cli import main

    source = Path(__file__).parent / "data" / "format4"
    with open(source / name, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    arrays = safetensors.numpy.load_file(source / name)
    arrays[array] = arrays[array].copy()
    arrays[array].flat[0] = np.nan
    damaged = tmp_path / name
    safetensors.numpy.save_file(arrays, damaged, metadata=header)
    corpus = [str(source / "sanguo-mini.txt")] if command[0] == "perplexity" else []
    result = CliRunner().invoke(main, [*command, "-c", str(damaged), *corpus], input="曹操引兵")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"charlm: error: {damaged}: array {array} holds NaN or infinite values; the checkpoint "
        "is damaged, use another one of the run (best.ckpt or latest.ckpt)"
    ]
