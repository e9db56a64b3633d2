"""What scaling out costs on this machine: data parallelism's overhead, and a corpus far larger
than the text charlm used to hold whole, read from its token file.

    python benchmarks/scale.py            # writes benchmarks/RESULTS-scale.md (about 15 min)
    python benchmarks/scale.py --quick    # a 50 MB corpus and fewer steps, to check it runs

Each figure comes from a child process of its own, so that one measurement's memory and JAX's
device count (JAX_NUM_CPU_DEVICES) do not leak into the next. Anonymous memory (RssAnon of
/proc/self/status: the pages of the memory-mapped token file and of the file cache are not
counted) is sampled every 5 ms by a thread of the measured process, and its peak reported.
On a 2-core CPU more devices cannot train faster; these are the overheads, not speed-ups.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from charlm.devices import hardware

ROOT = Path(__file__).resolve().parents[1]

# Run in each child: sample RssAnon, run the measured code (WORK), print one JSON line.
CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np

    def anon_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    samples, done = [anon_bytes()], threading.Event()

    def watch():
        while not done.is_set():
            samples.append(anon_bytes())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    args = json.loads(sys.argv[1])
    result = {}
    WORK
    done.set()
    result["peak_anon_bytes"] = max(samples)
    print(json.dumps(result))
    """
)

TOKENIZE = """
from charlm.devices import process_settings as runtime
from charlm.data import token_files as tokens
runtime.reuse_freed_memory()
start = time.perf_counter()
opened = tokens.open_tokens(args["corpus"])
result.update(seconds=time.perf_counter() - start, characters=len(opened.tokens),
              vocabulary=len(opened.vocab))
"""

# A training session opened as `charlm train` opens it, 20 warm-up steps (compilation), the
# timed steps, then one evaluation and checkpoint (in the memory figure, not the time). With
# "in_ram" the token file is read whole into memory first, as charlm held every corpus before.
TRAIN = """
from charlm.devices import cluster
from charlm.data.corpus import corpus as data
from charlm.devices import process_settings as runtime
from charlm.data import token_files as tokens
if args.get("coordinator"):
    cluster.join(args["coordinator"], 2, args["process_id"])
runtime.reuse_freed_memory()
if args["in_ram"]:
    real = tokens.open_tokens
    def in_ram(*a, **k):
        opened = real(*a, **k)
        return tokens.TokenFile(opened.path, opened.corpus_sha256, opened.vocab,
                                np.array(opened.tokens))
    data.open_tokens = in_ram
from charlm.devices.data_parallel import DataParallel
from charlm.lm.training import RUN_KIND, LanguageModelRun
from charlm.training.loop import TrainingRun
from charlm.training.run_setup import open_run
session = open_run(RUN_KIND, args["corpus"], None, args["run"], False, {}, False)
parallel = DataParallel.over(args["devices"])
run = TrainingRun(session, LanguageModelRun(session, parallel), parallel, False, time.monotonic())
for _ in range(20):
    run.train_step()
run.fetch_losses()
start = time.perf_counter()
for _ in range(args["steps"]):
    run.train_step()
run.fetch_losses()
result.update(seconds=time.perf_counter() - start, steps=args["steps"])
run.evaluate_and_save()
"""


def children(work: str, every_args: list[dict], env: dict[str, str]) -> list[dict]:
    """Run `work` in one child process for each of `every_args`, all at once; their results."""
    code = CHILD.replace("WORK\n", work.strip() + "\n")
    started = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for args in every_args
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=3600)
        if process.returncode:
            sys.exit(f"a measurement failed:\n{err[-3000:]}")
        results.append(json.loads(out.splitlines()[-1]))
    return results


