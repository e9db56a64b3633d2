"""charlm against the PyTorch model a good PyTorch user would write, side by side in one process.

    pip install ".[bench]"            # PyTorch CPU build (torch==2.13.0 on these machines)
    python benchmarks/run.py          # writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick  # fewer steps, for checking that it runs
    python benchmarks/run.py --emulate-avx2   # as far as software can, an AVX2-only machine

Every speed is reported as a ratio to the reference measured in the same run on the same
machine; compilation and warm-up are excluded from throughput and reported separately.
Training speeds are the medians of rounds that measure charlm and the reference in turn.
RESULTS.md keeps one section per kind of processor (and per emulation): a run replaces the
section of its own kind and leaves the others, so that no figure is read as another machine's.

The process first makes charlm's malloc setting (`runtime.reuse_freed_memory`, as the CLI
does), which speeds up PyTorch as much as it speeds up charlm; so the training reference is
also measured as a PyTorch script runs by default, in a child process with glibc's defaults.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from charlm.devices import hardware
from charlm.devices import process_settings as runtime
from charlm.inference.sampling import generate
from charlm.lm import model, recurrence
from charlm.lm.config import TrainConfig
from charlm.lm.evaluation import total_nats
from charlm.lm.step import init_state, make_train_step
from charlm.training.schedule import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SANGUO = ROOT.parent / "shared" / "corpora" / "sanguo.txt"
CHARLM = [sys.executable, "-m", "charlm"]
# What limits the code that XLA generates, oneDNN's kernels and PyTorch's own kernels to AVX2.
# The processor's flags and its caches stay those of the machine: an emulation is not the real
# processor, and its section says so.
AVX2_EMULATION = {
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


@dataclass(frozen=True)
class Shape:
    """A benchmark model: the sizes issue 4 names."""

    name: str
    cell: str
    layers: int
    hidden: int
    vocab: int
    batch: int
    seq: int
    embed: int = 64

    def config(self, precision: str = "float32") -> model.ModelConfig:
        return model.ModelConfig(
            self.vocab, self.cell, self.layers, self.hidden, self.embed, precision=precision
        )

    def recurrent_shapes(self) -> list[tuple[int, int]]:
        """The recurrent matrices W_h, one per layer: the only products that one stream of
        evaluation must run one character after another."""
        return [(self.hidden, recurrence.GATES[self.cell] * self.hidden)] * self.layers

    def weight_bytes(self) -> int:
        """Bytes of float32 weights one character reads when sampling: every matrix once."""
        gates = recurrence.GATES[self.cell]
        recurrent = self.embed + (2 * self.layers - 1) * self.hidden
        return 4 * (recurrent * gates * self.hidden + self.hidden * self.vocab)

    def train_flops_per_char(self) -> float:
        """Matmul FLOPs of forward and backward (3× forward) per character."""
        gates = recurrence.GATES[self.cell]
        forward = 2 * self.embed * gates * self.hidden
        forward += 2 * (self.layers - 1) * self.hidden * gates * self.hidden
        forward += 2 * self.layers * self.hidden * gates * self.hidden
        forward += 2 * self.hidden * self.vocab
        return 3.0 * forward


SHAPES = {
    "S": Shape("S", "lstm", 2, 256, 65, 32, 100),
    "M": Shape("M", "lstm", 2, 512, 4000, 32, 100),
    "M-GRU": Shape("M-GRU", "gru", 2, 512, 4000, 32, 100),
    "L": Shape("L", "lstm", 3, 1024, 4000, 128, 128),
}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of fn, the median of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TorchCharRNN(nn.Module):
    """The reference: embedding, nn.LSTM/nn.GRU, linear head, as a PyTorch user writes it."""

    def __init__(self, shape: Shape):
        super().__init__()
        rnn = nn.LSTM if shape.cell == "lstm" else nn.GRU
        self.embed = nn.Embedding(shape.vocab, shape.embed)
        self.rnn = rnn(shape.embed, shape.hidden, shape.layers, batch_first=True)
        self.head = nn.Linear(shape.hidden, shape.vocab)

    def forward(self, tokens, state=None):
        outputs, state = self.rnn(self.embed(tokens), state)
        return self.head(outputs), state


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def torch_train_speed(shape: Shape, steps: int) -> float:
    """Characters per second of Adam training steps with carried state (TBPTT), clip 5."""
    torch.manual_seed(0)
    net = TorchCharRNN(shape)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, shape.vocab, (shape.batch, shape.seq + 1)) for _ in range(4)]
    state = None

    def step(i: int) -> None:
        nonlocal state
        window = torch.from_numpy(batches[i % 4])
        logits, state = net(window[:, :-1], state)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, shape.vocab), window[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        state = _detach(state)

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * shape.batch * shape.seq / (time.perf_counter() - start)


def charlm_train_speed(shape: Shape, steps: int, precision: str) -> tuple[float, float]:
    """Characters per second of charlm's compiled step, and the seconds of its compilation."""
    config = shape.config(precision)
    optimizer = make_optimizer(TrainConfig())
    train_step = make_train_step(config, optimizer)
    state = init_state(config, optimizer, shape.batch, seed=0)
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, shape.vocab, (shape.batch, shape.seq + 1)).astype(np.int32)
        for _ in range(4)
    ]
    lr = np.float32(2e-3)

    def step(state, i):
        window = batches[i % 4]
        return train_step(state, window[:, :-1], window[:, 1:], i == 0, lr)[0]

    start = time.perf_counter()
    state = step(state, 0)
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - start
    for i in range(1, 3):
        state = step(state, i)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state = step(state, i + 3)
    jax.block_until_ready(state)
    return steps * shape.batch * shape.seq / (time.perf_counter() - start), compile_seconds


