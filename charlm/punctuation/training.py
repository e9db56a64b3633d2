"""Training a punctuation tagger: `train_tagger`, the loop that `charlm punctuate train` runs.

It behaves as a language model's training (`charlm.training.loop`) does, and reuses its pieces: run
directories (`charlm.training.run_setup`), the schedule, horizon and optimizer (`charlm.lm.step`), the
progress bar, losses and metrics file (`charlm.training.progress`), the divergence check
(`charlm.training.checkpointer.loss_problem`), checkpoint files (`charlm.checkpoints.file_format`) and Ctrl-C. What
differs is the data: random windows of the stripped text (`charlm.punctuation.tagger.window_batch`), so
the state is only parameters, optimizer state and step, and a resumed run continues bit for
bit; and the evaluation, which tags the held-out split as `charlm punctuate` tags a text and
reports its sentence-break F1 beside the loss.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charlm import __version__
from charlm.checkpoints import file_format as ckpt
from charlm.checkpoints import schema as checkpoint_meta
from charlm.data.catalog import resolve_corpus
from charlm.data.text import Vocabulary, code_points
from charlm.errors import CharlmError
from charlm.lm.checkpoint import load_model
from charlm.punctuation import model as tagger
from charlm.punctuation.config import TaggerTrainConfig
from charlm.punctuation.marks import MarkSet
from charlm.punctuation.scores import score_labels
from charlm.punctuation.tagger import (
    TaggingData,
    load_tagging_data,
    log_softmax,
    steps_per_epoch,
    tag_logits,
    window_batch,
)
from charlm.storage import remove_leftovers
from charlm.training.checkpointer import TrainingDiverged, loss_problem
from charlm.training.loop import TrainResult, _stop_on_interrupt
from charlm.training.progress import Progress, RecentLosses, append_metrics, show_loss
from charlm.training.run_setup import (
    _choose_run_dir,
    _notes,
    _resume_config,
    check_same_text,
    corpus_meta,
    load_run,
    resolve_precision,
)
from charlm.training.schedule import Horizon, learning_rate, make_optimizer

# Dropout's keys come from the run's seed folded with this, apart from the initialisation's.
DROPOUT_STREAM = 1


@dataclass(frozen=True)
class TaggerSession:
    """What a tagger's training session works on, as `charlm.training.run_setup.Session` for a language
    model: the options (precision resolved), the data, the run directory, the checkpoint
    resumed or None, and a note on the precision."""

    config: TaggerTrainConfig
    data: TaggingData
    run_path: Path
    loaded: ckpt.Checkpoint | None
    precision_note: str


def open_tagger_session(
    corpus: str | None,
    run_dir: str | Path | None,
    resume: bool,
    overrides: dict[str, Any],
    progress: bool,
) -> TaggerSession:
    """A new run on `corpus`, or with `resume` the run in `run_dir` (or the latest tagger run
    here), whose corpus must be unchanged."""
    if corpus is not None:
        corpus = resolve_corpus(corpus, progress=progress)
    loaded = None
    if resume:
        run_path, loaded = load_run(run_dir, checkpoint_meta.TAGGER)
        config = _resume_config(TaggerTrainConfig(**loaded.meta["train"]), overrides)
        corpus = corpus or loaded.meta["corpus"]["path"]
    else:
        if corpus is None:
            raise CharlmError("give a punctuated text to train on: charlm punctuate train FILE")
        config = dataclasses.replace(TaggerTrainConfig(), **overrides)
    config.validate()
    data = load_tagging_data(
        corpus,
        encoding=config.encoding,
        val_fraction=config.val_fraction,
        max_labels=config.max_labels,
        marks=MarkSet.from_dict(loaded.meta["marks"]) if loaded else None,
        vocab=Vocabulary(loaded.meta["vocab"]) if loaded else None,
        progress=progress,
        log=_notes(progress),
    )
    if loaded is not None:
        check_same_text(corpus, data.corpus.sha256, loaded)
    if loaded is None:
        run_path = _choose_run_dir(data.corpus.path, run_dir, "-punctuate")
    config, note = resolve_precision(config)
    return TaggerSession(config, data, run_path, loaded, note)


def initialised_from(
    params: tagger.Params, config: tagger.TaggerConfig, vocab: Vocabulary, checkpoint: str
) -> tuple[tagger.Params, str]:
    """`params` with the forward direction's first layer and the embedding rows of the
    characters the two vocabularies share taken from the language model of `checkpoint`
    (a language model as the pretraining of a recurrent network, Dai & Le 2015, "Semi-supervised
    Sequence Learning"); and a note saying how many rows were. Refused in one line when the cell or the
    sizes differ."""
    lm_params, lm_config, lm_vocab = load_model(ckpt.load(ckpt.resolve(checkpoint)))
    ours = (config.cell, config.hidden_size, config.embed_size)
    theirs = (lm_config.cell, lm_config.hidden_size, lm_config.embed_size)
    if ours != theirs:
        raise CharlmError(
            f"--init-from {checkpoint} is a {lm_config.cell} of hidden size "
            f"{lm_config.hidden_size} and embedding size {lm_config.embed_size}; the tagger "
            f"is a {config.cell} of {config.hidden_size} and {config.embed_size}: give it the "
            "same --cell, --hidden-size and --embed-size"
        )
    table = code_points(lm_vocab.chars)
    points = code_points(vocab.chars)
    index = np.minimum(np.searchsorted(table, points), len(table) - 1)
    shared = table[index] == points
    embed = np.array(params["embed"])
    embed[shared] = lm_params["embed"][index[shared]]
    layers = list(params["layers"])
    layers[0] = {**layers[0], "forward": dict(lm_params["layers"][0])}
    note = (
        f"initialised the forward direction's first layer and {int(shared.sum()):,} of "
        f"{len(vocab):,} embedding rows from {checkpoint}"
    )
    return {**params, "embed": jnp.asarray(embed), "layers": layers}, note


def make_step(config: tagger.TaggerConfig, optimizer: optax.GradientTransformation, seed: int):
    """The compiled step: (state, tokens, labels, lr) -> (state, loss), as
    `charlm.lm.step.make_train_step` for a language model; the state's buffers are donated. Its
    dropout masks are drawn from `seed` and the step number, so a resumed run draws the same."""
    dropout_key = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)

    @partial(jax.jit, donate_argnums=0)
    def step(state, tokens, labels, lr):
        key = jax.random.fold_in(dropout_key, state["step"])
        masks = tagger.training_masks(key, config, tokens.shape[0])
        loss, grads = jax.value_and_grad(tagger.loss)(
            state["params"], tokens, labels, config, masks=masks
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    return step


def evaluate(
    params: tagger.Params, config: tagger.TaggerConfig, data: TaggingData, window: int
) -> tuple[float, float]:
    """The held-out split's mean cross-entropy in nats per character and its break F1, tagged
    as `charlm punctuate` tags a text."""
    logits = tag_logits(params, config, data.val_tokens, window)
    nats = -log_softmax(logits)[np.arange(len(logits)), data.val_labels]
    breaks, _ = score_labels(data.val_labels, logits.argmax(axis=-1), data.marks.label_strings)
    return float(nats.mean()), breaks.f1


def train_tagger(
    corpus: str | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train a punctuation tagger on the punctuated text `corpus` (a file or a catalog name),
    or continue a run with `resume=True`. Options are the fields of TaggerTrainConfig; the run
    directory defaults to runs/<corpus name>-punctuate. Raises CharlmError for bad input (a
    text without marks among them) and TrainingDiverged when the loss goes bad."""
    started = time.monotonic()
    session = open_tagger_session(corpus, run_dir, resume, overrides, progress)
    config, data, loaded, run_path = session.config, session.data, session.loaded, session.run_path
    run_path.mkdir(parents=True, exist_ok=True)
    leftovers = remove_leftovers([run_path / ckpt.LATEST, run_path / ckpt.BEST])
    model_config = config.tagger_config(len(data.vocab), data.marks.num_labels)
    per_epoch = steps_per_epoch(len(data.train_tokens), config.batch_size, config.seq_len)
    horizon = Horizon.plan(config, per_epoch, loaded.meta["decay_steps"] if loaded else None)
    optimizer = make_optimizer(config)
    params = tagger.init(jax.random.key(config.seed), model_config)
    init_note = None
    if config.init_from is not None and loaded is None:
        params, init_note = initialised_from(params, model_config, data.vocab, config.init_from)
    state: dict[str, Any] = {"params": params, "opt_state": optimizer.init(params)}
    if loaded is not None:
        state = {group: loaded.tree(group, tree) for group, tree in state.items()}
    state["step"] = jnp.asarray(loaded.meta["step"] if loaded else 0, jnp.int32)
    step = start_step = int(state["step"])
    train_step = make_step(model_config, optimizer, config.seed)
    losses = RecentLosses(config.batch_size * config.seq_len)
    val_loss: float | None = loaded.meta["val_loss"] if loaded else None
    val_f1: float | None = loaded.meta["val_break_f1"] if loaded else None
    best_f1: float | None = loaded.meta["best_val_break_f1"] if loaded else None
    saved_step: int | None = loaded.meta["step"] if loaded else None
    eval_seconds = 0.0
    by_time = horizon.total == Horizon.UNBOUNDED
    bar = Progress(progress, horizon.decay_steps if by_time else horizon.total, step)
    n_params = sum(p.size for p in jax.tree.leaves(state["params"]))
    bar.log(
        f"{'resuming' if loaded else 'training'} tagger {model_config.describe()} "
        f"({n_params:,} parameters, {data.marks.num_labels} labels) {session.precision_note} "
        f"on {data.corpus.path} at step {step}: {len(data.train_tokens):,} characters, "
        f"{len(data.val_tokens):,} held out (marks removed), vocabulary {len(data.vocab):,}; "
        f"run directory {run_path}"
    )
    for note in [init_note] + [
        f"removed {p.name}, a checkpoint left half-written" for p in leftovers
    ]:
        if note:
            bar.log(note)

    def check(kind: str, values: np.ndarray, first_step: int) -> None:
        problem = loss_problem(values, data.marks.num_labels)
        if problem is not None:
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

    def save(is_best: bool) -> None:
        nonlocal saved_step
        meta = {
            "kind": checkpoint_meta.TAGGER,
            "charlm_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tagger": model_config.to_dict(),
            "marks": data.marks.to_dict(),
            "vocab": data.vocab.chars,
            "train": dataclasses.asdict(config),
            "step": step,
            "decay_steps": horizon.decay_steps,
            "epoch": step / per_epoch,
            "corpus": corpus_meta(data.corpus, config.encoding),
            "train_loss": losses.mean,
            "val_loss": val_loss,
            "val_break_f1": val_f1,
            "best_val_break_f1": best_f1,
        }
        blob = ckpt.encode(meta, {g: state[g] for g in ("params", "opt_state")})
        ckpt.write_atomic(run_path / ckpt.LATEST, blob)
        if is_best:
            ckpt.write_atomic(run_path / ckpt.BEST, blob)
        ckpt.remember_run(run_path, checkpoint_meta.TAGGER)
        saved_step = step

    def fetch() -> None:
        values = losses.fetch()
        check("training", values, step - len(values))

    def evaluate_and_save() -> None:
        nonlocal val_loss, val_f1, best_f1, eval_seconds
        fetch()
        eval_start = time.monotonic()
        record: dict[str, Any] = {"step": step, "epoch": round(step / per_epoch, 4)}
        if len(data.val_tokens):
            val_loss, val_f1 = evaluate(state["params"], model_config, data, config.seq_len)
            check("validation", np.array([val_loss]), step)
            # The best tagger is the one that breaks sentences best: its held-out loss rises
            # long before its F1 stops rising, as it grows confident where it is wrong.
            is_best = best_f1 is None or val_f1 > best_f1
            best_f1 = val_f1 if is_best else best_f1
            record.update(val_loss=val_loss, val_break_f1=val_f1)
            bar.log(
                f"step {step}: train loss {show_loss(losses.mean)}, val loss {val_loss:.4f}, "
                f"break F1 {val_f1:.3f}{' *best*' if is_best else ''}"
            )
        else:
            is_best = True
        now = time.monotonic()
        elapsed, eval_seconds = now - started, now - eval_start
        if config.time_budget is not None:
            horizon.refit(step, step - start_step, elapsed, config.time_budget - eval_seconds)
            if horizon.refits:
                bar.set_total(horizon.decay_steps)
        record.update(
            train_loss=losses.mean,
            lr=learning_rate(step, config, horizon.decay_steps),
            chars_per_sec=round(losses.chars_per_sec),
            elapsed=round(elapsed, 2),
        )
        save(is_best)
        append_metrics(run_path, record)
        losses.restart_clock()

    stop = "done"
    try:
        with _stop_on_interrupt() as interrupted:
            while step < horizon.total:
                if interrupted.is_set():
                    stop = "interrupted"
                    break
                spent = time.monotonic() - started + eval_seconds
                if config.time_budget and spent > config.time_budget:
                    stop = "time budget"
                    break
                tokens, labels = window_batch(
                    data.train_tokens,
                    data.train_labels,
                    config.batch_size,
                    config.seq_len,
                    config.seed,
                    step,
                )
                lr = np.float32(learning_rate(step, config, horizon.decay_steps))
                state, loss = train_step(state, tokens, labels, lr)
                step += 1
                losses.add(loss)
                bar.advance()
                if step % config.log_every == 0:
                    fetch()
                if step % config.eval_every == 0:
                    evaluate_and_save()
                if step % config.log_every == 0 or step % config.eval_every == 0:
                    bar.show(losses.mean, losses.chars_per_sec, val_loss)
            if stop == "interrupted":
                fetch()
                save(is_best=False)
            elif saved_step != step:
                evaluate_and_save()
    finally:
        bar.close()
    if stop == "interrupted":
        bar.log(
            f"interrupted at step {step}; saved {run_path / ckpt.LATEST}. Resume with: "
            f"charlm punctuate train --resume --run-dir {run_path}"
        )
    else:
        bar.log(f"stopped at step {step} ({stop}); checkpoints in {run_path}")
    return TrainResult(run_path, step, losses.mean, val_loss, None, stop)
