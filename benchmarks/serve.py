"""Benchmark: how fast `charlm serve` streams text, to one client and to several at once.

Starts `charlm serve` on a checkpoint (a free port on 127.0.0.1), then streams POST /v1/sample
with httpx and prints a table:

- one client, REPEATS times: the time to the first byte (the event that carries the prime),
  the time to the first generated text, and characters per second over the whole request;
- CLIENTS clients at once (each its own connection and seed, all started together): the time
  until every client had generated text, and the total characters per second.

    charlm train /work/shared/corpora/tinyshakespeare.txt --steps 300 --run-dir /tmp/serve-model
    python benchmarks/serve.py /tmp/serve-model

Needs httpx (pip install ".[dev]"). Nothing else should be running: on a CPU the clients
share its cores with one another and with anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from charlm.devices import hardware


def start_server(checkpoint: str, max_length: int) -> tuple[subprocess.Popen, str, float]:
    """`charlm serve` on a free port: the process, its URL and how long it took to be ready."""
    began = time.monotonic()
    command = ["charlm", "serve", "-c", checkpoint, "--port", "0", "--max-length", str(max_length)]
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    ready = lines.get(timeout=300)
    found = re.search(r" at (http://\S+) ", ready)
    if not found:
        process.kill()
        sys.exit(f"charlm serve did not start: {ready!r}")
    return process, found.group(1), time.monotonic() - began


def stream(url: str, length: int, seed: int, barrier: threading.Barrier | None = None) -> dict:
    """One streaming request: its start, first byte, first generated text and end times."""
    body = {"prime": "ROMEO:\n", "length": length, "seed": seed, "stream": True}
    times: dict[str, float] = {}
    generated = 0
    with httpx.Client(timeout=600) as client:
        if barrier is not None:
            barrier.wait()
        times["start"] = time.monotonic()
        with client.stream("POST", url + "v1/sample", json=body) as response:
            response.raise_for_status()
            pieces = 0
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line.removeprefix("data: "))
                if "pieces" not in data:
                    continue
                times.setdefault("first_byte", time.monotonic())
                if pieces:
                    generated += len(data["pieces"][0])
                    times.setdefault("first_text", time.monotonic())
                pieces += 1
        times["end"] = time.monotonic()
    assert generated == length, (generated, length)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint file or run directory")
    parser.add_argument("--length", type=int, default=2000, help="characters per request")
    parser.add_argument("--clients", type=int, default=8, help="clients at once")
    parser.add_argument("--repeats", type=int, default=5, help="requests of the one client")
    args = parser.parse_args()

    process, url, startup = start_server(args.checkpoint, args.length)
    try:
        model = httpx.get(url + "v1/model").json()
        stream(url, args.length, seed=0)  # warm the connection path; compiled at start-up
        single = [stream(url, args.length, seed=1 + i) for i in range(args.repeats)]
        barrier = threading.Barrier(args.clients)
        with ThreadPoolExecutor(args.clients) as pool:
            many = list(
                pool.map(lambda s: stream(url, args.length, s, barrier), range(args.clients))
            )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)

    def median(key: str, since: str = "start") -> float:
        return statistics.median(t[key] - t[since] for t in single)

    rate = statistics.median(args.length / (t["end"] - t["start"]) for t in single)
    began = min(t["start"] for t in many)
    all_text = max(t["first_text"] for t in many) - began
    wall = max(t["end"] for t in many) - began
    print(
        f"model: {model['cell'].upper()} {model['layers']}×{model['hidden_size']}, vocabulary "
        f"{model['vocab_size']}, {model['parameters']:,} parameters ({model['checkpoint']})"
    )
    print(f"CPU: {hardware.describe_cpu()}, {len(os.sched_getaffinity(0))} cores available")
    print(f"server ready {startup:.1f} s after start (load, compile, listen)")
    print(f"{args.length} characters per request, chunks of 64; medians of {args.repeats}\n")
    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| 1 client: first byte (the prime's event) | {1000 * median('first_byte'):.1f} ms |")
    print(f"| 1 client: first generated text | {1000 * median('first_text'):.1f} ms |")
    print(f"| 1 client: characters/s | {rate:,.0f} |")
    print(f"| {args.clients} clients: all have generated text after | {1000 * all_text:.0f} ms |")
    total = args.clients * args.length / wall
    print(f"| {args.clients} clients: total characters/s | {total:,.0f} |")
    print(f"| {args.clients} clients: characters/s each | {total / args.clients:,.0f} |")


if __name__ == "__main__":
    main()
