"""A training run's checkpoints: what goes into them, when they may be written, and the
divergence check that decides whether parameters are worth keeping."""

from __future__ import annotations

import dataclasses
import datetime
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charlm import __version__
from charlm.checkpoints import file_format as ckpt
from charlm.data.corpus import BatchStream
from charlm.devices.data_parallel import DataParallel
from charlm.errors import CharlmError
from charlm.lm import model
from charlm.lm.step import sequence_loss
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
    """Writes a run's latest.ckpt (and best.ckpt) atomically, each time after one forward pass
    on the next batch has shown that the parameters about to be saved are sane; remembers the
    step of the last one written, which a divergence message names."""

    def __init__(
        self,
        session: Session,
        model_config: model.ModelConfig,
        stream: BatchStream,
        parallel: DataParallel,
    ):
        self.session = session
        self.parallel = parallel
        self.model_config = model_config
        self.stream = stream
        self.saved_step: int | None = session.loaded.meta["step"] if session.loaded else None
        self._probe_loss = jax.jit(partial(sequence_loss, config=model_config))

    def check(self, kind: str, losses: np.ndarray, first_step: int) -> None:
        """Raise TrainingDiverged if one of `losses` (of steps from `first_step`) went bad."""
        problem = loss_problem(losses, len(self.session.data.vocab))
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
        self, state: dict[str, Any], decay_steps: int, losses: dict[str, Any], is_best: bool
    ) -> None:
        """Write `state` at its step, with `losses` (train_loss, val_loss, best_val_loss) and
        the decay horizon in its metadata. Every process of a run calls it: they gather the
        state, process 0 alone writes, and none goes on before the files are whole."""
        config = self.session.config
        step = int(state["step"])
        groups = {g: state[g] for g in ("params", "opt_state", "carry")}
        arrays = self.parallel.to_host({**groups, "rng": jax.random.key_data(state["rng"])})
        inputs, targets, reset = self.stream.batch(step)
        carry = arrays["carry"]
        if reset:
            carry = model.initial_state(self.model_config, config.batch_size)
        loss = self._probe_loss(arrays["params"], inputs, targets, carry)[0]
        self.check("training", np.array([float(loss)]), step)
        if self.parallel.is_main:
            self._write(arrays, step, decay_steps, losses, is_best)
        self.parallel.barrier(f"checkpoint at step {step}")
        self.saved_step = step

    def _write(
        self,
        arrays: dict[str, Any],
        step: int,
        decay_steps: int,
        losses: dict[str, Any],
        is_best: bool,
    ) -> None:
        config, data = self.session.config, self.session.data
        steps_per_epoch = self.stream.steps_per_epoch
        meta = {
            "charlm_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model_config.to_dict(),
            "vocab": data.vocab.chars,
            "train": dataclasses.asdict(config),
            "step": step,
            "decay_steps": decay_steps,
            "epoch": step / steps_per_epoch,
            "data_position": {
                "steps_per_epoch": steps_per_epoch,
                "stream_offset": (step % steps_per_epoch) * config.seq_len,
            },
            "corpus": corpus_meta(data, config.encoding),
            **losses,
        }
        blob = ckpt.encode(meta, arrays)
        run_path = self.session.run_path
        ckpt.write_atomic(run_path / ckpt.LATEST, blob)
        if is_best:
            ckpt.write_atomic(run_path / ckpt.BEST, blob)
        ckpt.remember_run(run_path)


def restore(state: dict[str, Any], loaded: ckpt.Checkpoint) -> dict[str, Any]:
    """`state` (a fresh one, as `init_state` makes it) with what `loaded` saved."""
    state = dict(state)
    for group in ("params", "opt_state", "carry"):
        state[group] = loaded.tree(group, state[group])
    state["step"] = np.asarray(loaded.meta["step"], np.int32)
    state["rng"] = jax.random.wrap_key_data(jnp.asarray(loaded.arrays["rng"]))
    return state
