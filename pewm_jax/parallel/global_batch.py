"""Global-batch assembly: each process's rows of a batch -> one jax.Array sharded on the mesh.

Every JAX process loads its own slice of the global batch (data_loaders.pipeline: process i of
P holds rows [i * B / P, (i + 1) * B / P)); `make_global_batch` lays those rows over the
devices of the mesh's data axes, so the jitted train step sees the whole global batch with its
batch dimension sharded over ("data", "fsdp") and the other dimensions replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Sharding of a batch array: dimension 0 over the mesh's data axes, the rest replicated.

    Axes of `data_axes` that the mesh does not have are left out (a mesh without "fsdp" shards
    the batch over "data" alone).
    """
    axes = tuple(axis for axis in data_axes if axis in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      data_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """This process's rows of every key -> global jax.Arrays sharded by `batch_sharding`."""
    sizes = {key: np.shape(value)[0] if np.ndim(value) else None
             for key, value in local_batch.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise ValueError(f"every key of a batch needs the same leading (batch) size; got {sizes}")
    sharding = batch_sharding(mesh, data_axes)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
