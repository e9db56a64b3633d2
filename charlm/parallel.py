"""Data parallelism over the local devices, stated once: a mesh with one axis, "batch".

The global batch of streams is split along its batch axis, one slice per device, and the hidden
state that each stream carries from step to step is split with it; parameters, optimizer state,
the step and the dropout key are replicated. The loss is the mean over the whole global batch,
so XLA inserts the all-reduce of the gradients itself, and every device applies the same
update: N devices train the same model as one, on the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charlm.errors import CharlmError

BATCH_AXIS = "batch"
# The parts of a training state (`charlm.step.init_state`) that hold one row per stream.
PER_STREAM = ("carry",)


@dataclass(frozen=True)
class DataParallel:
    """Where a training state and its batches live: `mesh` over the devices used."""

    mesh: Mesh

    @classmethod
    def over(cls, devices: int | None = None) -> DataParallel:
        """A mesh over the first `devices` local devices, or over all of them when None."""
        available = jax.local_devices()
        count = len(available) if devices is None else devices
        if not 1 <= count <= len(available):
            kind = available[0].platform.upper()
            raise CharlmError(
                f"--devices {count}: this process has {len(available)} {kind} device"
                f"{'s' if len(available) != 1 else ''}; give a number from 1 to {len(available)}"
            )
        # Auto axes: XLA propagates the shardings through the model (the gathers and scans of
        # a step need no annotations); `make_mesh`'s default in this JAX is Explicit axes.
        mesh = jax.make_mesh(
            (count,), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=available[:count]
        )
        return cls(mesh)

    @property
    def size(self) -> int:
        return self.mesh.size

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
        return jax.device_put(state, self.state_shardings(state))

    def put_batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Host arrays of the global batch, split over the devices."""
        return tuple(jax.device_put(array, self.batch) for array in arrays)
