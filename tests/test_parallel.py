"""Data parallelism: a run on several devices trains the same model as on one, resumes on any
number of them, and refuses a batch that the devices cannot share; a language model's run and
a punctuation tagger's alike.

JAX fixes its device count when it starts, so each case runs in a child process with
JAX_NUM_CPU_DEVICES set: 4 CPU devices there, 1 in the test process itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY

from charlm.checkpoints import file_format as ckpt
from charlm.cli import main

# Trainings of the same global batch on 1, 2 and 4 devices, a step of a fresh run on 2 devices
# to look at where its state lives, and runs that change their device count when resumed. The
# decay horizon is fixed at 8 steps so that a run stopped at 4 and resumed is the run of 8.
CHILD = r"""
import json, shutil, sys, time
from charlm.devices.data_parallel import DataParallel
from charlm.lm.training import RUN_KIND, LanguageModelRun, train
from charlm.punctuation.training import train_tagger
from charlm.training.loop import TrainingRun
from charlm.training.run_setup import open_run

corpus, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
options.update(steps=8, decay_steps=8, eval_every=4, progress=False)
for devices in (1, 2, 4):
    train(corpus, run_dir=f"{out}/on-{devices}", devices=devices, **options)
for first, then in ((2, 1), (1, 4)):
    run_dir = f"{out}/from-{first}-to-{then}"
    train(corpus, run_dir=run_dir, devices=first, **{**options, "steps": 4})
    shutil.copy(f"{run_dir}/latest.ckpt", f"{run_dir}-step-4.ckpt")
    train(resume=True, run_dir=run_dir, devices=then, steps=8, progress=False)
tagger = dict(hidden_size=16, embed_size=8, layers=1, batch_size=8, seq_len=16, eval_every=3,
              precision="float32", steps=6, decay_steps=6, progress=False)
for devices in (1, 2):
    train_tagger(corpus, run_dir=f"{out}/tagger-on-{devices}", devices=devices, **tagger)
train_tagger(corpus, run_dir=f"{out}/tagger-from-2-to-1", devices=2, **{**tagger, "steps": 3})
shutil.copy(f"{out}/tagger-from-2-to-1/latest.ckpt", f"{out}/tagger-step-3.ckpt")
train_tagger(resume=True, run_dir=f"{out}/tagger-from-2-to-1", devices=1, steps=6, progress=False)
options.pop("progress")
session = open_run(RUN_KIND, corpus, None, f"{out}/look", False, options, False)
parallel = DataParallel.over(2)
run = TrainingRun(session, LanguageModelRun(session, parallel), parallel, False, time.monotonic())
run.train_step()
carry, params = run.state["carry"][0][0], run.state["params"]["head"]["b"]

