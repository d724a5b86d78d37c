"""Logical-axis sharding rules: the table from logical axis names to mesh axes, applied to one
array's dimensions.

The bottom of the sharding stack (DESIGN.md "Layers"): models name logical axes and call
`logical_to_mesh_spec` through `pewm_jax.models.layers.constrain` without ever seeing a mesh
object; `pewm_jax.parallel` builds the mesh and applies the same function to parameters,
optimizer states and restore targets. Only jax's `PartitionSpec` is needed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

# (logical name, mesh axis | tuple of mesh axes | None) pairs: config.mesh.logical_axis_rules.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def logical_to_mesh_spec(names: Sequence[str | None], rules: Rules,
                         shape: Sequence[int] | None = None,
                         mesh_shape: Mapping[str, int] | None = None) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dimensions carry logical `names`.

    Each name maps through `rules`; a mesh axis already taken by an earlier dimension is not
    reused (that dimension is replicated), and, given `shape` and `mesh_shape`, a dimension
    the mapped axes' total size does not divide is replicated too.
    """
    table = dict(rules)
    spec, used = [], set()
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        group = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
        if mesh_shape is not None:
            group = tuple(a for a in group if a is not None and a in mesh_shape)
        if axes is None or not group or set(group) & used:
            spec.append(None)
            continue
        if shape is not None and mesh_shape is not None:
            if shape[i] % math.prod(mesh_shape[a] for a in group):
                spec.append(None)
                continue
        used |= set(group)
        spec.append(group[0] if len(group) == 1 else group)
    return PartitionSpec(*spec)
