"""Where a training step's time goes, charlm against the PyTorch reference, phase by phase.

    python benchmarks/breakdown.py                      # shape M, float32
    python benchmarks/breakdown.py --shape M-GRU --precision bfloat16
    python benchmarks/breakdown.py --emulate-avx2       # as benchmarks/run.py emulates it

Each phase is timed on its own, as the median of repeated calls after a warm-up: the forward
pass (loss only), the forward and backward passes, the whole step (with the optimizer), and,
within the forward pass, the recurrence of each layer and the head with its loss. The
reference runs the same phases of `run.TorchCharRNN`. The matmul FLOPs of each phase against
the machine's float32 matmul peak say how far each is from compute-bound. Figures hold for
the processor they were measured on; the first line names it.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from run import (
    AVX2_EMULATION,
    SHAPES,
    Shape,
    TorchCharRNN,
    emulation,
    matmul_peak,
    timed,
)
from torch import nn

from charlm.devices import hardware
from charlm.devices import process_settings as runtime
from charlm.lm import matmul, model, recurrence
from charlm.lm.config import TrainConfig
from charlm.lm.loss import head_loss
from charlm.lm.step import init_state, make_train_step, sequence_loss
from charlm.training.schedule import make_optimizer

REPEATS = 15


def charlm_phases(shape: Shape, precision: str) -> dict[str, float]:
    """Seconds per call of each phase of charlm's step."""
    config = shape.config(precision)
    optimizer = make_optimizer(TrainConfig())
    state = init_state(config, optimizer, shape.batch, seed=0)
    # The step donates `state`: the other phases use copies.
    params, carry = jax.tree.map(jnp.copy, (state["params"], state["carry"]))
    rng = np.random.default_rng(0)
    window = rng.integers(0, shape.vocab, (shape.batch, shape.seq + 1)).astype(np.int32)
    inputs, targets = window[:, :-1], window[:, 1:]
    dtype = matmul.PRECISIONS[precision]

    forward = jax.jit(lambda p: sequence_loss(p, inputs, targets, carry, config)[0])
    backward = jax.jit(jax.grad(lambda p: sequence_loss(p, inputs, targets, carry, config)[0]))
    step = make_train_step(config, optimizer)

    tokens = jnp.swapaxes(jnp.asarray(inputs), 0, 1)
    x_first = model.embed_projection(params, tokens, config, None)
    outputs, _ = model.features(params, tokens, carry, config)
    layer = jax.jit(lambda p, x, s: model.run_layer(config, p, x, s, None))
    w, b = model.head_weight(params, config), params["head"]["b"]
    head = jax.jit(lambda x, w: head_loss(x, w, b, jnp.swapaxes(targets, 0, 1), dtype))
    head_grad = jax.jit(jax.grad(head, argnums=(0, 1)))

    def run_step() -> None:
        nonlocal state
        state, loss = step(state, inputs, targets, False, np.float32(2e-3))
        jax.block_until_ready(loss)

    def layers() -> None:
        x = x_first
        for n, (p, s) in enumerate(zip(params["layers"], carry)):
            if n:
                x = model.matmul(x, p["w_x"], dtype)
            x, _ = layer(p, x, s)
        jax.block_until_ready(x)

    phases = {
        "forward (loss)": lambda: jax.block_until_ready(forward(params)),
        "forward and backward": lambda: jax.block_until_ready(backward(params)),
        "whole step (with AdamW)": run_step,
        "forward: the layers (input products and recurrence)": layers,
        "forward: head and loss": lambda: jax.block_until_ready(head(outputs, w)),
        "head and loss, with their gradients": lambda: jax.block_until_ready(head_grad(outputs, w)),
    }
    return {name: measure(fn) for name, fn in phases.items()}


def torch_phases(shape: Shape) -> dict[str, float]:
    """Seconds per call of the same phases of the PyTorch reference."""
    torch.manual_seed(0)
    net = TorchCharRNN(shape)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    window = torch.from_numpy(
        np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.seq + 1))
    )
    inputs, targets = window[:, :-1], window[:, 1:].reshape(-1)

    def loss() -> torch.Tensor:
        logits, _ = net(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), targets)

    def forward() -> None:
        with torch.no_grad():
            loss()

    def backward() -> None:
        net.zero_grad(set_to_none=True)
        loss().backward()

    def step() -> None:
        backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()

    embedded = net.embed(inputs).detach()
    outputs = net.rnn(embedded)[0].detach()

    def layers() -> None:
        with torch.no_grad():
            net.rnn(embedded)

    def head() -> None:
        with torch.no_grad():
            logits = net.head(outputs)
            nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), targets)

    def head_grad() -> None:
        x = outputs.clone().requires_grad_(True)
        logits = net.head(x)
        nn.functional.cross_entropy(logits.reshape(-1, shape.vocab), targets).backward()

    phases = {
        "forward (loss)": forward,
        "forward and backward": backward,
        "whole step (with AdamW)": step,
        "forward: the layers (input products and recurrence)": layers,
        "forward: head and loss": head,
        "head and loss, with their gradients": head_grad,
    }
    return {name: measure(fn) for name, fn in phases.items()}


def measure(fn) -> float:
    for _ in range(3):
        fn()
    return timed(fn, REPEATS)


def phase_flops(shape: Shape) -> dict[str, float]:
    """Matmul FLOPs of each phase (a backward pass costs twice its forward)."""
    chars = shape.batch * shape.seq
    gates = recurrence.GATES[shape.cell]
    layers = 2 * shape.embed * gates * shape.hidden
    layers += 2 * (shape.layers - 1) * shape.hidden * gates * shape.hidden
    layers += 2 * shape.layers * shape.hidden * gates * shape.hidden
    head = 2 * shape.hidden * shape.vocab
    forward = chars * (layers + head)
    return {
        "forward (loss)": forward,
        "forward and backward": 3 * forward,
        "whole step (with AdamW)": 3 * forward,
        "forward: the layers (input products and recurrence)": chars * layers,
        "forward: head and loss": chars * head,
        "head and loss, with their gradients": 3 * chars * head,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="M")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--emulate-avx2", action="store_true", help="as benchmarks/run.py")
    args = parser.parse_args()
    if args.emulate_avx2 and not emulation():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_EMULATION})
    runtime.reuse_freed_memory()
    torch.set_num_threads(os.cpu_count() or 1)
    shape = SHAPES[args.shape]
    peak = matmul_peak(jnp.float32)
    ours, theirs = charlm_phases(shape, args.precision), torch_phases(shape)
    flops = phase_flops(shape)
    how = emulation() or "natively"
    print(f"{hardware.describe_cpu()}, measured {how}; shape {shape.name}, {args.precision}")
    print(f"float32 matmul peak {peak / 1e9:,.0f} GFLOP/s")
    print("| phase | charlm ms | PyTorch ms | ratio | charlm % of f32 peak |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in ours.items():
        share = flops[name] / seconds / peak
        print(
            f"| {name} | {seconds * 1e3:.1f} | {theirs[name] * 1e3:.1f} | "
            f"{theirs[name] / seconds:.2f}× | {share:.0%} |"
        )


if __name__ == "__main__":
    main()
