"""Batches both trainers share: a grain loader's iterator with a checkpointable state, and the
per-host arrays of each process turned into one global jax.Array per key."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vavae_jax.runtime import sharding as sharding_lib


class LoaderIterator(Iterator[dict[str, np.ndarray]]):
    """Per-host batches of a grain DataLoader. `get_state` / `set_state` (and `start_prefetch`)
    are grain's, so `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` accept it.
    `num_records` is the size of the source, `per_host_batch` the batch each host yields."""

    def __init__(self, loader: grain.DataLoader, num_records: int, per_host_batch: int):
        self._it = iter(loader)
        self.num_records = num_records
        self.per_host_batch = per_host_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> bytes:
        return self._it.get_state()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(state)

    def start_prefetch(self) -> None:
        self._it.start_prefetch()


def make_global_batch(
    local_batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    shardings: NamedSharding | Mapping[str, NamedSharding] | None = None,
) -> dict[str, jax.Array]:
    """Per-host arrays -> global jax arrays, the batch axis split over (`data`, `fsdp`).

    `shardings` defaults to `sharding.batch_sharding(mesh, ndim)` for each array; the global
    batch is `process_count` times the local one, hosts in process order.
    """
    n_local = len(mesh.local_devices)
    out = {}
    for key, x in local_batch.items():
        x = np.asarray(x)
        if isinstance(shardings, Mapping):
            sh = shardings[key]
        elif shardings is not None:
            sh = shardings
        else:
            sh = sharding_lib.batch_sharding(mesh, max(x.ndim, 1))
        if shardings is None and (x.ndim == 0 or x.shape[0] % n_local):
            raise ValueError(
                f"batch[{key!r}] has shape {x.shape}: its leading (batch) axis must be a "
                f"multiple of the {n_local} devices of this host. Choose global_batch_size as a "
                f"multiple of the device count {mesh.size}."
            )
        out[key] = jax.make_array_from_process_local_data(sh, x)
    return out
