"""The process settings of charlm.devices.process_settings, each checked in a fresh interpreter."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# A jitted function with a 64 MB temporary, allocated on every call and freed at its end; prints
# whether the setting took and the median page faults per call once the heap has settled (the
# first calls grow it, and now and then a later one still does).
PAGE_FAULTS_PER_CALL = textwrap.dedent(
    """
    import resource, sys
    from charlm.devices import process_settings as runtime
    applied = runtime.reuse_freed_memory() if sys.argv[1] == "reuse" else None
    import jax, jax.numpy as jnp
    with_temporary = jax.jit(lambda x: jnp.tanh(x) @ x[0])
    x = jnp.ones((4096, 4096), jnp.float32)
    for _ in range(25):
        with_temporary(x).block_until_ready()
    faults = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with_temporary(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, sorted(faults)[len(faults) // 2])
    """
)
PAGES_OF_TEMPORARY = 4096 * 4096 * 4 // 4096


def _page_faults_per_call(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PAGE_FAULTS_PER_CALL, mode],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_reuse_freed_memory_stops_page_faults_on_every_call():
    _, default_faults = _page_faults_per_call("default")
    applied, reuse_faults = _page_faults_per_call("reuse")
    # By default every call's temporary lands on fresh pages; with the setting, on the same ones.
    assert default_faults > PAGES_OF_TEMPORARY / 2
    assert applied == "True"
    assert reuse_faults < PAGES_OF_TEMPORARY / 10
