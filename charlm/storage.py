"""charlm's cache directory, durable file replacement shared by checkpoints and corpora, and
the lock that makes one process the only writer of a run directory; no JAX here.

A new file is written beside its target, fsynced, and renamed over it (a rename within one
directory is atomic on POSIX), then the directory is fsynced so that the rename itself survives
a crash: a reader sees the old file or the new one, whole, never a torn one.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charlm.errors import CharlmError


def cache_dir() -> Path:
    """charlm's cache: $XDG_CACHE_HOME/charlm, or ~/.cache/charlm when that is unset or empty
    (as the XDG base-directory specification says)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charlm"


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the fsynced file `source` over `target` and make the rename durable."""
    os.replace(source, target)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(Path(target).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, whole."""
    path = Path(path)
    tmp = _temporary(path, os.getpid())
    try:
        write_synced(tmp, data)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(targets: list[Path]) -> list[Path]:
    """Remove the temporary files that `write_atomic` left beside `targets` when its process
    died mid-write (a crash, SIGKILL), and return them. A temporary file whose process still
    runs is being written, and is left alone."""
    removed = []
    for target in targets:
        for tmp in target.parent.glob(f".{target.name}.tmp-*"):
            pid = tmp.name.rpartition("-")[2]
            if pid.isdigit() and tmp == _temporary(target, int(pid)) and not _running(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


LOCK_FILE = "run.lock"


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of the run directory `directory` (made if missing) while the
    block runs: an OS lock (flock) on its lock file, which the kernel releases when the process
    ends, however it ends, so that a killed run leaves no stale lock. A second writer is refused
    in one line that names the process holding the lock; readers never take it."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise CharlmError(
                f"{directory} is being trained by another charlm process (pid {holder}); wait "
                "for it to end, or train in another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        except BaseException:
            # A run that failed before writing anything leaves no directory behind.
            if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                path.unlink()
                directory.rmdir()
            raise
    finally:
        os.close(fd)
