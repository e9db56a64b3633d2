"""charlm's defaults against a small GPT trained for the same wall time: held-out nats/char.

    pip install ".[bench]"                  # PyTorch CPU build (torch==2.13.0 on these machines)
    python benchmarks/quality.py            # both corpora, about 30 minutes; RESULTS-quality.md
    python benchmarks/quality.py --corpus tinyshakespeare --budget 60
    python benchmarks/quality.py --quick    # 20 s budgets; writes RESULTS-quality-quick.md
    python benchmarks/quality.py --keep runs/quality   # keep charlm's runs to sample from

For each corpus, one after the other on the same machine: the reference, a decoder-only GPT
(Radford et al. 2018, 2019; Vaswani et al. 2017) in the shape of nanoGPT's CPU recipe for
shakespeare_char, trains for the budget; then `charlm train CORPUS --time-budget` runs with
charlm's defaults. Both are scored on the same held-out split, the last 10% of the characters
(charlm's cut, int(n·0.9) code points), in nats per predicted character. Three baselines
computed from the training split alone frame the numbers: uniform, add-one unigram, and xz.

The reference's budget counts its training iterations only; its one evaluation, at the end,
is timed apart. charlm's budget is its own `--time-budget`, which includes compiling and the
validation passes it makes; its wall time is the `charlm train` process's, as
measured here. The reference runs with glibc's default malloc, as a PyTorch script does, and
on os.cpu_count() threads: run this on an otherwise idle machine, as PyTorch's threads slow
several-fold when other processes share the cores (the load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import lzma
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from charlm.checkpoints import file_format as ckpt
from charlm.data.corpus import Corpus, load_corpus
from charlm.data.text import read_text
from charlm.devices import hardware
from charlm.lm.evaluation import unigram_nats

ROOT = Path(__file__).resolve().parents[1]
CORPORA_DIR = ROOT.parent / "shared" / "corpora"
CORPORA = {"sanguo": 600.0, "tinyshakespeare": 180.0}  # name: default budget in seconds
QUICK_BUDGET = 20.0
CHARLM = [sys.executable, "-m", "charlm"]

# The reference's training recipe: nanoGPT's shakespeare_char settings for a CPU.
BATCH = 12
LR, MIN_LR = 1e-3, 1e-4
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
CLIP_NORM = 1.0
WARMUP_ITERS = 100
ESTIMATE_EVERY = 50  # iterations between estimates of how many fit in the budget
SEED = 1337
EVAL_BATCH = 64  # windows per forward pass when scoring


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(QKᵀ/√d_k)·V per head (Vaswani et al.
    2017, §3.2), masked so that each position attends to itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        heads = (
            t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """A transformer decoder block with LayerNorm before each sublayer, as GPT-2 moved it
    (Radford et al. 2019, §2.3), and a 4×-wide GELU feed-forward layer (Radford et al. 2018)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and learned position embeddings, the blocks, a final LayerNorm, and a head that
    shares the token embedding's weights (Press & Wolf 2017). Weights start at N(0, 0.02²) and
    the projections into the residual stream at N(0, 0.02²/2L), as in GPT-2; biases at zero."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.n_layer)))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for the next character after each position."""
        positions = torch.arange(tokens.shape[1])
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        return self.head(self.ln_f(self.blocks(x)))


def learning_rate(iteration: int, horizon: int) -> float:
    """Linear warm-up to LR over WARMUP_ITERS, then cosine decay (Loshchilov & Hutter 2017) to
    MIN_LR at `horizon`, the iterations expected to fit in the budget; constant after."""
    if iteration < WARMUP_ITERS:
        return LR * (iteration + 1) / WARMUP_ITERS
    progress = min((iteration - WARMUP_ITERS) / max(horizon - WARMUP_ITERS, 1), 1.0)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)


@dataclass
class Trained:
    """The reference after its budget, with its per-iteration training losses."""

    model: GPT
    iterations: int
    horizon: int  # the last estimate of the iterations in the budget
    seconds: float
    losses: list[float]


def train_reference(tokens: np.ndarray, config: GPTConfig, budget: float) -> Trained:
    """AdamW (Loshchilov & Hutter 2019) on random windows of the training text for `budget`
    seconds; weight decay on matrices only, gradients clipped to norm CLIP_NORM. The cosine
    decay's horizon is fitted to the time: every ESTIMATE_EVERY iterations it becomes the
    iterations the budget holds at the speed so far, so the rate has decayed when time is up."""
    torch.manual_seed(SEED)
    model = GPT(config)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": others}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    data = torch.from_numpy(tokens.astype(np.int64))
    offsets = torch.arange(config.block_size + 1)
    horizon = WARMUP_ITERS  # replaced at iteration ESTIMATE_EVERY, still within the warm-up
    losses: list[float] = []
    iteration = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        if iteration and iteration % ESTIMATE_EVERY == 0:
            horizon = int(iteration * budget / elapsed)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration, horizon)
        starts = torch.randint(len(data) - config.block_size, (BATCH, 1), generator=generator)
        window = data[starts + offsets]
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        losses.append(loss.item())
        iteration += 1
        if iteration % 500 == 0:
            print(f"  reference iteration {iteration}: loss {np.mean(losses[-50:]):.4f}")
    return Trained(model, iteration, horizon, elapsed, losses)


