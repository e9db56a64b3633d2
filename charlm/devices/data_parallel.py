"""Data parallelism over the local devices, stated once: a mesh with one axis, "batch".

The global batch of streams is split along its batch axis, one slice per device, and the hidden
state that each stream carries from step to step is split with it; parameters, optimizer state,
the step and the dropout key are replicated. The loss is the mean over the whole global batch,
so XLA inserts the all-reduce of the gradients itself, and every device applies the same
update: N devices train the same model as one, on the same batches.

In a run of several processes (`charlm.devices.cluster`) the mesh spans every process's devices, in
process order, so each process holds a contiguous block of the batch's rows: it reads only
those streams and builds its part of the global batch (`put_batch`). Values that decide what
every process does next (whether to stop, the schedule's horizon) are process 0's (`agree`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charlm.errors import CharlmError

BATCH_AXIS = "batch"
# The parts of a training state (`charlm.lm.step.init_state`) that hold one row per stream.
PER_STREAM = ("carry",)


@dataclass(frozen=True)
class DataParallel:
    """Where a training state and its batches live: `mesh` over the devices used."""

    mesh: Mesh

    @classmethod
    def over(cls, devices: int | None = None) -> DataParallel:
        """A mesh over the first `devices` local devices of every process (all when None)."""
        available = jax.local_devices()
        count = len(available) if devices is None else devices
        if not 1 <= count <= len(available):
            kind = available[0].platform.upper()
            raise CharlmError(
                f"--devices {count}: this process has {len(available)} {kind} device"
                f"{'s' if len(available) != 1 else ''}; give a number from 1 to {len(available)}"
            )
        by_process: dict[int, list[jax.Device]] = {}
        for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
            by_process.setdefault(device.process_index, []).append(device)
        chosen = [d for process in sorted(by_process) for d in by_process[process][:count]]
        # Auto axes: XLA propagates the shardings through the model (the gathers and scans of
        # a step need no annotations); `make_mesh`'s default in this JAX is Explicit axes.
        return cls(Mesh(np.array(chosen), (BATCH_AXIS,), axis_types=(AxisType.Auto,)))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def processes(self) -> int:
        return jax.process_count()

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes files and prints."""
        return jax.process_index() == 0

    @property
    def batch(self) -> NamedSharding:
        """Split along the leading (batch) axis."""
        return NamedSharding(self.mesh, P(BATCH_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch that the devices cannot share equally, naming sizes that work."""
        if batch_size % self.size:
            lower = batch_size - batch_size % self.size
            sizes = " or ".join(str(n) for n in (lower, lower + self.size) if n > 0)
            raise CharlmError(
                f"--batch-size {batch_size} cannot be split over {self.size} devices; "
                f"use a multiple of {self.size} ({sizes}) or fewer --devices"
            )

    def state_shardings(self, state: dict[str, Any]) -> dict[str, Any]:
        """The sharding of each array of a training state: per-stream parts split along the
        batch, everything else replicated."""
        return {
            name: jax.tree.map(
                lambda _, name=name: self.batch if name in PER_STREAM else self.replicated, part
            )
            for name, part in state.items()
        }

    def put_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A training state (host or device arrays, the same in every process) placed on the
        mesh; each process fills only the shards its devices hold."""
        keyed = "rng" in state
        if keyed:
            state = dict(state, rng=jax.random.key_data(state["rng"]))
        host = jax.tree.map(np.asarray, state)
        placed = jax.tree.map(
            lambda x, sharding: jax.make_array_from_callback(x.shape, sharding, x.__getitem__),
            host,
            self.state_shardings(host),
        )
        if keyed:
            placed["rng"] = jax.random.wrap_key_data(placed["rng"])
        return placed

    def constrain(self, state: dict[str, Any]) -> dict[str, Any]:
        """Inside a compiled step: `state` with the shardings of `state_shardings`, so that
        the step returns its state where the next step expects it."""
        return jax.lax.with_sharding_constraint(state, self.state_shardings(state))

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that this process's devices hold: a contiguous block."""
        rows = [
            range(batch_size)[index[0]] if index else range(batch_size)
            for index in self.batch.addressable_devices_indices_map((batch_size,)).values()
        ]
        return slice(min(r.start for r in rows), max(r.stop for r in rows))

    def put_batch(self, batch_size: int, *rows: np.ndarray) -> tuple[jax.Array, ...]:
        """Global batch arrays of `batch_size` rows, from this process's `local_rows` of each."""
        if self.processes == 1:
            return tuple(jax.device_put(array, self.batch) for array in rows)
        return tuple(
            jax.make_array_from_process_local_data(
                self.batch, array, (batch_size, *array.shape[1:])
            )
            for array in rows
        )

    def to_host(self, tree: Any) -> Any:
        """NumPy copies of the arrays of `tree`, whole: replicated arrays from this process's
        own copy, arrays split over processes gathered from all of them (a collective, so
        every process must call it)."""

        def whole(x: jax.Array) -> np.ndarray:
            if x.is_fully_addressable:
                return np.asarray(jax.device_get(x))
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(whole, tree)

    def local(self, tree: Any) -> Any:
        """Replicated arrays of `tree` as this process's own copies, on one of its devices: for
        work that each process does alone, such as evaluation."""
        if self.processes == 1:
            return tree
        return jax.tree.map(lambda x: x.addressable_data(0), tree)

    def agree(self, value: int) -> int:
        """Process 0's `value` in every process."""
        if self.processes == 1:
            return value
        return int(multihost_utils.broadcast_one_to_all(np.int64(value)))

    def barrier(self, name: str) -> None:
        """Wait until every process has reached the barrier of this `name`."""
        if self.processes > 1:
            multihost_utils.sync_global_devices(name)
