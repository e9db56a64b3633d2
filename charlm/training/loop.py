"""The run skeleton: the loop that every kind of model trains through.

`train_run` is the loop, top to bottom; `TrainingRun` holds what it works on, one method per
concern: a step on the devices (`charlm.devices.data_parallel`), the losses and progress shown
(`charlm.training.progress`), evaluation, and checkpoints (`charlm.training.checkpointer`).
Run directories, resume, the time budget, Ctrl-C, the checkpoint cadence, best and latest,
metrics, data parallelism and runs of several processes are all here, once. A kind of model
brings only its own parts (`ModelRun`): its state, its step, its batches, its evaluation and
its part of the checkpoint's metadata (`charlm.lm.training`, `charlm.punctuation.training`).
Everything a step depends on is in the checkpoint, so `resume=True` continues a run bit for bit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import optax

from charlm.checkpoints import file_format as ckpt
from charlm.devices import cluster
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.storage import remove_leftovers, run_lock
from charlm.training.checkpointer import Checkpointer, TrainingDiverged, restore
from charlm.training.progress import Progress, RecentLosses, append_metrics, show_loss
from charlm.training.run_setup import Session
from charlm.training.schedule import Horizon, learning_rate, make_optimizer

__all__ = ["Evaluation", "ModelRun", "TrainResult", "TrainingDiverged", "TrainingRun", "train_run"]


@dataclass(frozen=True)
class TrainResult:
    """How a run ended. `stop` is "done", "time budget" or "interrupted"; `best_val_loss` is
    a language model's best held-out loss (a tagger's best is by break F1, in its metadata)."""

    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stop: str


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a model kind on its held-out data: the mean loss in nats, the value
    its best checkpoint is chosen by (`ModelRun.best_field`), the words that follow "val loss"
    in the log line, and what it adds to the metrics record and to the checkpoint's metadata."""

    loss: float
    best_value: float
    summary: str
    record: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class ModelRun(Protocol):
    """What a kind of model brings to a run: everything the skeleton does not know."""

    steps_per_epoch: int
    chars_per_step: int  # characters a step reads, for the speed shown
    classes: int  # a uniform guess scores ln(classes): the bound of the divergence check
    best_field: str  # the metadata field of the best value: "best_val_loss", ...
    higher_is_better: bool  # whether a higher best value is better
    scores: dict[str, Any]  # the kind's latest scores, as its checkpoints record them
    notes: list[str]  # lines for the log after the first, such as where parameters came from

    def describe(self, parameters: int) -> str:
        """The model and its count of `parameters`, as the first log line names them:
        "LSTM 2×256 (1,234,567 parameters)"."""

    def data_summary(self) -> str:
        """The data, as the first log line describes it after the corpus's path."""

    def init_state(self, optimizer: optax.GradientTransformation) -> dict[str, Any]:
        """A fresh state: params, opt_state, step, and whatever else the kind's step carries."""

    def make_step(self, optimizer: optax.GradientTransformation, parallel: DataParallel) -> Any:
        """The compiled step: (state, *batch arrays, *batch extras, lr) -> (state, loss)."""

    def batch(self, step: int, rows: slice) -> tuple[tuple[np.ndarray, ...], tuple[Any, ...]]:
        """The rows of step `step`'s batch that this process holds, each split over the
        devices along axis 0, and the arguments that follow them (not split)."""

    def evaluate(self, params: Any) -> Evaluation | None:
        """Score `params` on the held-out data; None when nothing is held out."""

    def probe_loss(self, arrays: dict[str, Any], step: int) -> float | None:
        """The loss of one forward pass of the state `arrays` (host copies) on step `step`'s
        batch, which vouches for them before they are saved; None when the kind has none."""

    def metadata(self, step: int) -> dict[str, Any]:
        """The kind's own sections of the checkpoint's metadata at `step`, vocab included."""


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

    def __init__(
        self,
        session: Session,
        parts: ModelRun,
        parallel: DataParallel,
        progress: bool,
        started: float,
    ):
        config, loaded = session.config, session.loaded
        parallel.check_batch_size(config.batch_size)
        self.session, self.config, self.parts = session, config, parts
        self.parallel, self.started = parallel, started
        self.rows = parallel.local_rows(config.batch_size)
        leftovers = []
        if parallel.is_main:
            session.run_path.mkdir(parents=True, exist_ok=True)
            run_files = [session.run_path / ckpt.LATEST, session.run_path / ckpt.BEST]
            leftovers = remove_leftovers(run_files)
        self.horizon = Horizon.plan(
            config, parts.steps_per_epoch, loaded.meta["decay_steps"] if loaded else None
        )
        optimizer = make_optimizer(config)
        self._train_step = parts.make_step(optimizer, parallel)
        state = parts.init_state(optimizer)
        self.state = parallel.put_state(restore(state, loaded) if loaded else state)
        self.step = self.start_step = int(self.state["step"])
        self.checkpoints = Checkpointer(session, parts, parallel)
        self.losses = RecentLosses(parts.chars_per_step)
        self.val_loss: float | None = None
        self.best: float | None = loaded.meta.get(parts.best_field) if loaded else None
        self.eval_seconds = 0.0  # the last evaluation's, kept free at the end of a time budget
        by_time = self.horizon.total == Horizon.UNBOUNDED
        total = self.horizon.decay_steps if by_time else self.horizon.total
        self.progress = Progress(progress and parallel.is_main, total, self.step)

        n_params = sum(p.size for p in jax.tree.leaves(self.state["params"]))
        devices = f" on {parallel.size} devices" if parallel.size > 1 else ""
        if parallel.processes > 1:
            devices += f" of {parallel.processes} processes"
        self.progress.log(
            f"{'resuming' if loaded else 'training'} {parts.describe(n_params)} "
            f"{session.precision_note}{devices} on {session.corpus.path} at step "
            f"{self.step}: {parts.data_summary()}; run directory {session.run_path}"
        )
        for note in parts.notes:
            self.progress.log(note)
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
        split, extras = self.parts.batch(self.step, self.rows)
        lr = np.float32(learning_rate(self.step, self.config, self.horizon.decay_steps))
        batch = self.parallel.put_batch(self.config.batch_size, *split)
        self.state, loss = self._train_step(self.state, *batch, *extras, lr)
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
        """Score the held-out data, refit the decay horizon of a run limited by time, write
        the checkpoints and a line of metrics."""
        self.fetch_losses()
        eval_start = time.monotonic()
        step = self.step
        record: dict[str, Any] = {
            "step": step,
            "epoch": round(step / self.parts.steps_per_epoch, 4),
        }
        # Every process scores the same parameters alone, and gets the same result.
        evaluation = self.parts.evaluate(self.parallel.local(self.state["params"]))
        is_best = evaluation is None
        if evaluation is not None:
            # The checkpoint about to be written holds exactly these parameters: vouch for them.
            self.checkpoints.check("validation", np.array([evaluation.loss]), step)
            self.val_loss = evaluation.loss
            self.parts.scores.update(evaluation.meta)
            is_best = self.best is None or (
                evaluation.best_value > self.best
                if self.parts.higher_is_better
                else evaluation.best_value < self.best
            )
            self.best = evaluation.best_value if is_best else self.best
            record.update(val_loss=evaluation.loss, **evaluation.record)
            self.show()
            self.progress.log(
                f"step {step}: train loss {show_loss(self.losses.mean)}, val loss "
                f"{evaluation.summary}{' *best*' if is_best else ''}"
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
        scores = {
            "train_loss": self.losses.mean,
            "val_loss": self.val_loss,
            **self.parts.scores,
            self.parts.best_field: self.best,
        }
        self.checkpoints.save(self.state, self.horizon.decay_steps, scores, is_best)

    def result(self, stop: str) -> TrainResult:
        best_loss = self.best if self.parts.best_field == "best_val_loss" else None
        return TrainResult(
            self.session.run_path, self.step, self.losses.mean, self.val_loss, best_loss, stop
        )


def train_run(
    session: Session,
    parts: Callable[[DataParallel], ModelRun],
    devices: int | None,
    progress: bool,
    started: float,
) -> TrainResult:
    """Train the opened `session` to its end: its time budget, its length, or Ctrl-C, which
    saves the latest checkpoint. `parts` makes the kind's parts for the devices of the run:
    the first `devices` local ones of every process (all when None). Raises CharlmError for
    a process lost from a run of several, and TrainingDiverged when the loss goes bad."""
    parallel = DataParallel.over(devices)
    model_run = parts(parallel)
    # Process 0 alone writes the run directory; it holds the directory's lock throughout.
    with run_lock(session.run_path) if parallel.is_main else contextlib.nullcontext():
        return _train(session, model_run, parallel, progress, started)


def _train(
    session: Session, parts: ModelRun, parallel: DataParallel, progress: bool, started: float
) -> TrainResult:
    run = TrainingRun(session, parts, parallel, progress, started)
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
            f"Resume with: {session.kind.command} --resume --run-dir {run_path}"
        )
    else:
        run.progress.log(f"stopped at step {run.step} ({stop}); checkpoints in {run_path}")
    return run.result(stop)