def torch_train_speed_default_malloc(shape: Shape, steps: int) -> float:
    """`torch_train_speed` in a child process that keeps glibc's default malloc."""
    command = [sys.executable, __file__, "--reference", shape.name, "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def matmul_peak(dtype: jnp.dtype) -> float:
    """FLOP/s of square matmuls in JAX with operands in `dtype`, accumulated in float32: the
    best of sizes 1024, 2048 and 4096 and of five calls each, the machine's practical peak."""
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    best = 0.0
    for size in (1024, 2048, 4096):
        a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
        jax.block_until_ready(matmul(a, a))
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, a))
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def matvec_bandwidth(size: int = 2048) -> float:
    """Bytes per second a float32 matrix-vector product reads: what bounds sampling at batch
    1, where every character reads every weight once. The matrix is 16 MiB, like M's weights."""
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    v = jnp.ones((1, size), jnp.float32)
    matvec = jax.jit(lambda v, w: jax.lax.fori_loop(0, 100, lambda _, x: jnp.tanh(x @ w), v))
    jax.block_until_ready(matvec(v, w))
    return 100 * w.nbytes / timed(lambda: jax.block_until_ready(matvec(v, w)), 5)


def recurrent_bound(shape: Shape) -> tuple[float, float]:
    """The bound on one stream's evaluation speed: chars/s = read bandwidth / bytes of the
    float32 recurrent weights, with the bandwidth measured on matrices of W_h's shapes (so in
    the cache level they fit in), chained layer after layer as a stream's character is.
    Returns (bandwidth in bytes/s, bound in chars/s)."""
    weights = [
        jax.random.normal(jax.random.key(i), size, jnp.float32) / size[0] ** 0.5
        for i, size in enumerate(shape.recurrent_shapes())
    ]
    nbytes = sum(w.nbytes for w in weights)

    def character(_, h):
        for w in weights:
            h = jnp.tanh(h @ w)[:, : shape.hidden]
        return h

    chain = jax.jit(lambda h: jax.lax.fori_loop(0, 100, character, h))
    h = jnp.ones((1, shape.hidden), jnp.float32)
    jax.block_until_ready(chain(h))
    seconds = timed(lambda: jax.block_until_ready(chain(h)), 5) / 100
    return nbytes / seconds, 1 / seconds


def torch_sample_speed(shape: Shape, batch: int, length: int) -> float:
    """Characters per second of the usual per-character loop under inference_mode, at the
    better of one thread and all threads."""
    torch.manual_seed(0)
    net = TorchCharRNN(shape).eval()
    best = 0.0
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            tokens = torch.zeros((batch, 1), dtype=torch.long)
            state = None
            for _ in range(20):
                logits, state = net(tokens, state)
            start = time.perf_counter()
            for _ in range(length):
                logits, state = net(tokens, state)
                tokens = torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1)
            best = max(best, batch * length / (time.perf_counter() - start))
    torch.set_num_threads(default_threads)
    return best


def charlm_sample_speed(shape: Shape, batch: int, length: int) -> float:
    config = shape.config()
    params = model.init(jax.random.key(0), config)
    context = np.zeros(1, np.int32)

    def run() -> None:
        for _ in generate(params, config, context, length, jax.random.key(0), num_samples=batch):
            pass

    run()
    return batch * length / timed(run, 3)


def torch_eval_speed(shape: Shape, tokens: np.ndarray, chunk: int = 1024) -> float:
    torch.manual_seed(0)
    net = TorchCharRNN(shape).eval()
    data = torch.from_numpy(tokens.astype(np.int64))

    def run() -> None:
        state, total = None, 0.0
        with torch.inference_mode():
            for start in range(0, len(data) - 1, chunk):
                x = data[start : start + chunk][None]
                y = data[start + 1 : start + chunk + 1][None]
                logits, state = net(x[:, : y.shape[1]], state)
                total += float(nn.functional.cross_entropy(logits[0], y[0], reduction="sum"))

    run()
    return (len(tokens) - 1) / timed(run, 3)