import jax, numpy as np
from charlm.checkpoints import file_format as ckpt
from charlm.lm.checkpoint import load_model
from charlm.inference.sampling import generate
model = load_model(ckpt.load(f"{out}/on-1/latest.ckpt"))[:2]
samples = {
    devices: np.concatenate(list(generate(
        *model, np.zeros(1, np.int32), 60, jax.random.key(3), num_samples=4,
        parallel=DataParallel.over(devices),
    )), axis=1).tolist()
    for devices in (1, 2, 4)
}
print(json.dumps({
    "samples_alike": samples[1] == samples[2] == samples[4],
    "samples_differ": len({tuple(s) for s in samples[1]}) == 4,
    "carry_devices": len(carry.sharding.device_set),
    "carry_rows_per_device": carry.addressable_shards[0].data.shape[0],
    "params_replicated": params.sharding.is_fully_replicated,
    "params_devices": len(params.sharding.device_set),
}))
"""

# Within float32 tolerance: the devices sum their halves of the batch before the all-reduce
# adds them, a different order of the same float32 additions as one device's.
TOLERANCE = dict(rtol=2e-5, atol=2e-6)


def _cpu_devices(count: int) -> dict[str, str]:
    return dict(os.environ, JAX_NUM_CPU_DEVICES=str(count), JAX_PLATFORMS="cpu")


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    arrays = ckpt.load(run_dir / ckpt.LATEST).arrays
    return {name: array for name, array in arrays.items() if not name.startswith("opt_state/")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from conftest import mixed_text

    out = tmp_path_factory.mktemp("parallel")
    corpus = out / "mixed.txt"
    corpus.write_text(mixed_text(), encoding="utf-8")
    options = dict(TINY, dropout=0.2, embed_dropout=0.1, weight_drop=0.25, batch_size=8)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(out), json.dumps(options)],
        cwd=out,  # where its runs record themselves as the latest
        env=_cpu_devices(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("devices", [2, 4])
def test_training_on_several_devices_gives_the_parameters_of_one(trained, devices: int):
    out, _ = trained
    one, several = _params(out / "on-1"), _params(out / f"on-{devices}")
    assert one.keys() == several.keys()
    assert any(name.startswith("carry/") for name in one)
    for name in one:
        np.testing.assert_allclose(several[name], one[name], err_msg=name, **TOLERANCE)
    # The tolerance is small against what training changes: steps 5 to 8 move every matrix
    # by far more than it allows.
    earlier = ckpt.load(out / "from-1-to-4-step-4.ckpt").arrays
    for name in one:
        if name.startswith("params/") and one[name].ndim == 2:
            assert np.abs(one[name] - earlier[name]).max() > 100 * TOLERANCE["atol"], name


def test_the_state_is_split_over_the_devices_and_the_parameters_replicated(trained):
    """Also: four samples drawn on 1, 2 and 4 devices are the same four texts."""
    _, layout = trained
    assert layout == {
        "samples_alike": True,
        "samples_differ": True,
        "carry_devices": 2,
        "carry_rows_per_device": 4,
        "params_replicated": True,
        "params_devices": 2,
    }


@pytest.mark.parametrize("change", ["from-2-to-1", "from-1-to-4"])
def test_a_run_resumes_on_another_number_of_devices(trained, change: str):
    out, _ = trained
    straight, resumed = _params(out / "on-1"), _params(out / change)
    assert ckpt.load(out / change / ckpt.LATEST).meta["step"] == 8
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], err_msg=name, **TOLERANCE)


@pytest.mark.parametrize("run", ["tagger-on-2", "tagger-from-2-to-1"])
def test_a_tagger_trains_through_the_same_skeleton_on_two_devices_as_on_one(trained, run: str):
    """The tagger's step, batches and evaluation are its own; the devices, the sharding and
    resume come from the run skeleton, as for the language model."""
    out, _ = trained
    one, other = _params(out / "tagger-on-1"), _params(out / run)
    assert one.keys() == other.keys() and any(name.startswith("params/") for name in one)
    meta = ckpt.load(out / run / ckpt.LATEST).meta
    assert meta["kind"] == "tagger" and meta["step"] == 6
    earlier = ckpt.load(out / "tagger-step-3.ckpt").arrays
    for name in one:
        np.testing.assert_allclose(other[name], one[name], err_msg=name, **TOLERANCE)
        if one[name].ndim == 2:
            assert np.abs(one[name] - earlier[name]).max() > 100 * TOLERANCE["atol"], name


def test_a_batch_the_devices_cannot_share_is_one_line(corpus_file: Path):
    result = subprocess.run(
        [sys.executable, "-m", "charlm", "train", str(corpus_file), "--batch-size", "3"],
        env=_cpu_devices(2),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "charlm: error: --batch-size 3 cannot be split over 2 devices; use a multiple of 2 (2 or 4) "
        "or fewer --devices"
    ]


def test_more_devices_than_there_are_is_one_line(corpus_file: Path):
    result = CliRunner().invoke(main, ["train", str(corpus_file), "--devices", "3"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "charlm: error: --devices 3: this process has 1 CPU device; give a number from 1 to 1"
    )
