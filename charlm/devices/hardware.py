"""What the processor can do fast: the facts behind choices made on the user's behalf
(`--precision auto`), and the processor's description that benchmarks record."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# x86 instruction sets with bfloat16 arithmetic, as /proc/cpuinfo spells them: AVX-512 BF16
# (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later).
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
# The vector and matrix extensions that decide how fast matmuls run on x86.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
# The extensions a benchmark names, yes or no, each with the flags that show it.
EXTENSION_GROUPS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "AVX-512 BF16": ("avx512_bf16",),
    "AMX": ("amx_bf16", "amx_tile"),
}
# NVIDIA GPUs compute in bfloat16 from Ampere (compute capability 8.0) on.
BFLOAT16_COMPUTE_CAPABILITY = 8


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags (empty where there is no /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine() or "unknown CPU", frozenset[str]()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


def describe_cpu() -> str:
    """The CPU model, its core count, and which of `VECTOR_FLAGS` it has: what a speed or
    quality figure must name to be read on the right machine."""
    name, flags = cpu_info()
    present = [flag for flag in VECTOR_FLAGS if flag in flags]
    return f"{name}, {os.cpu_count()} cores ({', '.join(present) or 'none of ' + '/'.join(VECTOR_FLAGS)})"


def native_bfloat16(device: Any, cpu_flags: frozenset[str] | None = None) -> str | None:
    """Why `device` (a `jax.Device`) has bfloat16 arithmetic, or None when it lacks it. On CPU
    that means AVX-512 BF16 or AMX; without them XLA computes bfloat16 products in float32
    after converting, which is slower than float32 itself."""
    if device.platform == "tpu":
        return "TPUs compute in bfloat16"
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", None)
        if capability is None:
            return "the GPU computes in bfloat16"
        if int(str(capability).split(".")[0]) >= BFLOAT16_COMPUTE_CAPABILITY:
            return f"the GPU (compute capability {capability}) computes in bfloat16"
        return None
    if device.platform == "cpu":
        flags = cpu_info()[1] if cpu_flags is None else cpu_flags
        found = [flag for flag in BFLOAT16_FLAGS if flag in flags]
        if found:
            return f"the CPU has {' and '.join(found)}"
    return None


def auto_precision(device: Any, cpu_flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The training precision `--precision auto` chooses for `device`, and why: bfloat16 where
    it has bfloat16 arithmetic (`native_bfloat16`), float32 elsewhere."""
    reason = native_bfloat16(device, cpu_flags)
    if reason is not None:
        return "bfloat16", reason
    what = "the CPU" if device.platform == "cpu" else f"the {device.platform.upper()}"
    return "float32", f"{what} lacks bfloat16 arithmetic"