@torch.inference_mode()
def reference_nats(model: GPT, tokens: np.ndarray, block_size: int) -> tuple[float, int]:
    """Mean nats of predicting tokens[1:], read in consecutive windows of `block_size` inputs
    that do not overlap: each character is predicted from the ones before it in its window
    (1 to block_size of them), as a model with a fixed context scores a text in one pass."""
    model.eval()
    data = torch.from_numpy(tokens.astype(np.int64))
    count = len(data) - 1
    full = count // block_size * block_size
    inputs = data[:full].view(-1, block_size)
    targets = data[1 : full + 1].view(-1, block_size)
    pieces = [
        (inputs[i : i + EVAL_BATCH], targets[i : i + EVAL_BATCH])
        for i in range(0, len(inputs), EVAL_BATCH)
    ]
    if full < count:
        pieces.append((data[full:count][None], data[full + 1 :][None]))
    total = sum(
        F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        for x, y in pieces
    )
    return total / count, count


@dataclass
class Row:
    """One line of a results table; the columns after `nats` are empty for a baseline."""

    name: str
    nats: float
    steps: int | None = None
    characters: int | None = None
    seconds: float | None = None
    parameters: int | None = None


def baselines(corpus: Corpus, text: str) -> list[Row]:
    """Uniform over the vocabulary; characters drawn independently with the add-one smoothed
    (Laplace) frequencies of the training split, scored on the characters the models predict;
    and xz (LZMA, preset 9e), whose cost of the held-out text given the training text is
    xz(train + held-out) − xz(train) bytes of UTF-8, per held-out character."""
    train, held_out = corpus.train_tokens, corpus.val_tokens[1:]
    vocab = len(corpus.vocab)
    unigram = unigram_nats(train, held_out, vocab)
    preset = 9 | lzma.PRESET_EXTREME
    split = corpus.split_index
    both = len(lzma.compress(text.encode(), preset=preset))
    alone = len(lzma.compress(text[:split].encode(), preset=preset))
    xz_bits = (both - alone) * 8 / (len(text) - split)
    return [
        Row(f"uniform, ln {vocab:,}", math.log(vocab)),
        Row("unigram, add-one", unigram),
        Row("xz -9e, given the training text", xz_bits * math.log(2)),
    ]


