"""A training run's checkpoints, for every kind of model: what goes into them, when they may be
written, and the divergence check that decides whether parameters are worth keeping."""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charlm import __version__
from charlm.checkpoints import file_format as ckpt
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.training.run_setup import Session, corpus_meta


class TrainingDiverged(CharlmError):
    """The loss became NaN, infinite, or exploded; the last good checkpoint is kept."""


def loss_problem(losses: np.ndarray, vocab_size: int) -> tuple[int, str] | None:
    """The index and description of the first loss that is NaN, infinite, or above
    3·ln(V) + 5 nats, far worse than the ln(V) of a uniform guess: a sign of divergence."""
    uniform = math.log(vocab_size)
    bad = ~np.isfinite(losses) | (losses > 3 * uniform + 5)
    if not bad.any():
        return None
    index = int(np.argmax(bad))
    value = losses[index]
    if not np.isfinite(value):
        return index, f"became {value}"
    return index, f"exploded to {value:.3g} nats (a uniform guess scores {uniform:.3g})"


class Checkpointer:
    """Writes a run's latest.ckpt (and best.ckpt) atomically, each time after the kind's probe
    (one forward pass on the next batch) has shown that the parameters about to be saved are
    sane; remembers the step of the last one written, which a divergence message names."""

    def __init__(self, session: Session, parts: Any, parallel: DataParallel):
        self.session = session
        self.parts = parts
        self.parallel = parallel
        self.saved_step: int | None = session.loaded.meta["step"] if session.loaded else None

    def check(self, kind: str, losses: np.ndarray, first_step: int) -> None:
        """Raise TrainingDiverged if one of `losses` (of steps from `first_step`) went bad."""
        problem = loss_problem(losses, self.parts.classes)
        if problem is None:
            return
        index, what = problem
        kept = (
            f"the last good checkpoint (step {self.saved_step}) is kept in {self.session.run_path}"
            if self.saved_step is not None
            else "no checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"{kind} loss {what} at step {first_step + index}; training stopped and {kept}; "
            "lower --lr or --clip-norm and try again"
        )

    def save(
        self, state: dict[str, Any], decay_steps: int, scores: dict[str, Any], is_best: bool
    ) -> None:
        """Write `state` at its step, with `scores` (train_loss, val_loss and the kind's) and
        the decay horizon in its metadata. Every process of a run calls it: they gather the
        state, process 0 alone writes, and none goes on before the files are whole."""
        step = int(state["step"])
        groups = {name: part for name, part in state.items() if name not in ("step", "rng")}
        if "rng" in state:
            groups["rng"] = jax.random.key_data(state["rng"])
        arrays = self.parallel.to_host(groups)
        probe = self.parts.probe_loss(arrays, step)
        if probe is not None:
            self.check("training", np.array([probe]), step)
        if self.parallel.is_main:
            self._write(arrays, step, decay_steps, scores, is_best)
        self.parallel.barrier(f"checkpoint at step {step}")
        self.saved_step = step

    def _write(
        self,
        arrays: dict[str, Any],
        step: int,
        decay_steps: int,
        scores: dict[str, Any],
        is_best: bool,
    ) -> None:
        config, session = self.session.config, self.session
        meta = {
            "charlm_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.parts.metadata(step),
            "train": dataclasses.asdict(config),
            "step": step,
            "decay_steps": decay_steps,
            "epoch": step / self.parts.steps_per_epoch,
            "corpus": corpus_meta(session.corpus, config.encoding),
            **scores,
        }
        blob = ckpt.encode(meta, arrays)
        run_path = session.run_path
        ckpt.write_atomic(run_path / ckpt.LATEST, blob)
        if is_best:
            ckpt.write_atomic(run_path / ckpt.BEST, blob)
        ckpt.remember_run(run_path, session.kind.name)


def restore(state: dict[str, Any], loaded: ckpt.Checkpoint) -> dict[str, Any]:
    """`state` (a fresh one, as the kind's `init_state` makes it) with what `loaded` saved."""
    state = dict(state)
    for group in state:
        if group not in ("step", "rng"):
            state[group] = loaded.tree(group, state[group])
    state["step"] = np.asarray(loaded.meta["step"], np.int32)
    if "rng" in state:
        state["rng"] = jax.random.wrap_key_data(jnp.asarray(loaded.arrays["rng"]))
    return state
