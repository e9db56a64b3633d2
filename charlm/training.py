"""Training: the loop that feeds the compiled step (`charlm.step`), validates, and checkpoints.

The hidden state carried from one step to the next is part of the checkpoint, with everything
else the step depends on, so `resume=True` continues a run bit for bit.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from charlm import __version__, hardware, model
from charlm import checkpoint as ckpt
from charlm.catalog import resolve_corpus
from charlm.config import DEFAULT_EPOCHS, LENGTH, RESUMABLE, TrainConfig
from charlm.corpus import BatchStream, Corpus, Vocabulary, load_corpus
from charlm.errors import CharlmError
from charlm.evaluation import total_nats, unigram_nats
from charlm.files import remove_leftovers
from charlm.step import init_state, learning_rate, make_optimizer, make_train_step, sequence_loss


@dataclass(frozen=True)
class TrainResult:
    """How a run ended. `stop` is "done", "time budget" or "interrupted"."""

    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stop: str


class TrainingDiverged(CharlmError):
    """The loss became NaN, infinite, or exploded; the last good checkpoint is kept."""


# Validation during training reads the held-out text as this many streams side by side, each
# from this many characters before the part it scores: several times faster than the one stream
# of `charlm perplexity`, whose exact score it matches to within 0.1% (see the README).
VALIDATION_STREAMS = 16
VALIDATION_OVERLAP = 200


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


def _choose_run_dir(corpus_path: str, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        if (path / ckpt.LATEST).exists():
            raise CharlmError(
                f"{path} already holds a run; continue it with --resume or choose another --run-dir"
            )
    else:
        base = Path("runs") / (Path(corpus_path).stem or "corpus")
        path, n = base, 2
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _resume_config(loaded: ckpt.Checkpoint, overrides: dict[str, Any]) -> TrainConfig:
    saved = TrainConfig(**loaded.meta["train"])
    if overrides.get("precision") == "auto":
        overrides = {name: value for name, value in overrides.items() if name != "precision"}
    for name, value in overrides.items():
        if name not in RESUMABLE and getattr(saved, name) != value:
            raise CharlmError(
                f"--{name.replace('_', '-')} cannot change when resuming (the run has "
                f"{getattr(saved, name)!r}); start a new run to change it"
            )
    if any(name in overrides for name in LENGTH):
        cleared: dict[str, Any] = dict.fromkeys(LENGTH)
        saved = dataclasses.replace(saved, **cleared)
    return dataclasses.replace(saved, **overrides)


def _corpus_meta(corpus: Corpus, encoding: str | None) -> dict[str, Any]:
    return {
        "path": str(Path(corpus.path).resolve()),
        "sha256": corpus.sha256,
        "encoding": encoding,
        "characters": len(corpus.tokens),
        "val_fraction": corpus.val_fraction,
        "split_index": corpus.split_index,
    }


def _open_run(
    corpus: str | None,
    config: TrainConfig | None,
    run_dir: str | Path | None,
    resume: bool,
    overrides: dict[str, Any],
    progress: bool,
) -> tuple[TrainConfig, Corpus, Path, ckpt.Checkpoint | None]:
    """The run's config, corpus and directory, and its latest checkpoint when resuming."""
    if corpus is not None:
        corpus = resolve_corpus(corpus, progress=progress)
    if not resume:
        if corpus is None:
            raise CharlmError("give a text file to train on: charlm train FILE")
        config = dataclasses.replace(config or TrainConfig(), **overrides)
        config.validate()
        data = load_corpus(corpus, encoding=config.encoding, val_fraction=config.val_fraction)
        return config, data, _choose_run_dir(data.path, run_dir), None
    if config is not None:
        overrides = {**dataclasses.asdict(config), **overrides}
    run_path = ckpt.resolve(run_dir).parent
    loaded = ckpt.load(run_path / ckpt.LATEST)
    config = _resume_config(loaded, overrides)
    config.validate()
    corpus_meta = loaded.meta["corpus"]
    corpus = corpus or corpus_meta["path"]
    data = load_corpus(
        corpus,
        encoding=config.encoding,
        val_fraction=config.val_fraction,
        vocab=Vocabulary(loaded.meta["vocab"]),
    )
    if data.sha256 != corpus_meta["sha256"]:
        raise CharlmError(
            f"{corpus} is not the text this run was trained on (sha256 differs); "
            "resume with the original file or start a new run"
        )
    return config, data, run_path, loaded


def _loss_problem(losses: np.ndarray, vocab_size: int) -> tuple[int, str] | None:
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