def child(work: str, args: dict, env: dict[str, str]) -> dict:
    return children(work, [args], env)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_corpus(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of UTF-8: words of CJK characters (3,500 of them, Zipf-distributed) and of
    ASCII letters, with punctuation and line breaks: a vocabulary of several thousand."""
    rng = np.random.default_rng(seed)
    cjk = 0x4E00 + rng.permutation(0x5000)[:3500]
    ascii_chars = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    punctuation = np.array([ord(c) for c in "，。、；：？！“”《》 .,;\n"], np.uint32)
    alphabet = np.concatenate([cjk, ascii_chars.astype(np.uint32), punctuation])
    weights = 1.0 / np.arange(1, len(alphabet) + 1)
    weights[len(cjk) :] = weights[: len(alphabet) - len(cjk)] * 4
    weights /= weights.sum()
    written = 0
    with open(path, "wb") as f:
        while written < size:
            points = rng.choice(alphabet, 1 << 22, p=weights).astype("<u4")
            block = points.tobytes().decode("utf-32-le").encode("utf-8")[: size - written]
            block = block.decode("utf-8", errors="ignore").encode("utf-8")
            f.write(block)
            written += len(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus, to check it runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-scale.md")
    parser.add_argument("--size", type=float, default=2.0, help="corpus size in GB")
    args = parser.parse_args()
    size = int(0.05e9 if args.quick else args.size * 1e9)
    steps = 20 if args.quick else 200
    rows: list[tuple[str, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = {"XDG_CACHE_HOME": str(work / "cache")}
        corpus = work / "large.txt"
        start = time.perf_counter()
        generate_corpus(corpus, size)
        print(f"generated {size:,} bytes in {time.perf_counter() - start:.0f} s", flush=True)

        made = child(TOKENIZE, {"corpus": str(corpus)}, cache)
        rows += [
            (
                "corpus",
                f"{size / 1e9:.2f} GB of UTF-8, {made['characters']:,} characters, "
                f"vocabulary {made['vocabulary']:,}",
            ),
            (
                "tokenizing it (first use: sha256, two passes, the token file's check)",
                f"{made['seconds']:.1f} s, {size / made['seconds'] / 1e6:,.0f} MB/s",
            ),
            (
                "peak anonymous memory while tokenizing",
                f"{made['peak_anon_bytes'] / 2**20:,.0f} MiB",
            ),
        ]
        print(rows[-2:], flush=True)
        opened = child(TOKENIZE, {"corpus": str(corpus)}, cache)
        rows.append(
            (
                "opening it again (sha256 of the text, check of the token file)",
                f"{opened['seconds']:.1f} s",
            )
        )

        speeds = {}
        for name, in_ram, devices, processes in (
            ("token file, memory-mapped, 1 device", False, 1, 1),
            ("tokens held in RAM, 1 device", True, 1, 1),
            ("token file, 1 process of 2 devices (JAX_NUM_CPU_DEVICES=2)", False, 2, 1),
            ("token file, 2 processes of 1 device (127.0.0.1)", False, 1, 2),
        ):
            coordinator = f"127.0.0.1:{free_port()}" if processes > 1 else None
            every_args = [
                {
                    "corpus": str(corpus),
                    "in_ram": in_ram,
                    "devices": devices,
                    "steps": steps,
                    "run": str(work / f"run-{len(speeds)}"),
                    "coordinator": coordinator,
                    "process_id": index,
                }
                for index in range(processes)
            ]
            env = {**cache, "JAX_NUM_CPU_DEVICES": str(devices)}
            measured = children(TRAIN, every_args, env)
            speeds[name] = steps / measured[0]["seconds"]
            peak = max(m["peak_anon_bytes"] for m in measured) / 2**30
            each = " (each process)" if processes > 1 else ""
            rows.append(
                (
                    f"{steps} training steps, {name}",
                    f"{speeds[name]:.2f} steps/s, peak anonymous memory{each} {peak:.2f} GiB",
                )
            )
            print(rows[-1], flush=True)
        base = speeds["token file, memory-mapped, 1 device"]
        rows.append(
            (
                "memory-mapped against in RAM",
                f"{base / speeds['tokens held in RAM, 1 device']:.2f}×",
            )
        )
        for name in list(speeds)[2:]:
            rows.append((f"{name.split(', ')[1]} against 1 device", f"{speeds[name] / base:.2f}×"))

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        "# Scaling out: overheads on one machine",
        "",
        f"`python benchmarks/scale.py{' --quick' if args.quick else ''}`",
        "",
        f"- machine: {hardware.describe_cpu()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {commit}",
        f"- Python {platform.python_version()}; the model is charlm's default (2×256 LSTM, "
        "tied 256-wide embedding), `--precision auto`",
        "",
        "| figure | value |",
        "| --- | --- |",
        *[f"| {a} | {b} |" for a, b in rows],
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