def run_charlm(corpus: Path, budget: float, work: Path) -> tuple[Row, list[str], dict]:
    """`charlm train` with its defaults for `budget` seconds, then `charlm perplexity` on its
    best checkpoint; the row, the train command, and the last line of metrics.jsonl. The run
    directory is `work`/run, and the lines the run printed (its progress bar left out) go to
    `work`/train.log."""
    run_dir = work / "run"
    command = ["train", str(corpus), "--time-budget", f"{budget:g}s", "--run-dir", str(run_dir)]
    start = time.perf_counter()
    trained = subprocess.run(
        [*CHARLM, *command], cwd=work, check=True, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - start
    printed = trained.stderr.replace("\r", "\n").splitlines()
    lines = [line for line in printed if line.startswith(("training", "step", "stopped"))]
    (work / "train.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scored = subprocess.run(
        [*CHARLM, "perplexity", "--checkpoint", str(run_dir), "--json"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    )
    nats = json.loads(scored.stdout)["nats_per_char"]
    metrics = (run_dir / ckpt.METRICS).read_text(encoding="utf-8").splitlines()
    latest = ckpt.load(run_dir / ckpt.LATEST)
    train = latest.meta["train"]
    steps = latest.meta["step"]
    parameters = sum(a.size for name, a in latest.arrays.items() if name.startswith("params/"))
    characters = steps * train["batch_size"] * train["seq_len"]
    row = Row("charlm defaults", nats, steps, characters, seconds, parameters)
    last = {**json.loads(metrics[-1]), "precision": latest.meta["model"]["precision"]}
    return row, ["python", "-m", "charlm", *command], last


def commit() -> str:
    """HEAD's short hash, with +dirty when tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return (head.stdout.strip() or "unknown") + ("+dirty" if status.stdout.strip() else "")


def table(rows: list[Row]) -> list[str]:
    def cell(value: float | None, form: str, unit: str = "") -> str:
        return "—" if value is None else format(value, form) + unit

    lines = [
        "| model | nats/char | bits/char | steps | characters seen | training wall time "
        "| parameters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.nats:.4f} | {r.nats / math.log(2):.4f} | {cell(r.steps, ',')} "
            f"| {cell(r.characters, ',')} | {cell(r.seconds, '.1f', ' s')} "
            f"| {cell(r.parameters, ',')} |"
        )
    return lines


def benchmark(name: str, budget: float, keep: Path | None) -> list[str]:
    """Train and score both models on one corpus; its section of the results file. charlm's
    run directory and log are kept in `keep`/NAME when `keep` is given."""
    path = CORPORA_DIR / f"{name}.txt"
    corpus = load_corpus(path)
    text = read_text(path)
    rows = baselines(corpus, text)
    config = GPTConfig(vocab_size=len(corpus.vocab))
    print(f"{name}: reference for {budget:g} s", flush=True)
    trained = train_reference(corpus.train_tokens, config, budget)
    start = time.perf_counter()
    nats, count = reference_nats(trained.model, corpus.val_tokens, config.block_size)
    eval_seconds = time.perf_counter() - start
    seen = trained.iterations * BATCH * config.block_size
    parameters = sum(p.numel() for p in trained.model.parameters())
    reference = Row("GPT reference", nats, trained.iterations, seen, trained.seconds, parameters)
    print(f"{name}: charlm for {budget:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="charlm-quality-") as tmp:
        work = Path(tmp) if keep is None else keep / f"{name}-{budget:g}s"
        work.mkdir(parents=True, exist_ok=True)
        ours, command, last = run_charlm(path, budget, work)
        tmp = str(work)
    span = max(1, min(50, trained.iterations // 2))
    first, final = np.mean(trained.losses[:span]), np.mean(trained.losses[-span:])
    return [
        f"## {name}: {budget:g} s each",
        "",
        f"{len(corpus.train_tokens):,} training characters, {count:,} held-out characters "
        f"predicted, vocabulary {len(corpus.vocab):,}.",
        "",
        *table([reference, ours, *rows]),
        "",
        f"charlm's lead over the reference: **{reference.nats - ours.nats:+.4f} nats/char** "
        "(positive: charlm is better).",
        "",
        f"- charlm: `{shlex.join(command).replace(tmp, '$TMP')}`; wall time of the process, "
        f"compilation and validation passes included; step {last['step']:,} at "
        f"{last['elapsed']:.1f} s by its own clock, {last['chars_per_sec']:,} chars/s at the end; "
        f"trained in {last['precision']} (its `--precision auto` choice); scored on best.ckpt.",
        f"- GPT reference: {config.n_layer} layers, {config.n_head} heads, n_embd "
        f"{config.n_embd}, context {config.block_size}, batch {BATCH}; training loss "
        f"{first:.3f} over the first {span} iterations, {final:.3f} over the last {span}; cosine "
        f"horizon last estimated at {trained.horizon:,} iterations; the evaluation took "
        f"{eval_seconds:.1f} s, outside the budget.",
        "",
    ]


def planned_run(text: str) -> tuple[str, float]:
    """CORPUS:SECONDS, as --run takes it."""
    name, _, seconds = text.partition(":")
    if name not in CORPORA or not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected CORPUS:SECONDS with CORPUS one of {', '.join(CORPORA)}, got {text!r}"
        )
    return name, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=CORPORA, help="one corpus (default: both)")
    parser.add_argument("--budget", type=float, help="seconds of training for each model")
    parser.add_argument(
        "--run",
        action="append",
        type=planned_run,
        metavar="CORPUS:SECONDS",
        help="a corpus and budget to measure, repeatable; replaces --corpus and --budget",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BUDGET:g} s budgets")
    parser.add_argument("--output", type=Path, help="the results file to write")
    parser.add_argument(
        "--keep", type=Path, help="keep charlm's runs and train logs in KEEP/CORPUS"
    )
    args = parser.parse_args()
    output = args.output or ROOT / "benchmarks" / (
        "RESULTS-quality-quick.md" if args.quick else "RESULTS-quality.md"
    )
    torch.set_num_threads(os.cpu_count())
    code, today, load_before = commit(), datetime.date.today(), os.getloadavg()[0]
    plan = args.run or [
        (name, args.budget or (QUICK_BUDGET if args.quick else default))
        for name, default in CORPORA.items()
        if args.corpus in (None, name)
    ]
    sections = []
    for name, budget in plan:
        sections += benchmark(name, budget, args.keep)
    lines = [
        "# Quality in equal wall time: charlm against a small GPT",
        "",
        f"`{shlex.join(['python', 'benchmarks/quality.py', *sys.argv[1:]])}`",
        "",
        f"- machine: {hardware.describe_cpu()}; {torch.get_num_threads()} PyTorch threads",
        f"- load average (1 min): {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        "the end; the machine may have been shared",
        f"- date: {today.isoformat()}",
        f"- commit: {code}",
        f"- versions: jax {importlib.metadata.version('jax')}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "- held-out split: the last 10% of the characters; nats per predicted character",
        "- budgets: the reference's counts its training iterations only; charlm's is its "
        "`--time-budget`, compilation and validation included",
        "",
        *sections,
    ]
    output.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