def _show(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def train(
    corpus: str | None = None,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train a model on `corpus` (a text file, or the name of a catalog corpus, fetched if it
    is not here yet), or continue a run with `resume=True`.

    Options are the fields of TrainConfig, given as `config` or as keyword overrides. A new run
    goes to `run_dir` (default runs/<corpus name>, numbered if taken); `resume` continues the
    run in `run_dir`, or the working directory's latest run, from its latest checkpoint.
    Raises CharlmError for bad input and TrainingDiverged when the loss goes bad.
    """
    started = time.monotonic()
    config, data, run_path, loaded = _open_run(corpus, config, run_dir, resume, overrides, progress)
    precision_note = f"in {config.precision}"
    if config.precision == "auto":
        precision, why = hardware.auto_precision(jax.devices()[0])
        config = dataclasses.replace(config, precision=precision)
        precision_note = f"in {precision} (auto: {why})"
    stream = BatchStream(data.train_tokens, config.batch_size, config.seq_len)
    run_path.mkdir(parents=True, exist_ok=True)
    leftovers = remove_leftovers([run_path / ckpt.LATEST, run_path / ckpt.BEST])
    # A run limited only by time sets its length from its speed, re-estimated at every
    # evaluation of its first session, so that the learning rate has decayed when the time is
    # up. The decay horizon is fixed once a run starts: a resumed run keeps it.
    by_time = config.time_budget is not None and config.steps is None and config.epochs is None
    total = config.steps or math.ceil((config.epochs or DEFAULT_EPOCHS) * stream.steps_per_epoch)
    if by_time:
        total = sys.maxsize
    if loaded is not None:
        decay_steps = loaded.meta["decay_steps"]
    else:
        decay_steps = config.decay_steps or (10 * stream.steps_per_epoch if by_time else total)
    refit_decay = by_time and loaded is None and config.decay_steps is None

    model_config = config.model_config(len(data.vocab))
    optimizer = make_optimizer(config)
    train_step = make_train_step(model_config, optimizer)
    probe_loss = jax.jit(partial(sequence_loss, config=model_config))
    state = init_state(model_config, optimizer, config.batch_size, config.seed)
    best_val = None
    if loaded is not None:
        for group in ("params", "opt_state", "carry"):
            state[group] = jax.device_put(loaded.tree(group, state[group]))
        state["step"] = jnp.asarray(loaded.meta["step"], jnp.int32)
        state["rng"] = jax.random.wrap_key_data(jnp.asarray(loaded.arrays["rng"]))
        best_val = loaded.meta.get("best_val_loss")
    step = start_step = int(state["step"])
    saved_step = step if loaded else None
    train_loss = val_loss = None
    chars_per_sec = 0.0
    eval_seconds = 0.0  # the last evaluation's duration, kept free at the end of a time budget
    stop = "done"

    # Two losses that a model must beat to have learnt anything, shown beside each validation
    # loss: a uniform guess, and the training text's character frequencies.
    baselines = ""
    if data.val_tokens.size > 1:
        unigram = unigram_nats(data.train_tokens, data.val_tokens[1:], len(data.vocab))
        baselines = f"; unigram {unigram:.3f}, uniform {math.log(len(data.vocab)):.3f}"

    def log(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stderr)

    n_params = sum(p.size for p in jax.tree.leaves(state["params"]))
    log(
        f"{'resuming' if loaded else 'training'} {model_config.describe()} "
        f"({n_params:,} parameters) {precision_note} on {data.path} at "
        f"step {step}: "
        f"{len(data.train_tokens):,} characters, {len(data.val_tokens):,} held out, "
        f"vocabulary {len(data.vocab):,}; run directory {run_path}"
    )

    for leftover in leftovers:
        log(f"removed {leftover.name}, a checkpoint left half-written when a run here crashed")

    def save(is_best: bool) -> None:
        """Write latest.ckpt (and best.ckpt) atomically, once one forward pass on the next batch
        has shown that these exact parameters are sane."""
        nonlocal saved_step
        inputs, targets, reset = stream.batch(step)
        carry = model.initial_state(model_config, config.batch_size) if reset else state["carry"]
        loss = probe_loss(state["params"], inputs, targets, carry)[0]
        stop_if_diverged("training", np.array([float(loss)]), step)
        arrays = jax.device_get({g: state[g] for g in ("params", "opt_state", "carry")})
        arrays["rng"] = np.asarray(jax.random.key_data(state["rng"]))
        meta = {
            "charlm_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_config.to_dict(),
            "vocab": data.vocab.chars,
            "train": dataclasses.asdict(config),
            "step": step,
            "decay_steps": decay_steps,
            "epoch": step / stream.steps_per_epoch,
            "data_position": {
                "steps_per_epoch": stream.steps_per_epoch,
                "stream_offset": (step % stream.steps_per_epoch) * config.seq_len,
            },
            "corpus": _corpus_meta(data, config.encoding),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": best_val,
        }
        blob = ckpt.encode(meta, arrays)
        ckpt.write_atomic(run_path / ckpt.LATEST, blob)
        if is_best:
            ckpt.write_atomic(run_path / ckpt.BEST, blob)
        ckpt.remember_run(run_path)
        saved_step = step

    pending: list[jax.Array] = []
    window_start = time.monotonic()

    def stop_if_diverged(kind: str, losses: np.ndarray, first_step: int) -> None:
        problem = _loss_problem(losses, len(data.vocab))
        if problem is None:
            return
        index, what = problem
        kept = (
            f"the last good checkpoint (step {saved_step}) is kept in {run_path}"
            if saved_step is not None
            else "no checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"{kind} loss {what} at step {first_step + index}; training stopped and {kept}; "
            "lower --lr or --clip-norm and try again"
        )

    def fetch_losses() -> None:
        """Bring the losses since the last fetch to the host (the loop's only sync point).
        The loss labelled step s is computed on the parameters after s updates."""
        nonlocal pending, train_loss, chars_per_sec, window_start
        if not pending:
            return
        losses = np.asarray(jax.device_get(pending), np.float64)
        stop_if_diverged("training", losses, step - len(pending))
        now = time.monotonic()
        chars_per_sec = len(pending) * config.batch_size * config.seq_len / (now - window_start)
        window_start = now
        train_loss = float(losses.mean())
        pending = []

    def evaluate_and_save() -> None:
        nonlocal val_loss, best_val, window_start, decay_steps, eval_seconds
        fetch_losses()
        eval_start = time.monotonic()
        record: dict[str, Any] = {"step": step, "epoch": round(step / stream.steps_per_epoch, 4)}
        is_best = not data.val_tokens.size
        if data.val_tokens.size:
            nats, count = total_nats(
                state["params"],
                model_config,
                data.val_tokens,
                streams=VALIDATION_STREAMS,
                overlap=VALIDATION_OVERLAP,
            )
            # The checkpoint about to be written holds exactly these parameters: vouch for them.
            stop_if_diverged("validation", np.array([nats / count]), step)
            val_loss = nats / count
            is_best = best_val is None or val_loss < best_val
            best_val = val_loss if is_best else best_val
            record.update(val_loss=val_loss, val_bpc=val_loss / math.log(2))
            show_progress()
            log(
                f"step {step}: train loss {_show(train_loss)}, val loss {val_loss:.4f} "
                f"({val_loss / math.log(2):.3f} bits/char{baselines})"
                f"{' *best*' if is_best else ''}"
            )
        now = time.monotonic()
        elapsed, eval_seconds = now - started, now - eval_start
        if refit_decay and step > start_step:
            assert config.time_budget is not None  # refit_decay means a run limited by time
            per_step = elapsed / (step - start_step)
            remaining = config.time_budget - elapsed - eval_seconds
            decay_steps = step + max(int(remaining / per_step), 1)
            bar.total = decay_steps
        record.update(
            train_loss=train_loss,
            lr=learning_rate(step, config, decay_steps),
            chars_per_sec=round(chars_per_sec),
            elapsed=round(elapsed, 2),
        )
        save(is_best)
        with open(run_path / ckpt.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        window_start = time.monotonic()

    def show_progress() -> None:
        postfix = {"loss": _show(train_loss), "chars/s": f"{chars_per_sec:,.0f}"}
        if val_loss is not None:
            postfix["val"] = _show(val_loss)
        bar.set_postfix(postfix, refresh=False)

    bar = tqdm(
        total=decay_steps if by_time else total,
        initial=step,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        with _stop_on_interrupt() as interrupted:
            while step < total:
                if interrupted.is_set():
                    stop = "interrupted"
                    break
                elapsed = time.monotonic() - started
                if config.time_budget and elapsed + eval_seconds > config.time_budget:
                    stop = "time budget"
                    break
                inputs, targets, reset = stream.batch(step)
                lr = np.float32(learning_rate(step, config, decay_steps))
                state, loss = train_step(state, inputs, targets, reset, lr)
                step += 1
                pending.append(loss)
                bar.update(1)
                if step % config.log_every == 0:
                    fetch_losses()
                if step % config.eval_every == 0:
                    evaluate_and_save()
                if step % config.log_every == 0 or step % config.eval_every == 0:
                    show_progress()
            if stop == "interrupted":
                fetch_losses()
                save(is_best=False)
            elif saved_step != step:
                evaluate_and_save()
                show_progress()
    finally:
        bar.close()
    if stop == "interrupted":
        log(
            f"interrupted at step {step}; saved {run_path / ckpt.LATEST}. "
            f"Resume with: charlm train --resume --run-dir {run_path}"
        )
    else:
        log(f"stopped at step {step} ({stop}); checkpoints in {run_path}")
    return TrainResult(run_path, step, train_loss, val_loss, best_val, stop)
