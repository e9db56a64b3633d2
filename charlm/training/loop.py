"""Training: the loop that feeds the compiled step (`charlm.lm.step`), validates, and checkpoints.

`train` is the loop, top to bottom; `TrainingRun` holds what it works on, one method per
concern: a step on the devices (`charlm.devices.data_parallel`), the losses and progress shown
(`charlm.training.progress`), evaluation (`charlm.lm.evaluation.Validation`) and checkpoints
(`charlm.training.checkpointer`). The hidden state carried from one step to the next is part of the
checkpoint, with everything else the step depends on, so `resume=True` continues a run bit
for bit.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from charlm.checkpoints import file_format as ckpt
from charlm.data.corpus import BatchStream
from charlm.devices import cluster
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.lm.config import TrainConfig
from charlm.lm.evaluation import Validation
from charlm.lm.step import init_state, make_train_step
from charlm.storage import remove_leftovers
from charlm.training.checkpointer import Checkpointer, TrainingDiverged, restore
from charlm.training.progress import Progress, RecentLosses, append_metrics, show_loss
from charlm.training.run_setup import Session, open_session
from charlm.training.schedule import Horizon, learning_rate, make_optimizer

__all__ = ["TrainResult", "TrainingDiverged", "TrainingRun", "train"]


@dataclass(frozen=True)
class TrainResult:
    """How a run ended. `stop` is "done", "time budget" or "interrupted"."""

    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stop: str


@contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class TrainingRun:
    """One session of a training run: its state on the devices, the pieces that watch and keep
    it, and its losses so far. `started` is when the session began (`time.monotonic`), from
    which the time budget counts."""

    def __init__(self, session: Session, parallel: DataParallel, progress: bool, started: float):
        config, data, loaded = session.config, session.data, session.loaded
        parallel.check_batch_size(config.batch_size)
        self.session, self.config, self.parallel, self.started = session, config, parallel, started
        self.stream = BatchStream(data.train_tokens, config.batch_size, config.seq_len)
        self.rows = parallel.local_rows(config.batch_size)
        leftovers = []
        if parallel.is_main:
            session.run_path.mkdir(parents=True, exist_ok=True)
            run_files = [session.run_path / ckpt.LATEST, session.run_path / ckpt.BEST]
            leftovers = remove_leftovers(run_files)
        self.horizon = Horizon.plan(
            config, self.stream.steps_per_epoch, loaded.meta["decay_steps"] if loaded else None
        )
        self.model_config = config.model_config(len(data.vocab))
        optimizer = make_optimizer(config)
        self._train_step = make_train_step(self.model_config, optimizer, parallel)
        state = init_state(self.model_config, optimizer, config.batch_size, config.seed)
        self.state = parallel.put_state(restore(state, loaded) if loaded else state)
        self.step = self.start_step = int(self.state["step"])
        self.validation = Validation(
            data.train_tokens, data.val_tokens, len(data.vocab), config.val_max_chars
        )
        self.checkpoints = Checkpointer(session, self.model_config, self.stream, parallel)
        self.losses = RecentLosses(config.batch_size * config.seq_len)
        self.val_loss: float | None = None
        self.best_val: float | None = loaded.meta.get("best_val_loss") if loaded else None
        self.eval_seconds = 0.0  # the last evaluation's, kept free at the end of a time budget
        by_time = self.horizon.total == Horizon.UNBOUNDED
        total = self.horizon.decay_steps if by_time else self.horizon.total
        self.progress = Progress(progress and parallel.is_main, total, self.step)

        n_params = sum(p.size for p in jax.tree.leaves(self.state["params"]))
        devices = f" on {parallel.size} devices" if parallel.size > 1 else ""
        if parallel.processes > 1:
            devices += f" of {parallel.processes} processes"
        self.progress.log(
            f"{'resuming' if loaded else 'training'} {self.model_config.describe()} "
            f"({n_params:,} parameters) {session.precision_note}{devices} on {data.path} at "
            f"step {self.step}: "
            f"{len(data.train_tokens):,} characters, {len(data.val_tokens):,} held out, "
            f"vocabulary {len(data.vocab):,}; run directory {session.run_path}"
        )
        for leftover in leftovers:
            self.progress.log(
                f"removed {leftover.name}, a checkpoint left half-written when a run here crashed"
            )

    def should_stop(self, interrupted: bool) -> str | None:
        """Why the run must stop before its next step ("interrupted", "time budget"), or
        None. The processes of a run must stop together: they follow process 0, which they
        ask at every --log-every step."""
        reason = None
        if interrupted:
            reason = "interrupted"
        elif self.config.time_budget:
            spent = time.monotonic() - self.started + self.eval_seconds
            reason = "time budget" if spent > self.config.time_budget else None
        if self.parallel.processes == 1:
            return reason
        if self.step % self.config.log_every:
            return None
        reasons = [None, "interrupted", "time budget"]
        return reasons[self.parallel.agree(reasons.index(reason))]

    def train_step(self) -> None:
        """One update, queued on the devices: nothing waits for it to finish."""
        inputs, targets, reset = self.stream.batch(self.step, self.rows)
        lr = np.float32(learning_rate(self.step, self.config, self.horizon.decay_steps))
        batch = self.parallel.put_batch(self.config.batch_size, inputs, targets)
        self.state, loss = self._train_step(self.state, *batch, reset, lr)
        self.step += 1
        self.losses.add(loss)
        self.progress.advance()

    def fetch_losses(self) -> None:
        """Bring the recent losses to the host, and stop if one of them went bad. The loss
        labelled step s is computed on the parameters after s updates."""
        losses = self.losses.fetch()
        self.checkpoints.check("training", losses, self.step - len(losses))

    def show(self) -> None:
        self.progress.show(self.losses.mean, self.losses.chars_per_sec, self.val_loss)

    def evaluate_and_save(self) -> None:
        """Score the held-out split, refit the decay horizon of a run limited by time, write
        the checkpoints and a line of metrics."""
        self.fetch_losses()
        eval_start = time.monotonic()
        step = self.step
        record: dict[str, Any] = {
            "step": step,
            "epoch": round(step / self.stream.steps_per_epoch, 4),
        }
        # Every process scores the same parameters alone, and gets the same loss.
        val_loss = self.validation.loss(
            self.parallel.local(self.state["params"]), self.model_config
        )
        is_best = val_loss is None
        if val_loss is not None:
            # The checkpoint about to be written holds exactly these parameters: vouch for them.
            self.checkpoints.check("validation", np.array([val_loss]), step)
            self.val_loss = val_loss
            is_best = self.best_val is None or val_loss < self.best_val
            self.best_val = val_loss if is_best else self.best_val
            record.update(val_loss=val_loss, val_bpc=val_loss / math.log(2))
            self.show()
            baselines = self.validation.baselines
            self.progress.log(
                f"step {step}: train loss {show_loss(self.losses.mean)}, val loss "
                f"{val_loss:.4f} ({val_loss / math.log(2):.3f} bits/char"
                f"{'; ' + baselines if baselines else ''}){' *best*' if is_best else ''}"
            )
        now = time.monotonic()
        elapsed, self.eval_seconds = now - self.started, now - eval_start
        if self.config.time_budget is not None:
            budget = self.config.time_budget - self.eval_seconds
            self.horizon.refit(step, step - self.start_step, elapsed, budget)
            self.horizon.decay_steps = self.parallel.agree(self.horizon.decay_steps)
            if self.horizon.refits:
                self.progress.set_total(self.horizon.decay_steps)
        record.update(
            train_loss=self.losses.mean,
            lr=learning_rate(step, self.config, self.horizon.decay_steps),
            chars_per_sec=round(self.losses.chars_per_sec),
            elapsed=round(elapsed, 2),
        )
        self.save(is_best)
        if self.parallel.is_main:
            append_metrics(self.session.run_path, record)
        self.losses.restart_clock()

    def save(self, is_best: bool) -> None:
        losses = {
            "train_loss": self.losses.mean,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val,
        }
        self.checkpoints.save(self.state, self.horizon.decay_steps, losses, is_best)


def train(
    corpus: str | None = None,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    devices: int | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a model on `corpus` (a text file, or the name of a catalog corpus, fetched if it
    is not here yet), or continue a run with `resume=True`.

    Options are the fields of TrainConfig, given as `config` or as keyword overrides. A new run
    goes to `run_dir` (default runs/<corpus name>, numbered if taken); `resume` continues the
    run in `run_dir`, or the working directory's latest run, from its latest checkpoint.
    `devices` is how many local devices share each batch (default: all of them); a run may
    resume on another number. Raises CharlmError for bad input and TrainingDiverged when the
    loss goes bad.
    """
    started = time.monotonic()
    session = open_session(corpus, config, run_dir, resume, overrides, progress)
    run = TrainingRun(session, DataParallel.over(devices), progress, started)
    every = session.config
    stop: str = "done"
    try:
        with _stop_on_interrupt() as interrupted:
            while run.step < run.horizon.total:
                reason = run.should_stop(interrupted.is_set())
                if reason is not None:
                    stop = reason
                    break
                run.train_step()
                if run.step % every.log_every == 0:
                    run.fetch_losses()
                if run.step % every.eval_every == 0:
                    run.evaluate_and_save()
                if run.step % every.log_every == 0 or run.step % every.eval_every == 0:
                    run.show()
            if stop == "interrupted":
                run.fetch_losses()
                run.save(is_best=False)
            elif run.checkpoints.saved_step != run.step:
                run.evaluate_and_save()
                run.show()
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if run.parallel.processes == 1 or not cluster.is_runtime_failure(err):
            raise
        # A collective that a lost process never joins fails in every process left.
        raise CharlmError(cluster.lost(err, run.checkpoints.saved_step, session.run_path)) from None
    finally:
        run.progress.close()
    run_path = session.run_path
    if stop == "interrupted":
        run.progress.log(
            f"interrupted at step {run.step}; saved {run_path / ckpt.LATEST}. "
            f"Resume with: charlm train --resume --run-dir {run_path}"
        )
    else:
        run.progress.log(f"stopped at step {run.step} ({stop}); checkpoints in {run_path}")
    return TrainResult(run_path, run.step, run.losses.mean, run.val_loss, run.best_val, stop)
