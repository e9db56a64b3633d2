"""Process-wide settings a charlm command makes before it runs JAX.

Both are settings of the process, not of a model, so the library never makes them on its
own; the CLI makes them, and a Python program can call these functions first thing.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def enable_compilation_cache() -> None:
    """Keep compiled programs across invocations (JAX's persistent cache), so a second
    `charlm sample` skips compilation."""
    import jax

    from charlm.storage import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back
    to the kernel; True if the process uses glibc and the settings took.

    XLA on CPU allocates the temporaries of a compiled program (about 100 MB for a training step
    of a 2×256 LSTM) afresh on every call. glibc serves an allocation that large with a fresh
    mmap (from a thread's own arena, whatever the settings), so every step touches new pages:
    26,000 to 32,000 page faults per step, a quarter of the step's time. With one arena,
    no mmap and no trimming, the same pages serve every step (the caching allocator of GPU
    frameworks, done by malloc's own settings). The price is that memory freed after the peak
    stays with the process until it exits. Call it before JAX runs anything: arenas that threads
    already have are kept.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