def charlm_eval_speed(shape: Shape, tokens: np.ndarray) -> float:
    config = shape.config()
    params = model.init(jax.random.key(0), config)
    total_nats(params, config, tokens)
    return (len(tokens) - 1) / timed(lambda: total_nats(params, config, tokens), 3)


def _charlm(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*CHARLM, *args], env=env, **kwargs)


def help_seconds() -> float:
    def run() -> None:
        _charlm("--help", stdout=subprocess.DEVNULL).wait()

    return timed(run, 5)


def first_character_seconds(checkpoint: Path, cache: Path) -> float:
    """Seconds from starting `charlm sample` to its first generated character."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = _charlm(
        "sample",
        "-c",
        str(checkpoint),
        "--prime",
        "a",
        "--seed",
        "0",
        env=env,
        stdout=subprocess.PIPE,
    )
    proc.stdout.read(2)  # the prime, then the first generated character
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return elapsed


def training_peak_memory(corpus: Path, workdir: Path, steps: int) -> float:
    """Peak resident memory (GiB) of `charlm train` on `corpus`. A small Python process starts
    it and reads its peak: a child forked from this one would first count this process's own
    memory (PyTorch and JAX both loaded)."""
    command = [*CHARLM, "train", str(corpus), "--steps", str(steps)]
    command += ["--eval-every", str(steps), "--quiet"]
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, *command],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1]) / 2**20


def emulation() -> str | None:
    """How this process limits the instruction sets, or None when it runs natively."""
    if all(os.environ.get(key) == value for key, value in AVX2_EMULATION.items()):
        return "AVX2, emulated with " + ", ".join(f"{k}={v}" for k, v in AVX2_EMULATION.items())
    return None


def processor_kind() -> str:
    """The section title of this run's results: the processor, its cores and vector
    extensions, and the emulation if there is one."""
    emulated = emulation()
    return hardware.describe_cpu() + (", emulating AVX2 only" if emulated else "")


def machine() -> dict[str, str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    flags = hardware.cpu_info()[1]
    return {
        "processor": hardware.cpu_info()[0],
        "extensions": ", ".join(
            f"{name} {'yes' if any(f in flags for f in names) else 'no'}"
            for name, names in hardware.EXTENSION_GROUPS.items()
        ),
        "measured": emulation() or "natively",
        "device": str(jax.devices()[0].device_kind),
        "date": datetime.date.today().isoformat(),
        "commit": commit or "unknown",
        "versions": f"jax {jax.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, to check that it runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of training measurements")
    parser.add_argument("--reference", choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="limit XLA, oneDNN and PyTorch to AVX2 (" + ", ".join(AVX2_EMULATION) + ")",
    )
    args = parser.parse_args()
    if args.emulate_avx2 and emulation() is None:
        # The limits must hold before XLA, oneDNN or ATen choose their kernels: start afresh.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_EMULATION})
    if args.reference:
        # The child of torch_train_speed_default_malloc: glibc's defaults, one figure.
        print(torch_train_speed(SHAPES[args.reference], args.steps))
        return
    reuses_freed_memory = runtime.reuse_freed_memory()
    steps, length = (5, 200) if args.quick else (30, 2000)
    rounds = 1 if args.quick else args.rounds
    on_gpu = jax.default_backend() == "gpu"
    rows: list[tuple[str, str, str, str]] = []

    def row(figure: str, ours: float, reference: float | None, unit: str) -> None:
        ratio = f"{ours / reference:.2f}×" if reference else ""
        rows.append(
            (figure, f"{ours:,.0f} {unit}", f"{reference:,.0f} {unit}" if reference else "", ratio)
        )
        print(rows[-1], flush=True)

    def fact(figure: str, value: str) -> None:
        """A figure of charlm's alone, with no reference to compare with."""
        rows.append((figure, value, "", ""))

    peak = matmul_peak(jnp.float32)
    peak_bf16 = matmul_peak(jnp.bfloat16)
    fact("float32 matmul peak", f"{peak / 1e9:,.0f} GFLOP/s")
    fact("bfloat16 matmul peak", f"{peak_bf16 / 1e9:,.0f} GFLOP/s")
    compile_times = {}
    for name in ["S", "M", "M-GRU", *(["L"] if on_gpu else [])]:
        shape = SHAPES[name]
        runs: dict[str, list[float]] = {}
        for _ in range(rounds):
            runs.setdefault("reference", []).append(torch_train_speed(shape, steps))
            for precision in ("float32", "bfloat16"):
                speed, compile_times[name, precision] = charlm_train_speed(shape, steps, precision)
                runs.setdefault(precision, []).append(speed)
            if reuses_freed_memory:
                runs.setdefault("default malloc", []).append(
                    torch_train_speed_default_malloc(shape, steps)
                )
        speeds = {key: statistics.median(values) for key, values in runs.items()}
        label = (
            f"training {name} ({shape.layers}×{shape.hidden} {shape.cell.upper()}, V {shape.vocab})"
        )
        for precision, matmul_rate in (("float32", peak), ("bfloat16", peak_bf16)):
            row(f"{label}, {precision}", speeds[precision], speeds["reference"], "chars/s")
            if "default malloc" in speeds:
                row(
                    f"{label}, {precision}, against the reference under glibc's default malloc",
                    speeds[precision],
                    speeds["default malloc"],
                    "chars/s",
                )
            if name == "M":
                fraction = speeds[precision] * shape.train_flops_per_char() / matmul_rate
                fact(f"fraction of the {precision} matmul peak, training M", f"{fraction:.0%}")
    bandwidth = matvec_bandwidth()
    fact("float32 matrix-vector read bandwidth", f"{bandwidth / 1e9:,.0f} GB/s")
    for name in ("S", "M"):
        shape = SHAPES[name]
        for batch in (1, 64):
            row(
                f"sampling {name}, batch {batch}",
                charlm_sample_speed(shape, batch, length),
                torch_sample_speed(shape, batch, length),
                "chars/s",
            )
        fact(
            f"sampling {name}, batch 1: bound of weight bytes per character / bandwidth",
            f"{bandwidth / shape.weight_bytes():,.0f} chars/s",
        )
    tokens = np.random.default_rng(0).integers(0, 4000, 20_000 if not args.quick else 3000)
    evaluation = charlm_eval_speed(SHAPES["M"], tokens)
    row("perplexity evaluation M", evaluation, torch_eval_speed(SHAPES["M"], tokens), "chars/s")
    recurrent_bandwidth, bound = recurrent_bound(SHAPES["M"])
    fact(
        "perplexity evaluation M: bound of recurrent weight bytes per character / bandwidth",
        f"{bound:,.0f} chars/s ({recurrent_bandwidth / 1e9:,.0f} GB/s); "
        f"charlm at {evaluation / bound:.0%} of it",
    )
    for (name, precision), seconds in compile_times.items():
        fact(f"compile time of the training step, {name}, {precision}", f"{seconds:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus.txt"
        corpus.write_text("出战 the army rides at dawn。\n" * 400, encoding="utf-8")
        _charlm(
            "train",
            str(corpus),
            "--steps",
            "1",
            "--quiet",
            "--run-dir",
            str(work / "run"),
            cwd=work,
        ).wait()
        fact("`charlm --help`", f"{help_seconds():.2f} s")
        cache = work / "cache"
        cold = first_character_seconds(work / "run", cache)
        warm = first_character_seconds(work / "run", cache)
        fact(
            "`charlm sample` to first character, cold / warm cache", f"{cold:.2f} s / {warm:.2f} s"
        )
        if SANGUO.exists():
            memory = training_peak_memory(SANGUO, work, 50 if not args.quick else 5)
            fact("peak memory, training on 三国演义", f"{memory:.2f} GiB")

    info = machine()
    info["malloc"] = (
        "charlm's setting (`runtime.reuse_freed_memory`) for both sides, unless a row says otherwise"
        if reuses_freed_memory
        else "the platform's default"
    )
    lines = [f"## {processor_kind()}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| figure | charlm | PyTorch reference | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    old = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    args.out.write_text(replace_section(old, "\n".join(lines) + "\n"), encoding="utf-8")
    print(f"wrote the section {processor_kind()!r} of {args.out}")


RESULTS_HEADER = """# Benchmark results

One section per kind of processor measured, each from one run of `python benchmarks/run.py`
(with `--emulate-avx2` where the title says so): a figure holds for the processor and the
commit that its section names, and ratios are against the reference measured in the same run.
"""


def replace_section(document: str, section: str) -> str:
    """`document` with the section titled as `section`'s first line replaced by it, or with it
    added after the others; every other section kept as it was."""
    title = section.splitlines()[0]
    parts = ["## " + part for part in document.split("\n## ")[1:]]
    kept = [part.rstrip("\n") + "\n" for part in parts if part.splitlines()[0] != title]
    sections = [*kept, section]
    sections.sort(key=lambda part: "emulating" in part.splitlines()[0])
    return RESULTS_HEADER + "\n" + "\n".join(sections)


if __name__ == "__main__":
    main()
