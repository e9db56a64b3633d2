"""Benchmark: charlm learns 8-bit binary addition.

Generates the `addition` corpus (8-bit operands, least-significant bit first), trains a
one-layer LSTM on it in rounds, and after each round completes `a+b=` greedily for 1,000 pairs
of 8-bit operands that are not in the training text (charlm.inference.addition_score.accuracy), counting the
exact sums. It stops at the target (99%) or when the time limit is reached, then scores 1,000
pairs of 12-bit operands, a width the model never saw. The result, with the machine, the date
and the commit, is written to benchmarks/RESULTS-addition.md.

    python benchmarks/addition.py            # about 5 minutes on 2 CPU cores

The training time counts the training calls only (compilation and their validation passes
included); the accuracy measurements between rounds are timed apart.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import tempfile
import time
from pathlib import Path

import charlm
from charlm.checkpoints import file_format as ckpt
from charlm.data import addition
from charlm.devices import hardware
from charlm.inference import addition_score

REPO = Path(__file__).resolve().parents[1]

# The recipe of charlm.data.addition, with the schedule the recorded result was measured with.
MODEL = addition.MODEL
TRAINING = dict(addition.TRAINING, min_lr=1e-4, warmup_steps=100)


def commit() -> str:
    """The commit of the code that ran, marked when the working tree differs from it."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head or 'unknown'}{' with uncommitted changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50000, help="training lines")
    parser.add_argument("--round-steps", type=int, default=2000, help="steps between measurements")
    parser.add_argument("--max-steps", type=int, default=50000, help="the schedule's length")
    parser.add_argument("--target", type=float, default=0.99, help="exact sums to reach")
    parser.add_argument("--time-limit", type=float, default=13 * 60, help="seconds of training")
    parser.add_argument("--pairs", type=int, default=1000, help="unseen pairs per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS-addition.md")
    args = parser.parse_args()

    code = commit()
    load_before = os.getloadavg()[0]
    begun = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="charlm-addition-"))
    os.chdir(work)  # the run directory and the last-run file stay out of the repository
    text = addition.corpus_text(lines=args.lines, bits=8, seed=0)
    corpus = work / "addition.txt"
    corpus.write_text(text, encoding="utf-8")
    run_dir = work / "run"
    latest = run_dir / ckpt.LATEST

    curve: list[tuple[int, float, float, float]] = []  # step, training seconds, loss, accuracy
    trained = 0.0
    step = 0
    score = None
    while step < args.max_steps and trained < args.time_limit:
        step = min(step + args.round_steps, args.max_steps)
        started = time.monotonic()
        if step <= args.round_steps:
            options = dict(MODEL, **TRAINING, decay_steps=args.max_steps)
            result = charlm.train(
                str(corpus),
                run_dir=run_dir,
                steps=step,
                eval_every=args.round_steps,
                progress=False,
                **options,
            )
        else:
            result = charlm.train(resume=True, run_dir=run_dir, steps=step, progress=False)
        trained += time.monotonic() - started
        score = addition_score.accuracy(latest, pairs=args.pairs, bits=8, seed=1, exclude=text)
        curve.append((step, trained, result.val_loss, score.fraction))
        print(
            f"step {step:5d}  {trained:6.1f} s  val loss {result.val_loss:.4f}  "
            f"exact 8-bit sums {score.correct}/{score.pairs} = {score.fraction:.1%}",
            flush=True,
        )
        if score.fraction >= args.target:
            break
    wide = addition_score.accuracy(latest, pairs=args.pairs, bits=12, seed=2, exclude=text)
    print(f"12-bit operands, never seen: {wide.correct}/{wide.pairs} = {wide.fraction:.1%}")

    load_after = os.getloadavg()[0]
    reached = score is not None and score.fraction >= args.target
    rows = "\n".join(f"| {s:,} | {t:.0f} | {loss:.4f} | {acc:.1%} |" for s, t, loss, acc in curve)
    # The answer is the next bits + 1 characters, whatever they are; ⏎ shows a newline.
    mistakes = "\n".join(
        f"    {q}  expected {e}  got {g.replace(chr(10), '⏎')}" for q, e, g in wide.mistakes[:3]
    )
    # Every training sum has 9 digits: does the model end its 12-bit sums there too?
    nine = sum(answer[9:10] == "\n" for answer in wide.answers)
    report = f"""# Binary addition: results

`python benchmarks/addition.py` ({datetime.date.today().isoformat()}, commit {code}),
on {hardware.describe_cpu()}, nproc {len(os.sched_getaffinity(0))}; JAX on CPU. Load average (1 min) {load_before:.2f} at the start and
{load_after:.2f} at the end: the machine was shared, so other work may have slowed the run.
The whole benchmark took {(time.monotonic() - begun) / 60:.1f} min.

Corpus: `addition`, {args.lines:,} lines of 8-bit operands (seed 0), least-significant bit
first. Model: one-layer {MODEL["cell"].upper()}, {MODEL["hidden_size"]} units, embedding {MODEL["embed_size"]};
batch {TRAINING["batch_size"]} × {TRAINING["seq_len"]} characters, AdamW at {TRAINING["lr"]:g}
with warm-up and cosine decay over {args.max_steps:,} steps. After every {args.round_steps}
steps, `a+b=` is completed greedily for {args.pairs:,} pairs of 8-bit operands that are not in
the training text, each read after a newline and one training line (as every line is read in
training), and the exact sums are counted.

| result | |
| --- | --- |
| exact 8-bit sums on {score.pairs:,} unseen pairs | **{score.fraction:.1%}** ({score.correct:,}){"" if reached else f", short of the {args.target:.0%} target"} |
| steps | {step:,} |
| training time | **{trained:.0f} s** ({trained / 60:.1f} min) |
| exact 12-bit sums on {wide.pairs:,} pairs (a width never seen) | **{wide.fraction:.1%}** ({wide.correct:,}) |

Learning curve (training seconds are cumulative; the validation loss is on the last 2% of the
corpus):

| step | training s | val loss (nats/char) | exact 8-bit sums |
| --- | --- | --- | --- |
{rows}

Operands of 12 bits: {nine:,} of the {wide.pairs:,} answers end the line after 9 digits, the
width of every sum in the training text. Three of the mistakes:

{mistakes}
"""
    args.out.write_text(report, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
