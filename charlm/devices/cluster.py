"""Joining a run of several processes, on one host or many, through `jax.distributed`.

Each process of a run is started with the same command; JAX's coordination service, run by
process 0 at the coordinator's address, introduces them. A process joins before it makes any
other JAX call: with explicit options (`--coordinator`, `--num-processes`, `--process-id`, or
the environment variables of the same names), or, when started under Slurm (`srun`) or Open MPI
(`mpirun`) with more than one task, by JAX's own detection of the scheduler's variables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

from charlm.errors import CharlmError

# How long a process waits for all the others to join, unless CHARLM_JOIN_TIMEOUT_S says;
# after how long without heartbeats the coordination service declares a process lost; how long
# process 0 waits for the others to finish before it exits.
JOIN_TIMEOUT_VARIABLE = "CHARLM_JOIN_TIMEOUT_S"
DEFAULT_JOIN_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 15
SHUTDOWN_TIMEOUT_S = 30


def join_timeout() -> int:
    """The seconds a process waits for the others to join: CHARLM_JOIN_TIMEOUT_S, checked as
    an option is, or 120."""
    text = os.environ.get(JOIN_TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_JOIN_TIMEOUT_S
    if not text.strip().isdigit() or int(text) < 1:
        raise CharlmError(
            f"{JOIN_TIMEOUT_VARIABLE}={text!r} is not a number of seconds; set it to a whole "
            f"number of at least 1, or unset it for {DEFAULT_JOIN_TIMEOUT_S}"
        )
    return int(text)


def scheduler() -> str | None:
    """The scheduler that started this process as one task of several, if any."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "Slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def is_requested(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """Whether this process is to be one of several: options say so (checked, one line if
    they do not fit together), or a scheduler started it as one task of several."""
    if coordinator is None and num_processes is None and process_id is None:
        return scheduler() is not None
    _check(coordinator, num_processes, process_id)
    return num_processes != 1


def _check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    given = {
        "--coordinator": coordinator,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise CharlmError(
            f"a run of several processes needs --coordinator, --num-processes and "
            f"--process-id together; {', '.join(missing)} missing"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", coordinator):
        raise CharlmError(
            f"--coordinator must be HOST:PORT, such as 10.0.0.1:9476, not {coordinator!r}"
        )
    if not 0 <= process_id < num_processes:
        raise CharlmError(
            f"--process-id must be from 0 to {num_processes - 1} in a run of "
            f"{num_processes} processes, not {process_id}"
        )


def join(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Join the run that the options or the scheduler describe; False when this process runs
    alone (none given, no scheduler), True once it has joined. One CharlmError line for
    options that do not fit together and for a run that cannot be joined in time."""
    if not is_requested(coordinator, num_processes, process_id):
        return False
    if coordinator is None:
        return _initialize(f"the run that {scheduler()} started", None, None, None)
    return _initialize(
        f"the run coordinated at {coordinator}", coordinator, num_processes, process_id
    )


def _initialize(
    what: str, coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    import jax

    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=join_timeout(),
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except Exception as err:  # JAX raises RuntimeError or its own XlaRuntimeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CharlmError(
            f"could not join {what} within {join_timeout()} s ({first}); start "
            "every process with the same --coordinator and --num-processes, and a distinct "
            "--process-id"
        ) from None
    return True


def is_runtime_failure(error: Exception) -> bool:
    """Whether `error` is JAX's runtime reporting a failure, as a lost process makes every
    collective fail: a JaxRuntimeError, or (from `multihost_utils`, which compiles its
    collectives as it runs them) a ValueError that carries the runtime's status, such as
    "UNKNOWN: Gloo all-reduce failed"."""
    import jax

    if isinstance(error, jax.errors.JaxRuntimeError):
        return True
    return bool(re.match(r"(UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED|DEADLINE_EXCEEDED): ", str(error)))


def _other_tasks(text: str, me: int | None) -> list[int]:
    """The processes other than `me` that JAX's messages in `text` name (as ".../task:K")."""
    return sorted({int(n) for n in re.findall(r"/task:(\d+)", text)} - {me})


def lost(error: Exception, saved_step: int | None, run_path: Path) -> str:
    """The one line a process prints when a collective of the run fails around it (the
    Python side of a lost process; `supervise` handles the runtime's side)."""
    import jax

    me, count = jax.process_index(), jax.process_count()
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else "no message"
    tasks = _other_tasks(str(error), me)
    if not tasks and count == 2:
        tasks = [1 - me]
    who = f"process {', '.join(map(str, tasks))}" if tasks else "another process"
    kept = (
        f"the last checkpoint (step {saved_step}) in {run_path} is whole: continue with "
        "--resume in every process"
        if saved_step is not None
        else "no checkpoint had been written yet"
    )
    return f"{who} of the run stopped or became unreachable ({first}); {kept}"


# Set in the child that `supervise` starts, which does the work of this process of the run.
WORKER = "CHARLM_RUN_WORKER"
# What JAX's C++ runtime writes: log lines in glog's form on stderr, kept from the user (and
# read for the lost process); from its first fatal line on, everything is the runtime's way
# down. Gloo, its CPU collectives, greets each peer on stdout.
_RUNTIME_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\]]+\]")
_FATAL_LINE = re.compile(rb"^(F\d{4} |Terminating process|\*\*\* Check failure)")
_GLOO_LINE = re.compile(rb"^\[Gloo\] ")
_CHARLM_ERROR = b"charlm: error: "


class _ChildErrors:
    """The child's stderr, passed through line by line (progress-bar updates, which end in a
    carriage return, too) but for the runtime's log, which is kept."""

    def __init__(self) -> None:
        self.runtime_log: list[bytes] = []
        self.said_error = False  # the child printed its own one line
        self._ended = False  # what follows is the runtime's way down
        self._pending = b""

    def feed(self, chunk: bytes, out: BinaryIO) -> None:
        self._pending += chunk
        cut = max(self._pending.rfind(b"\n"), self._pending.rfind(b"\r")) + 1
        for line in re.split(rb"(?<=[\r\n])", self._pending[:cut]):
            self._ended = self._ended or bool(_FATAL_LINE.match(line))
            if self._ended or _RUNTIME_LINE.match(line):
                self.runtime_log.append(line)
            elif line:
                out.write(line)
                if line.startswith(_CHARLM_ERROR):
                    # After its own line the child has said all there is; the rest is shutdown.
                    self.said_error = self._ended = True
        out.flush()
        self._pending = self._pending[cut:]

    def close(self, out: BinaryIO) -> None:
        if self._pending and not self._ended:
            out.write(self._pending)
            out.flush()


def _copy_stdout(source: BinaryIO, out: BinaryIO) -> None:
    for line in source:
        if not _GLOO_LINE.match(line):
            out.write(line)
            out.flush()


def supervise(
    command: list[str], run_path: Path, process_id: int | None, coordinator: str | None
) -> int:
    """Run `command`, this process's part of a run of several processes, as a child, passing
    its output through, and return the exit status to leave with.

    When a process of the run dies, JAX's runtime ends the others with a fatal log and an
    abort, not with an exception that charlm could turn into one line; so does a process that
    cannot join. The child takes that end; this process keeps the runtime's log from the user
    and prints one line instead: which process was lost, as far as the log tells, and how to
    go on. Ctrl-C reaches the child, which saves a checkpoint as a run of one process does."""
    import signal
    import subprocess
    import sys
    import threading

    child = subprocess.Popen(
        command,
        env={**os.environ, WORKER: "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    forward = signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    assert child.stdout is not None and child.stderr is not None
    stdout = threading.Thread(target=_copy_stdout, args=(child.stdout, sys.stdout.buffer))
    stdout.start()
    errors = _ChildErrors()
    try:
        while chunk := os.read(child.stderr.fileno(), 1 << 16):
            errors.feed(chunk, sys.stderr.buffer)
        errors.close(sys.stderr.buffer)
        status = child.wait()
        stdout.join()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, forward)
    if errors.said_error:
        return 1
    if status in (0, 1, 130):
        return status
    log = b"".join(errors.runtime_log).decode("utf-8", "replace")
    print(
        f"charlm: error: {_ending(log, status, run_path, process_id, coordinator)}", file=sys.stderr
    )
    return 1


def _die_with_parent() -> None:
    """In the child, before it runs: a SIGKILL when the supervisor dies, so that a killed
    process of the run takes its work with it, as a lost machine would."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _ending(
    log: str, status: int, run_path: Path, process_id: int | None, coordinator: str | None
) -> str:
    """The one line for a child that the runtime ended, from what its log says."""
    how = f"signal {-status}" if status < 0 else f"exit status {status}"
    if "RegisterTask" in log:
        return (
            f"could not join the run coordinated at {coordinator or 'the scheduler'} within "
            f"{join_timeout()} s ({how}); start every process with the same "
            "--coordinator and --num-processes, and a distinct --process-id"
        )
    tasks = _other_tasks(log, process_id)
    if tasks:
        who = f"process {', '.join(map(str, tasks))} of the run"
    elif process_id != 0:
        who = "process 0 of the run (the coordinator)"
    else:
        who = "another process of the run"
    return (
        f"{who} stopped or became unreachable, and this process ended ({how}); the last "
        f"checkpoint in {run_path} is whole: continue with --resume in every process"
    )
